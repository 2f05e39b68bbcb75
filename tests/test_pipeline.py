"""
The whole pipeline on the tiny Mistral, each script run as a user runs it:
prepare -> train -> evaluate -> test_mistral.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common import load_data, load_encoder, load_tokenizer
from helpers import BYTE_A, TOKEN_A, run_script, succeeds

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "The quick brown fox jumps over the lazy dog. Grüße aus Köln! 🤖\n" * 3


def test_train_writes_a_checkpoint(tiny_mistral, prepared_mistral, trained_mistral):
    checkpoint = torch.load(trained_mistral.out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    assert checkpoint["iter_num"] == 20
    assert checkpoint["data"] == {"model": str(tiny_mistral.folder), "vocab_size": 32000, "dim": 64}
    args = checkpoint["model_args"]
    assert (args["block_size"], args["n_out"], args["n_layer"], args["n_embd"]) == (50, 64, 1, 32)
    train_ids, val_ids = set(checkpoint["train_ids"].tolist()), set(checkpoint["val_ids"].tolist())
    assert not train_ids & val_ids and len(val_ids) > 0
    # untrained and duplicate rows have no target of their own: in neither split
    excluded = set(tiny_mistral.untrained) | {BYTE_A}
    assert not excluded & (train_ids | val_ids) and TOKEN_A in train_ids | val_ids
    with open(prepared_mistral.data / "meta.json") as f:
        meta = json.load(f)
    usable = {t["id"] for t in meta["tokens"] if not {"untrained", "duplicate"} & set(t["flags"])}
    assert train_ids | val_ids == usable
    assert "iter 20: train/loss" in trained_mistral.proc.stdout + trained_mistral.proc.stderr


def test_evaluate_writes_predictions_report_and_plots(tiny_mistral, trained_mistral, evaluated_mistral, workdir, monkeypatch):
    out_dir = evaluated_mistral.out_dir
    with open(out_dir / "eval.json") as f:
        report = json.load(f)
    checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    groups = report["groups"]
    assert (report["vocab_size"], report["dim"], report["iter_num"]) == (32000, 64, 20)
    assert groups["all"]["count"] == 32000 and groups["untrained"]["count"] == len(tiny_mistral.untrained)
    assert groups["trained"]["count"] == len(checkpoint["train_ids"]) and groups["held-out"]["count"] == len(checkpoint["val_ids"])
    assert 0.0 <= groups["all"]["top1"] <= 1.0 and -1.0 <= groups["all"]["cosine"] <= 1.0
    for png in ("norms.png", "accuracy_by_length.png"):
        assert (out_dir / png).read_bytes().startswith(PNG)
    # the saved table is the encoder's prediction for every token in id order (each row read
    # at the full block width here, which padding must not change), scaled by one global
    # factor: the trained rows' mean norm over the mean norm of their predictions
    new = load_file(out_dir / "new_embeddings.safetensors")["embeddings"]
    monkeypatch.chdir(workdir)
    input_ids, table, _ = load_data(str(tiny_mistral.folder))
    encoder = load_encoder(checkpoint)
    with torch.no_grad():
        predicted = torch.cat([encoder(rows) for rows in input_ids.split(4096)])
    trained = checkpoint["train_ids"]
    scale = (table[trained].norm(dim=1).mean() / predicted[trained].norm(dim=1).mean()).item()
    assert report["norm_scale"] == pytest.approx(scale, rel=1e-4)
    assert new.shape == (32000, 64) and new.dtype == torch.float32
    torch.testing.assert_close(new, predicted * scale, rtol=1e-4, atol=1e-6)


def perplexity(lm, ids):
    with torch.no_grad():
        return math.exp(lm(ids[None], labels=ids[None]).loss.item())


def test_splice_reports_both_perplexities(tiny_mistral, evaluated_mistral, workdir, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    proc = succeeds(run_script("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={evaluated_mistral.out_dir}",
                               f"--text_file={text_file}", "--max_new_tokens=5", cwd=workdir))
    with open(evaluated_mistral.out_dir / "splice.json") as f:
        report = json.load(f)
    assert "perplexity" in proc.stdout and "spliced" in proc.stdout
    assert isinstance(report["answer"]["original"], str) and isinstance(report["answer"]["spliced"], str)
    # the same numbers, computed here: the whole text is one window of the tiny LM
    tokenizer = load_tokenizer(tiny_mistral.folder)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    assert report["eval_tokens"] == len(ids) < report["context"]
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder, dtype=torch.float32).eval()
    original = perplexity(lm, ids)
    with torch.no_grad():
        lm.get_input_embeddings().weight.copy_(load_file(evaluated_mistral.out_dir / "new_embeddings.safetensors")["embeddings"])
    spliced = perplexity(lm, ids)
    assert report["perplexity"]["original"] == pytest.approx(original, rel=1e-4)
    assert report["perplexity"]["spliced"] == pytest.approx(spliced, rel=1e-4)
    assert abs(spliced - original) > 1e-3 * original
