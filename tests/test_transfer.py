"""
transfer.py gives the tiny Mistral (untied, Mistral-7B's real SentencePiece tokenizer) the
real SmolLM2 tokenizer (byte-level BPE): the folder it writes loads in stock transformers,
encodes as SmolLM2's tokenizer does, generates, keeps the LM's own input and output rows bit
for bit for every token whose bytes the LM has, gives the others the mean output row, and the
table it prints is the one in its JSON.
"""
import json
import math

import torch

from helpers import fails_with, generates, run_in_process, stock_load, succeeds
from soft_tokenizer.spelling import token_bytes


def test_transfer_writes_a_folder_with_the_new_tokenizer_and_the_lms_shared_rows(tiny_mistral, trained_mistral, smollm2_tokenizer, workdir, tmp_path):
    saved, out_dir = tmp_path / "tiny-with-smollm2", trained_mistral.out_dir
    model = f"--model={tiny_mistral.folder}"
    proc = succeeds(run_in_process("transfer.py", model, f"--out_dir={out_dir}", "--tokenizer=smollm2", "--methods=soft",
                                   "--eval_chars=2000", "--context=64", f"--save={saved}", "--name=transfer-test", cwd=workdir))
    lm, tokenizer = stock_load(saved)
    text = "def transfer(tokens):\n    return {t: 'é東京' for t in tokens}"
    assert tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    generates(lm, tokenizer, text)
    from transformers import AutoModelForCausalLM
    original = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder)
    own_rows, own_head = original.get_input_embeddings().weight, original.get_output_embeddings().weight
    rows, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert rows.shape[0] == len(smollm2_tokenizer)
    mistral = {data: i for i, (data, flags) in enumerate(token_bytes(tokenizer_of(tiny_mistral))[0]) if not flags & {"special", "duplicate"}}
    shared = [(i, mistral[data]) for i, (data, flags) in enumerate(token_bytes(smollm2_tokenizer)[0])
              if not flags and data in mistral and own_rows[mistral[data]].norm() > 1e-2]  # not the rows the tiny Mistral leaves untrained
    assert len(shared) > 5000  # the two vocabularies share thousands of strings (" the", "ing", ...)
    new_ids, old_ids = torch.tensor([s for s, _ in shared]), torch.tensor([o for _, o in shared])
    assert torch.equal(rows[new_ids], own_rows[old_ids]) and torch.equal(head[new_ids], own_head[old_ids])
    # SmolLM2's EOS (and padding), <|im_end|>, takes the LM's </s>; its bos_token <|im_start|> is never put before a text, so it has no role
    assert torch.equal(rows[tokenizer.eos_token_id], own_rows[2]) and torch.equal(head[tokenizer.eos_token_id], own_head[2])
    lacking = torch.ones(len(rows), dtype=torch.bool)
    lacking[new_ids] = False
    lacking[tokenizer.eos_token_id] = False
    assert torch.equal(head[lacking], head[lacking][:1].expand(int(lacking.sum()), -1))  # one row for all: the mean output row
    report = json.loads((out_dir / "transfer-test.json").read_text())
    assert report["made"] == int(lacking.sum())
    assert report["methods"] == ["soft"] and len(report["bits_per_byte"]) == 2
    for text_name, result in report["bits_per_byte"].items():
        assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("original", "soft"))
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {text_name} |"))
        assert all(f"{result[k]:.4f}" in row for k in ("original", "soft"))
    assert (out_dir / "transfer-test.png").read_bytes()[:4] == b"\x89PNG"
    fails_with(run_in_process("transfer.py", model, f"--out_dir={out_dir}", "--methods=soft,fvt", f"--save={tmp_path / 'two'}", cwd=workdir),
               "--save writes one model")
    assert not (tmp_path / "two").exists()
    fails_with(run_in_process("transfer.py", model, f"--out_dir={out_dir}", f"--tokenizer={tmp_path / 'nowhere'}", cwd=workdir), "no tokenizer found")


def tokenizer_of(tiny):
    from soft_tokenizer.lm import load_tokenizer
    return load_tokenizer(tiny.folder)
