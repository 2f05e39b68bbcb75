"""
The whole pipeline on the tiny Mistral, each script run as a user runs it:
prepare -> train -> evaluate -> test_mistral.
"""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from soft_tokenizer.lm import load_tokenizer
from soft_tokenizer.storage import load_data, load_encoder
from helpers import run_script, succeeds

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = "The quick brown fox jumps over the lazy dog. Grüße aus Köln! 🤖\n" * 3


def test_train_writes_a_checkpoint(tiny_mistral, prepared_mistral, trained_mistral):
    checkpoint = torch.load(trained_mistral.out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert checkpoint["iter_num"] == 20
    meta = json.loads((prepared_mistral.data / "meta.json").read_text())
    assert checkpoint["data"] == {"model": str(tiny_mistral.folder), "vocab_size": 32000, "dim": 64, "data_sha256": meta["data_sha256"]}
    assert checkpoint["stage"] == "regression" and len(checkpoint["id"]) == 32
    args = checkpoint["model_args"]
    assert (args["block_size"], args["n_out"], args["n_layer"], args["n_embd"]) == (50, 64, 1, 32)
    assert "iter 20: train/cosine" in trained_mistral.proc.stdout + trained_mistral.proc.stderr


def test_evaluate_writes_predictions_report_and_plots(tiny_mistral, trained_mistral, evaluated_mistral, workdir, monkeypatch):
    out_dir = evaluated_mistral.out_dir
    with open(out_dir / "eval.json") as f:
        report = json.load(f)
    monkeypatch.chdir(workdir)
    data = load_data(str(tiny_mistral.folder))
    groups = report["groups"]
    assert (report["vocab_size"], report["dim"], report["iter_num"]) == (32000, 64, 20)
    assert groups["all"]["count"] == 32000 and groups["untrained"]["count"] == len(tiny_mistral.untrained)
    assert groups["trained"]["count"] == len(data.train_ids) and groups["held-out"]["count"] == len(data.test_ids)
    for png in ("norms.png", "accuracy_by_length.png"):
        assert (out_dir / png).read_bytes().startswith(PNG)
    # the saved table is the encoder's prediction for every token in id order, each row read at
    # the full block width here, which padding must not change
    new = load_file(out_dir / "new_embeddings.safetensors")["embeddings"]
    encoder = load_encoder(torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True))
    with torch.no_grad():
        predicted = torch.cat([encoder(rows)[0] for rows in data.input_ids.split(4096)])
    assert new.shape == (32000, 64) and new.dtype == torch.float32
    torch.testing.assert_close(new, predicted, rtol=1e-4, atol=1e-6)
    # the numbers as evaluate.py defines them, recomputed here: explained variance and top-1 for the
    # held-out tokens (top-1 against every row of the table), cosine and norms for all of them, and
    # for the tokens in text each token counted as often as the training text uses it
    held, table = data.test_ids, data.table
    mean_row = table[data.train_ids].mean(0)
    explained = 1 - (predicted[held] - table[held]).pow(2).sum() / (table[held] - mean_row).pow(2).sum()
    assert groups["held-out"]["explained"] == pytest.approx(explained.item(), rel=1e-3, abs=1e-4)
    top1 = ((predicted[held] @ table.T).argmax(1) == held).float().mean()
    assert groups["held-out"]["top1"] == pytest.approx(top1.item(), abs=1 / len(held))
    cosine = torch.nn.functional.cosine_similarity(predicted, table, dim=1)
    assert groups["all"]["cosine"] == pytest.approx(cosine.mean().item(), rel=1e-3, abs=1e-5)
    assert groups["all"]["norm_predicted"] == pytest.approx(predicted.norm(dim=1).mean().item(), rel=1e-4)
    assert groups["all"]["norm_original"] == pytest.approx(table.norm(dim=1).mean().item(), rel=1e-4)
    counts = data.text_counts.double()
    in_text = (counts * cosine).sum() / counts.sum()
    assert groups["in text"]["cosine"] == pytest.approx(in_text.item(), rel=1e-3, abs=1e-5)
    assert groups["in text"]["cosine"] != pytest.approx(cosine[counts > 0].mean().item(), rel=0.05, abs=1e-4)
    # the LM's own text: the tokens it sampled, each by its share of the LM's next-token distributions
    sampled = torch.zeros(32000, dtype=torch.bool)
    sampled[data.sample_ids.flatten()] = True
    share = data.lm_share * sampled
    assert groups["LM's text"]["count"] == sampled.sum() > 200
    assert groups["LM's text"]["cosine"] == pytest.approx(((share * cosine).sum() / share.sum()).item(), rel=1e-3, abs=1e-5)


