"""
Every mistake a user can make ends in exit 1 and one sentence that says what to do, with
no traceback and no half-written file.
"""
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from helpers import fails_with, files_under, run_in_process, run_script, script_env

def test_a_mistake_ends_in_exit_1_and_one_line(tmp_path):
    """What the user sees, in a real process: the scripts' excepthook prints the sentence alone
    (the other tests run the scripts in-process and read the same sentence)."""
    proc = run_script("train.py", "--no_such_option=1", cwd=tmp_path)
    message = fails_with(proc, "unknown option --no_such_option=1")
    options = message.split(": ")[-1].split(", ")
    # the sentence lists what can be set, and a constant such as PAD is not among them
    assert "model" in options and "PAD" not in options
    assert files_under(tmp_path) == {}


def test_hub_model_offline(tmp_path):
    """Nothing can come from the hub: the sentence points to smollm2 and local folders."""
    env = script_env(HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"))
    proc = run_script("prepare_mistral_data.py", "--model=mistralai/Mistral-7B-v0.1", cwd=tmp_path, env=env)
    fails_with(proc, "mistralai/Mistral-7B-v0.1", "model=smollm2", "local/folder")
    assert not (tmp_path / "data").exists()


def test_splice_hub_model_offline(evaluated_mistral, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(evaluated_mistral.out_dir, out_dir)
    (out_dir / "splice.json").unlink(missing_ok=True)
    before = files_under(out_dir)
    env = script_env(HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"))
    proc = run_script("test_mistral.py", "--model=mistralai/Mistral-7B-v0.1", f"--out_dir={out_dir}", cwd=tmp_path, env=env)
    fails_with(proc, "model=smollm2", "local/folder")
    assert files_under(out_dir) == before


def test_model_that_is_neither_folder_nor_hub_id(tmp_path):
    proc = run_in_process("prepare_mistral_data.py", "--model=./no-such-folder", cwd=tmp_path)
    fails_with(proc, "neither a local folder nor a Hugging Face hub id")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_data_not_prepared(script, tiny_mistral, tmp_path):
    proc = run_in_process(script, f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path)
    fails_with(proc, f"data/{tiny_mistral.name}", f"python prepare_mistral_data.py --model={tiny_mistral.folder}")
    assert files_under(tmp_path) == {}


def test_evaluate_without_checkpoint(tiny_mistral, prepared_mistral, workdir, tmp_path):
    proc = run_in_process("evaluate.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}", cwd=workdir)
    fails_with(proc, "no checkpoint", "python train.py")
    assert not (tmp_path / "out").exists()


def test_splice_without_predictions(tiny_mistral, trained_mistral, workdir, tmp_path):
    """A trained checkpoint, but evaluate.py has not run yet."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copy2(trained_mistral.out_dir / "ckpt.pt", out_dir / "ckpt.pt")
    before = files_under(out_dir)
    proc = run_in_process("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", cwd=workdir)
    fails_with(proc, "new_embeddings.safetensors", "evaluate.py")
    assert files_under(out_dir) == before


def test_splice_on_two_texts_at_once(tiny_mistral, workdir, tmp_path):
    proc = run_in_process("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}",
                          f"--text_file={tmp_path / 'text.txt'}", "--selection=True", cwd=workdir)
    fails_with(proc, "text_file and selection=True", "one of them")


def test_unknown_init_from(tiny_mistral, prepared_mistral, workdir, tmp_path):
    proc = run_in_process("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}", "--init_from=pretrained", cwd=workdir)
    fails_with(proc, "init_from='pretrained'", "'scratch' or 'resume'")
    assert not (tmp_path / "out").exists()


def test_too_many_hub_negatives(tiny_mistral, prepared_mistral, workdir, tmp_path):
    proc = run_in_process("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}",
                      "--softmax_hub_negatives=40000", cwd=workdir)
    fails_with(proc, "softmax_hub_negatives=40000", "32000 rows")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def out_copy(trained_mistral, evaluated_mistral, tmp_path):
    """A copy of the tiny Mistral's trained and evaluated out_dir, safe to point bad runs at."""
    out_dir = tmp_path / "out"
    shutil.copytree(evaluated_mistral.out_dir, out_dir)
    return out_dir


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_checkpoint_of_another_model(script, narrow_mistral, prepared_narrow, out_copy, workdir):
    """A checkpoint trained on the 64-wide tiny Mistral, data of the 32-wide one."""
    before = files_under(out_copy)
    args = ["--init_from=resume", "--max_iters=40"] if script == "train.py" else []
    proc = run_in_process(script, f"--model={narrow_mistral.folder}", f"--out_dir={out_copy}", *args, cwd=workdir)
    fails_with(proc, "was trained on", "32000x64", "32000x32")
    assert files_under(out_copy) == before


def test_splice_predictions_of_another_model(narrow_mistral, out_copy, workdir):
    before = files_under(out_copy)
    proc = run_in_process("test_mistral.py", f"--model={narrow_mistral.folder}", f"--out_dir={out_copy}", cwd=workdir)
    fails_with(proc, "was trained on", "32000x64", "32000x32")
    assert files_under(out_copy) == before


def test_tokenizer_kind_not_understood(tmp_path):
    """A BERT-style WordPiece tokenizer on a tiny causal LM: neither SentencePiece nor byte-level."""
    folder = tmp_path / "wordpiece-lm"
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "hello": 4, "world": 5, "##s": 6, "the": 7}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    proc = run_in_process("prepare_mistral_data.py", f"--model={folder}", cwd=tmp_path)
    fails_with(proc, "neither SentencePiece-style", "byte-level BPE")
    assert not (tmp_path / "data").exists()
