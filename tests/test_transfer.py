"""
transfer.py gives the tiny Mistral (untied, Mistral-7B's real SentencePiece tokenizer) the
real SmolLM2 tokenizer (byte-level BPE), and adapts the rows it makes through the LM's loss:
the folder it writes loads in stock transformers, encodes as SmolLM2's tokenizer does,
generates, keeps the LM's own input and output rows bit for bit for every token whose bytes
the LM has (adaptation included), gives the others the mean output row, and the table it
prints is the one in its JSON. The adaptation's loss, on tiny tied LMs, is the LM's own.
"""
import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import fails_with, generates, run_in_process, stock_load, succeeds
from soft_tokenizer.e2e import new_vocabulary_loss
from soft_tokenizer.spelling import token_bytes


def test_transfer_writes_a_folder_with_the_new_tokenizer_and_the_lms_shared_rows(tiny_mistral, trained_mistral, smollm2_tokenizer, workdir, tmp_path):
    saved, out_dir = tmp_path / "tiny-with-smollm2", trained_mistral.out_dir
    model = f"--model={tiny_mistral.folder}"
    proc = succeeds(run_in_process("transfer.py", model, f"--out_dir={out_dir}", "--tokenizer=smollm2", "--methods=soft",
                                   "--eval_chars=2000", "--context=64", f"--save={saved}", "--name=transfer-test",
                                   "--adapt_seconds=2", "--adapt_context=32", cwd=workdir))
    lm, tokenizer = stock_load(saved)
    text = "def transfer(tokens):\n    return {t: 'é東京' for t in tokens}"
    assert tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    generates(lm, tokenizer, text)
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
    assert report["methods"] == ["soft", "soft+adapted"] and len(report["bits_per_byte"]) == 2
    assert report["adapted"]["steps"] == len(report["adapted"]["losses"]) > 0
    for text_name, result in report["bits_per_byte"].items():
        assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("original", "soft", "soft+adapted"))
        assert result["soft+adapted"] != result["soft"]  # the LM reads the adapted rows at the end
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {text_name} |"))
        assert all(f"{result[k]:.4f}" in row for k in ("original", "soft", "soft+adapted"))
    assert (out_dir / "transfer-test.png").read_bytes()[:4] == b"\x89PNG"
    fails_with(run_in_process("transfer.py", model, f"--out_dir={out_dir}", "--methods=soft,fvt", f"--save={tmp_path / 'two'}", cwd=workdir),
               "--save writes one model")
    assert not (tmp_path / "two").exists()
    fails_with(run_in_process("transfer.py", model, f"--out_dir={out_dir}", f"--tokenizer={tmp_path / 'nowhere'}", cwd=workdir), "no tokenizer found")
    fails_with(run_in_process("transfer.py", model, f"--out_dir={out_dir}", "--methods=fvt", "--adapt_seconds=5", cwd=workdir), "only soft uses")


def tokenizer_of(tiny):
    from soft_tokenizer.lm import load_tokenizer
    return load_tokenizer(tiny.folder)


@pytest.mark.parametrize("kind, capped", [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 0.5})])
def test_the_adaptation_loss_is_the_lms_own_loss_when_every_other_token_is_drawn(kind, capped):
    """e2e.new_vocabulary_loss on a tiny tied LM (Gemma's scales its input rows, and here caps
    its scores hard, as Gemma 2's do): with every
    other made token drawn, its loss is exactly the stock LM's loss with the encoder's rows in
    its table, and with five drawn it still is where all the rows not drawn are alike (each
    drawn row stands for its share of them); the gradient reaches the windows' and the drawn
    rows, no other."""
    from transformers import AutoConfig
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True, **capped)
    lm = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    position = torch.full((300,), -1)
    learned = torch.arange(100, 300, 2)  # every other token of the upper part: its row is the encoder's
    position[learned] = torch.arange(len(learned))
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    rows = torch.randn(len(learned), 32) * 0.05
    rows[~torch.isin(learned, windows)] = torch.randn(32) * 0.05
    encoder_rows = torch.nn.Parameter(rows)
    spliced = copy.deepcopy(lm)
    spliced.get_input_embeddings().weight[learned] = rows
    stock = spliced(input_ids=windows, labels=windows).loss
    for negatives in (10 ** 6, 5):
        loss = new_vocabulary_loss(lm, windows, position, lambda at: encoder_rows[at], negatives, torch.Generator().manual_seed(2))
        assert torch.allclose(loss, stock, atol=1e-5), negatives
    loss.backward()
    moved = learned[encoder_rows.grad.abs().sum(1) > 0]
    in_windows = moved[torch.isin(moved, windows)]
    assert set(in_windows.tolist()) == set(learned[torch.isin(learned, windows)].tolist())
    assert len(moved) - len(in_windows) == 5  # the drawn ones
