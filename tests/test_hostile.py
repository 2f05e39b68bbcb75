"""
Hostile and broken inputs: a checkpoint never runs code, a corrupt file or an out-of-range
setting is one sentence and exit 1 before any work, and no good file is lost.
"""
import fcntl
import os
import shutil

import numpy as np
import pytest
import torch

from helpers import TINY_TRAIN, fails_with, files_under, run_in_process, run_script, succeeds


class WritesMarker:
    """Unpickling this calls open(path, "w"): what a hostile checkpoint could do instead."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_never_runs_code(tiny_mistral, prepared_mistral, trained_mistral, workdir, tmp_path):
    out_dir, marker = tmp_path / "out", tmp_path / "marker"
    out_dir.mkdir()
    checkpoint = torch.load(trained_mistral.out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    checkpoint["config"] = {"payload": WritesMarker(str(marker))}
    torch.save(checkpoint, out_dir / "ckpt.pt")
    # what the old code did: the full unpickler runs the payload
    torch.load(out_dir / "ckpt.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    for script, args in (("evaluate.py", []), ("train.py", ["--init_from=resume", "--max_iters=40"])):
        proc = run_in_process(script, f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *args, cwd=workdir)
        fails_with(proc, "not a checkpoint this repo can read", "never run")
        assert not marker.exists()
    proc = run_in_process("tokens.py", "compare", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", cwd=workdir)
    fails_with(proc, "never run")
    assert not marker.exists()


def corrupt_checkpoint(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a readable file without the weights
        checkpoint = torch.load(path, weights_only=True)
        del checkpoint["model"]
        torch.save(checkpoint, path)


@pytest.mark.parametrize("how", ["truncated", "random", "empty", "missing-keys"])
def test_corrupt_checkpoint_is_one_sentence(tiny_mistral, trained_mistral, workdir, tmp_path, how):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_mistral.out_dir, out_dir)
    corrupt_checkpoint(out_dir / "ckpt.pt", how)
    before = files_under(out_dir)
    fails_with(run_in_process("evaluate.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", cwd=workdir), "ckpt.pt")
    assert files_under(out_dir) == before


@pytest.mark.parametrize("damage", ["truncated embeddings", "garbage input_ids header", "invalid meta.json", "byte ids out of range",
                                    "sampled token ids out of range", "no sampled text"])
def test_corrupt_data_is_one_sentence(tiny_mistral, prepared_mistral, tmp_path, damage):
    data = tmp_path / "data" / tiny_mistral.name
    shutil.copytree(prepared_mistral.data, data)
    if damage == "truncated embeddings":
        raw = (data / "embeddings.npy").read_bytes()
        (data / "embeddings.npy").write_bytes(raw[:len(raw) // 3])
    elif damage == "garbage input_ids header":
        (data / "input_ids.npy").write_bytes(b"\x93NUMPY garbage" + bytes(100))
    elif damage == "invalid meta.json":
        (data / "meta.json").write_text("{not json")
    elif damage == "sampled token ids out of range":
        ids = np.load(data / "sample_ids.npy")
        ids[0, 3] = 32000  # the tiny Mistral has ids 0..31999; e2e would index its table with it
        np.save(data / "sample_ids.npy", ids)
    elif damage == "no sampled text":  # data prepared before prepare sampled the LM's text
        (data / "lm_share.npy").unlink()
    else:
        ids = np.load(data / "input_ids.npy")
        ids[5, 3] = 300  # no byte id is above 258
        np.save(data / "input_ids.npy", ids)
    proc = run_in_process("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}", *TINY_TRAIN, "--max_iters=2", cwd=tmp_path)
    fails_with(proc, "prepare_mistral_data.py")
    assert not (tmp_path / "out").exists()


def test_prepare_on_a_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_with(run_in_process("prepare_mistral_data.py", f"--model={tmp_path / 'empty'}", cwd=tmp_path), "no config.json")
    fails_with(run_in_process("tokens.py", "detect", f"--model={tmp_path / 'empty'}", cwd=tmp_path), "no config.json")


def test_unwritable_out_dir_fails_before_the_work(tiny_mistral, prepared_mistral, workdir):
    """As root, only a folder such as /proc refuses writes; it used to fail after training."""
    proc = run_in_process("train.py", f"--model={tiny_mistral.folder}", "--out_dir=/proc/soft-tokenizer-test", *TINY_TRAIN, cwd=workdir)
    fails_with(proc, "cannot write to /proc/soft-tokenizer-test")
    assert "iter 1:" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("setting, words", [
    ("--batch_size=0", "batch_size=0 is out of range"),
    ("--max_iters=-1", "max_iters=-1 is out of range"),
    ("--max_iters=0", "without a budget"),
    ("--eval_interval=-1", "eval_interval=-1"),
    ("--eval_sample=0", "eval_sample=0"),
    ("--learning_rate=nan", "learning_rate=nan"),
    ("--n_head=3", "n_head=3 does not divide n_embd=32"),
    ("--device=cuda", "no CUDA GPU"),
])
def test_train_settings_out_of_range(setting, words, tiny_mistral, prepared_mistral, workdir, tmp_path):
    proc = run_in_process("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}", *TINY_TRAIN, setting, cwd=workdir)
    fails_with(proc, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fraction", ["-0.1", "1.0"])
def test_prepare_test_fraction_out_of_range(fraction, tiny_mistral, tmp_path):
    fails_with(run_in_process("prepare_mistral_data.py", f"--model={tiny_mistral.folder}", f"--test_fraction={fraction}", cwd=tmp_path),
               f"test_fraction={float(fraction)}")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("source", ["raise ValueError('no')", "n_layer = = 2"], ids=["raises", "syntax-error"])
def test_broken_config_file(source, tmp_path):
    (tmp_path / "broken.py").write_text(source)
    fails_with(run_in_process("train.py", "broken.py", cwd=tmp_path), "config file broken.py failed to run")


def test_bench_needs_a_positive_budget(tmp_path):
    fails_with(run_in_process("bench.py", "--minutes=0", cwd=tmp_path), "minutes=0.0 is out of range")


@pytest.mark.parametrize("kind", ["latin-1", "binary", "folder"])
def test_bad_text_file(kind, tiny_mistral, evaluated_mistral, workdir, tmp_path):
    path = tmp_path / "text"
    if kind == "latin-1":
        path.write_bytes("Grüße aus Köln".encode("latin-1"))
    elif kind == "binary":
        path.write_bytes(b"\x00\x01\x02 ELF" * 50)
    else:
        path.mkdir()
    proc = run_in_process("test_mistral.py", f"--model={tiny_mistral.folder}", f"--out_dir={evaluated_mistral.out_dir}",
                      f"--text_file={path}", cwd=workdir)
    fails_with(proc, {"latin-1": "not UTF-8", "binary": "binary", "folder": "is a folder"}[kind])


def test_two_runs_on_one_out_dir(tiny_mistral, prepared_mistral, workdir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # a run already holds the folder: this test process takes its lock
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_script("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=2", cwd=workdir)
        fails_with(proc, "another run is training in")
    assert not (out_dir / "ckpt.pt").exists()


def test_a_killed_runs_temporary_file_is_cleaned_and_a_replaced_checkpoint_is_announced(tiny_mistral, trained_mistral, workdir, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_mistral.out_dir, out_dir)
    (out_dir / "tmp-abc123-ckpt.pt").write_bytes(b"half a checkpoint")
    proc = succeeds(run_script("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=2",
                               "--eval_interval=2", cwd=workdir))
    assert "ckpt.pt is from an earlier run" in proc.stdout
    assert not [name for name in os.listdir(out_dir) if name.startswith("tmp-")]
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 2
