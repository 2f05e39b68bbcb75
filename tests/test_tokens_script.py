"""
tokens.py as a user runs it: detect lists exactly the tiny Mistral's untrained rows; repair
--method=soft puts the byte-fallback rows <0x41> and <0x61> next to their twins "A" and "a",
where mean cannot; add makes new single tokens, on the untied tiny Mistral and on a tied
byte-level model; every folder written loads with stock transformers and generates.
"""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from soft_tokenizer.lm import load_tokenizer
from soft_tokenizer.spelling import token_bytes, untrained_rows
from helpers import (BYTE_A, SMALL_SAMPLE, SPELLING_ENCODER, TOKEN_A, files_under, fails_with, generates, run_in_process, spelled_rows,
                     stock_load, succeeds)

BYTE_a, TOKEN_a = 100, 28708  # <0x61> and "a"
@pytest.fixture(scope="module")
def spelled(tiny_mistral, workdir, tmp_path_factory):
    """The tiny Mistral with an input table in which spelling decides the row (helpers.spelled_rows).
    The fixture's untrained rows stay as small as they were. Then data and a small encoder trained on it."""
    folder = tmp_path_factory.mktemp("models") / "spelled-mistral"
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder)
    tokenizer = load_tokenizer(tiny_mistral.folder)
    tokens, _ = token_bytes(tokenizer)
    table = lm.get_input_embeddings().weight
    with torch.no_grad():
        norms = table.norm(dim=1)
        table[:] = spelled_rows([data for data, _ in tokens], table.shape[1], seed=0)
        table[tiny_mistral.untrained] *= (norms[tiny_mistral.untrained] / norms.median())[:, None]
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out_dir = workdir / "out-spelled"
    succeeds(run_in_process("prepare_mistral_data.py", f"--model={folder}", *SMALL_SAMPLE, cwd=workdir))
    succeeds(run_in_process("train.py", f"--model={folder}", f"--out_dir={out_dir}", *SPELLING_ENCODER, cwd=workdir))
    # the twins must be rows the encoder learnt, or the test says nothing
    assert {TOKEN_A, TOKEN_a} <= set(np.load(workdir / "data" / folder.name / "train_ids.npy").tolist())
    return SimpleNamespace(folder=folder, out_dir=out_dir, table=table.detach().clone(), untrained=tiny_mistral.untrained,
                           head=lm.get_output_embeddings().weight.detach().clone())


def tokens_py(*args, cwd):
    return run_in_process("tokens.py", *map(str, args), cwd=cwd)


@pytest.fixture(scope="module")
def repaired(spelled, workdir):
    """The spelled Mistral repaired by soft and by mean."""
    folders = {}
    for method in ("soft", "mean"):
        folders[method] = workdir / f"repaired-{method}"
        proc = succeeds(tokens_py("repair", f"--model={spelled.folder}", f"--out_dir={spelled.out_dir}",
                                  f"--method={method}", f"--save={folders[method]}", cwd=workdir))
        folders[method + "_stdout"] = proc.stdout
    return folders


def input_table(folder):
    return load_file(folder / "model.safetensors")["model.embed_tokens.weight"]