def perplexity(lm, ids):
    with torch.no_grad():
        return math.exp(lm(ids[None], labels=ids[None]).loss.item())


def test_splice_reports_both_perplexities(tiny_mistral, evaluated_mistral, workdir, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    # the text as the tokenizer encodes it for the LM, its BOS first: one window of exactly that many tokens
    tokenizer = load_tokenizer(tiny_mistral.folder)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id
    proc = succeeds(run_script("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={evaluated_mistral.out_dir}",
                               f"--text_file={text_file}", "--max_new_tokens=5", f"--context={len(ids)}", cwd=workdir))
    with open(evaluated_mistral.out_dir / "splice.json") as f:
        report = json.load(f)
    assert "perplexity" in proc.stdout and "spliced" in proc.stdout
    assert isinstance(report["answer"]["original"], str) and isinstance(report["answer"]["spliced"], str)
    # what it came from: the checkpoint the predictions were made from, and the data (and so the LM's table)
    meta = json.loads((workdir / "data" / tiny_mistral.name / "meta.json").read_text())
    checkpoint_id = torch.load(evaluated_mistral.out_dir / "ckpt.pt", map_location="cpu", weights_only=True)["id"]
    assert (report["checkpoint_id"], report["data_sha256"], report["table_sha256"]) == (checkpoint_id, meta["data_sha256"], meta["table_sha256"])
    # the same numbers, computed here on that one window
    assert report["texts"] == {str(text_file): len(ids)} and report["bos"]
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder, dtype=torch.float32).eval()
    original = perplexity(lm, ids)
    with torch.no_grad():
        lm.get_input_embeddings().weight.copy_(load_file(evaluated_mistral.out_dir / "new_embeddings.safetensors")["embeddings"])
    spliced = perplexity(lm, ids)
    # the same computation in the same process layout: equal far below the difference splicing makes
    assert report["perplexity"]["original"][str(text_file)] == pytest.approx(original, rel=1e-6)
    assert report["perplexity"]["spliced"][str(text_file)] == pytest.approx(spliced, rel=1e-6)
    assert report["ratio"][str(text_file)] == pytest.approx(spliced / original, rel=1e-6)
    assert abs(spliced - original) > 1e-4 * original

    # only the rows of the tokens the training text uses; the others keep the LM's own, and splice.json stays
    first_report = (evaluated_mistral.out_dir / "splice.json").read_bytes()
    succeeds(run_script("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={evaluated_mistral.out_dir}",
                        f"--text_file={text_file}", "--max_new_tokens=5", "--splice_tokens=in_text", f"--context={len(ids)}", cwd=workdir))
    partial = json.loads((evaluated_mistral.out_dir / "splice-in_text.json").read_text())
    in_text = torch.from_numpy(np.load(workdir / "data" / tiny_mistral.name / "text_counts.npy")) > 0
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder, dtype=torch.float32).eval()
    with torch.no_grad():
        weight = lm.get_input_embeddings().weight
        weight[:len(in_text)][in_text] = load_file(evaluated_mistral.out_dir / "new_embeddings.safetensors")["embeddings"][in_text]
    assert 0 < in_text.sum() < len(in_text) and partial["splice_tokens"] == "in_text"
    assert partial["perplexity"]["spliced"][str(text_file)] == pytest.approx(perplexity(lm, ids), rel=1e-6)
    assert (evaluated_mistral.out_dir / "splice.json").read_bytes() == first_report
    # the held-out tokens' rows alone: what tokens no stage trained on get
    succeeds(run_script("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={evaluated_mistral.out_dir}",
                        f"--text_file={text_file}", "--max_new_tokens=5", "--splice_tokens=held_out", f"--context={len(ids)}", cwd=workdir))
    held_out = json.loads((evaluated_mistral.out_dir / "splice-held_out.json").read_text())
    test_ids = torch.from_numpy(np.load(workdir / "data" / tiny_mistral.name / "test_ids.npy"))
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder, dtype=torch.float32).eval()
    with torch.no_grad():
        lm.get_input_embeddings().weight[test_ids] = load_file(evaluated_mistral.out_dir / "new_embeddings.safetensors")["embeddings"][test_ids]
    assert held_out["perplexity"]["spliced"][str(text_file)] == pytest.approx(perplexity(lm, ids), rel=1e-6)