def test_detect_lists_exactly_the_untrained_rows(tiny_mistral, workdir):
    proc = succeeds(tokens_py("detect", f"--model={tiny_mistral.folder}", cwd=workdir))
    listed = [int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+\d+\.\d+\s", proc.stdout, re.M)]
    assert listed == tiny_mistral.untrained
    assert "<0x41> 'A'" in proc.stdout and f"{len(listed)} of 32000 input rows untrained" in proc.stdout


def test_soft_repair_puts_byte_fallback_rows_next_to_their_twins(spelled, repaired):
    soft, mean = input_table(repaired["soft"]), input_table(repaired["mean"])
    for byte, twin in ((BYTE_A, TOKEN_A), (BYTE_a, TOKEN_a)):
        soft_cosine = F.cosine_similarity(soft[byte], spelled.table[twin], dim=0).item()
        mean_cosine = F.cosine_similarity(mean[byte], spelled.table[twin], dim=0).item()
        assert soft_cosine > 0.5 and soft_cosine > mean_cosine + 0.2, (byte, soft_cosine, mean_cosine)
    assert re.search(r"<0x41> 'A'.*twin A cosine 0\.\d+", repaired["soft_stdout"])
    for table in (soft, mean):
        assert not untrained_rows(table).any()
        # only the untrained rows change
        others = torch.ones(len(table), dtype=torch.bool)
        others[spelled.untrained] = False
        assert torch.equal(table[others], spelled.table[others])
    # the untied head's rows are all trained, so it is left as it was
    head = load_file(repaired["soft"] / "model.safetensors")["lm_head.weight"]
    assert torch.equal(head, spelled.head)


def test_repaired_folder_loads_with_stock_transformers_and_generates(repaired):
    lm, tokenizer = stock_load(repaired["soft"])
    assert not untrained_rows(lm.get_input_embeddings().weight.detach()).any()
    generates(lm, tokenizer, "A short test")


def test_add_makes_single_new_tokens_on_an_untied_model(spelled, workdir):
    save = workdir / "added-mistral"
    new = [" zorblax", "<|tool|>"]
    succeeds(tokens_py("add", f"--model={spelled.folder}", f"--out_dir={spelled.out_dir}", "--method=soft",
                       f"--save={save}", "--tokens", *new, cwd=workdir))
    lm, tokenizer = stock_load(save)
    ids = tokenizer.convert_tokens_to_ids(new)
    assert ids == [32000, 32001] and len(tokenizer) == 32002
    for text, token_id in zip(new, ids):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
    assert 32000 in tokenizer("I like zorblax a lot")["input_ids"]
    table, head = lm.get_input_embeddings().weight.detach(), lm.get_output_embeddings().weight.detach()
    assert table.shape[0] == head.shape[0] == 32002
    assert torch.equal(table[:32000], spelled.table) and torch.equal(head[:32000], spelled.head)
    # input rows are predictions of their own; output rows the mean of the trained output rows
    assert not untrained_rows(table)[ids].any() and not torch.equal(table[32000], table[32001])
    assert torch.allclose(head[ids], spelled.head.mean(0).expand(2, -1), atol=1e-6)
    generates(lm, tokenizer, "I like zorblax")


def test_add_on_a_tied_byte_level_model(smollm2_tokenizer, workdir, tmp_path_factory):
    """SmolLM2's tokenizer on a tiny tied Llama: " zorblax" with its space is one token after
    "Ġlike", and its one row (fvt: the mean of " z", "or", "bl", "ax") is the output row too."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("models") / "tiny-smollm2"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    save = workdir / "added-smollm2"
    succeeds(tokens_py("add", f"--model={folder}", "--method=fvt", f"--save={save}", "--tokens", " zorblax", cwd=workdir))
    lm, tokenizer = stock_load(save)
    new_id = len(smollm2_tokenizer)
    assert tokenizer.convert_ids_to_tokens(tokenizer("I like zorblax")["input_ids"]) == ["I", "Ġlike", " zorblax"]
    table = lm.get_input_embeddings().weight
    assert lm.get_output_embeddings().weight.data_ptr() == table.data_ptr()
    pieces = smollm2_tokenizer(" zorblax")["input_ids"]
    assert smollm2_tokenizer.convert_ids_to_tokens(pieces) == ["Ġz", "or", "bl", "ax"]
    assert torch.allclose(table[new_id], table[pieces].mean(0), atol=1e-6)
    generates(lm, tokenizer, "I like zorblax")


def test_compare_prints_the_table(spelled, workdir):
    """compare reads its soft rows from evaluate.py's predicted table, the one the splice uses."""
    fails_with(run_in_process("tokens.py", "compare", f"--model={spelled.folder}", f"--out_dir={spelled.out_dir}", cwd=workdir), "run: python evaluate.py")
    # top-1 on a sample of rows: compare reads the predicted table, not the top-1
    succeeds(run_in_process("evaluate.py", f"--model={spelled.folder}", f"--out_dir={spelled.out_dir}", "--top1_rows=1024", cwd=workdir))
    proc = succeeds(tokens_py("compare", f"--model={spelled.folder}", f"--out_dir={spelled.out_dir}",
                              "--eval_tokens=128", "--context=64", cwd=workdir))
    lines = re.findall(r"^\| (\w+)[^|]*\| ([\d.]+) \|", proc.stdout, re.M)
    assert [name for name, _ in lines] == ["true", "mean", "fvt", "soft"]
    cosine = {name: float(value) for name, value in lines}
    assert cosine["true"] == 1.0 and cosine["soft"] > cosine["mean"] and cosine["fvt"] > cosine["mean"]


def test_mistakes_end_in_one_sentence(spelled, repaired, workdir):
    before = files_under(repaired["soft"])
    fails_with(run_in_process("tokens.py", "repair", f"--model={spelled.folder}", f"--save={repaired['soft']}", cwd=workdir), "already exists")
    assert files_under(repaired["soft"]) == before
    fails_with(run_in_process("tokens.py", "repair", f"--model={spelled.folder}", "--method=median", "--save=x", cwd=workdir), "method='median' is not known")
    fails_with(run_in_process("tokens.py", "add", f"--model={spelled.folder}", "--method=soft", f"--out_dir={workdir / 'nowhere'}",
                         f"--save={workdir / 'x'}", "--tokens", " zorblax", cwd=workdir), "no checkpoint")
    fails_with(run_in_process("tokens.py", "add", f"--model={spelled.folder}", "--method=mean", f"--save={workdir / 'x'}",
                         "--tokens", " the", cwd=workdir), "already token")
    assert not (workdir / "x").exists()
