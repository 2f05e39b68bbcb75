"""
train.py's promises: two processes give what one gives, an interrupted run resumed gives
what an uninterrupted one gives, a run whose loss blows up keeps its last good checkpoint,
a run told to keeps the checkpoint that is best on the val tokens, and it never trains on
MPS, which lacks the n-gram table's sparse kernels.
"""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY_TRAIN, fails_with, files_under, script_env, succeeds
from soft_tokenizer.configurator import UserError, pick_device

# a short warmup, so that the few steps these runs take also run down the cosine schedule
SHORT = [*TINY_TRAIN, "--warmup_iters=2", "--learning_rate=1e-3"]

# `python -c` program: train.py exactly as a user runs it, except that the process is
# interrupted (as by Ctrl-C) right after it has written its first checkpoint past iteration 0
# (a run that solves n-gram vectors saves them at iteration 0 too)
INTERRUPTED = """
import runpy, sys
sys.path.insert(0, {repo!r})
from soft_tokenizer import storage
save = storage.save_checkpoint
def save_then_interrupt(path, checkpoint):
    save(path, checkpoint)
    if checkpoint["iter_num"]:
        raise KeyboardInterrupt
storage.save_checkpoint = save_then_interrupt
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(*args, cwd, launcher=()):
    # one thread each: float sums, and so bit-equality, depend on how work is split over threads
    command = [sys.executable, *launcher, str(REPO / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=script_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)


def load(out_dir):
    return torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)


def test_two_processes_match_one(tiny_mistral, prepared_mistral, workdir):
    """The global batch of 32, two micro-batches of 16 (the first under no_sync), each split
    8 + 8 over two gloo processes: DDP averages the gradients; the n-gram vectors are solved
    before training, and every process keeps rank 0's."""
    args = [f"--model={tiny_mistral.folder}", *SHORT, "--max_iters=6", "--eval_interval=6", "--batch_size=16", "--gradient_accumulation_steps=2",
            "--softmax_weight=1", "--softmax_negatives=0", "--ngram_max=3", "--ngram_solve_iters=10"]
    succeeds(train(*args, f"--out_dir={workdir / 'out-one'}", cwd=workdir))
    two_processes = succeeds(train(*args, f"--out_dir={workdir / 'out-two'}", cwd=workdir,
                                   launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]))
    # two independent single-process runs would write the same checkpoint: make sure DDP ran
    assert "on cpu x2" in two_processes.stdout
    one, two = load(workdir / "out-one"), load(workdir / "out-two")
    assert one["iter_num"] == two["iter_num"] == 6
    # not bit-equal: each process trims its half to its own longest token and sums in another
    # order, and Adam, which divides by the gradient's own size, can blow that float noise up:
    # the head's last layer starts at zero (the first rows are the solved ones), so the first
    # steps' gradients below it are tiny and their noise comes out at up to 1e-4 (measured). A
    # real fault moves weights by whole steps: Adam moves each by about the learning rate (1e-3)
    # a step, so a process training on the wrong half (5e-3 measured) is of order 1e-3 after 6
    # steps. 3e-4 lies between the two. Gradients summed instead of averaged it cannot see: to
    # Adam twice a gradient is the same step (only its eps and grad_clip tell them apart)
    assert torch.equal(two["model"]["ngram.weight"], one["model"]["ngram.weight"])
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=0, atol=3e-4, msg=name)


def test_two_processes_stop_together_on_a_time_budget(tiny_mistral, prepared_mistral, workdir):
    """With max_seconds each process would read its own clock; rank 0's decision is broadcast,
    so both stop at the same step instead of one waiting forever for the other."""
    args = [f"--model={tiny_mistral.folder}", *SHORT, "--max_iters=0", "--max_seconds=3", f"--out_dir={workdir / 'out-two-timed'}"]
    proc = succeeds(train(*args, cwd=workdir, launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]))
    assert "on cpu x2" in proc.stdout
    checkpoint = load(workdir / "out-two-timed")
    assert checkpoint["train_seconds"] >= 3.0 and checkpoint["iter_num"] > 0


def test_resume_continues_exactly(tiny_mistral, prepared_mistral, workdir):
    """20 iterations straight against 10, an interruption, and a resume to 20. Both legs use
    the same max_iters, so the cosine schedule is the same; the sampled softmax negatives
    make the random stream part of what must be restored."""
    args = [f"--model={tiny_mistral.folder}", *SHORT, "--max_iters=20", "--eval_interval=10",
            "--softmax_weight=1", "--softmax_negatives=256", "--ngram_max=3", "--ngram_solve_iters=10",
            "--sample_power=0.5", "--token_weight_power=0.5"]
    straight, interrupted = workdir / "out-straight", workdir / "out-interrupted"
    succeeds(train(*args, f"--out_dir={straight}", cwd=workdir))
    stopped = train(*args, f"--out_dir={interrupted}", cwd=workdir, launcher=["-c", INTERRUPTED.format(repo=str(REPO))])
    fails_with(stopped, "interrupted at iteration 10", "ckpt.pt", "--init_from=resume")
    halfway = load(interrupted)
    assert halfway["iter_num"] == 10
    succeeds(train(*args, f"--out_dir={interrupted}", "--init_from=resume", cwd=workdir))
    a, b = load(straight), load(interrupted)
    assert a["iter_num"] == b["iter_num"] == 20
    for name, weight in a["model"].items():
        assert torch.equal(b["model"][name], weight), name
    # the second leg did train: equality above is not two copies of the halfway weights
    assert max((halfway["model"][n] - w).abs().max().item() for n, w in a["model"].items()) > 1e-4
    for a_optimizer, b_optimizer in zip(a["optimizer"], b["optimizer"], strict=True):
        assert a_optimizer["state"].keys() == b_optimizer["state"].keys()
        for param, state in a_optimizer["state"].items():
            assert all(torch.equal(torch.as_tensor(value), torch.as_tensor(b_optimizer["state"][param][k])) for k, value in state.items()), param
    assert torch.equal(a["negatives_rng"], b["negatives_rng"])


def test_the_encoder_predicts_in_units_of_the_tables_rms_row_norm(tiny_mistral, prepared_mistral, trained_mistral):
    """train.py measures the table's RMS row norm over the trained rows (model.ByteEncoderConfig.row_scale):
    the loss compares rows in that unit, and the rows predicted come back in the table's own."""
    import numpy as np
    table = torch.from_numpy(np.load(prepared_mistral.data / "embeddings.npy"))
    trained = table[torch.from_numpy(np.load(prepared_mistral.data / "train_ids.npy"))]
    checkpoint = torch.load(trained_mistral.out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert checkpoint["model_args"]["row_scale"] == pytest.approx(trained.norm(dim=1).pow(2).mean().sqrt().item(), rel=1e-6)
    assert checkpoint["model_args"]["row_scale"] != pytest.approx(1.0, abs=0.05)  # the tiny table's rows are not unit long


# the second: weights near 5e29 give a NaN eval while the training loss was still finite;
# such a checkpoint once replaced the good one
@pytest.mark.parametrize("blow_up", [["--learning_rate=1e30"], ["--learning_rate=1e30", "--min_lr=1e29", "--warmup_iters=0", "--eval_interval=1"]],
                         ids=["huge-learning-rate", "eval-every-iteration"])
def test_non_finite_loss_keeps_the_last_good_checkpoint(tiny_mistral, trained_mistral, workdir, tmp_path, blow_up):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_mistral.out_dir, out_dir)
    before = files_under(out_dir)
    proc = train(f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *TINY_TRAIN, "--init_from=resume",
                 "--max_iters=40", "--eval_interval=10", *blow_up, cwd=workdir)
    message = fails_with(proc, "training diverged", "last good checkpoint is kept", "--init_from=resume")
    assert int(re.search(r"at iteration (\d+)", message).group(1)) in range(20, 30)
    assert files_under(out_dir) == before


def test_the_checkpoint_kept_is_the_best_on_the_val_tokens(tiny_mistral, prepared_mistral, workdir, tmp_path):
    """always_save_checkpoint=False: the checkpoint is the eval with the highest val/cosine,
    not the last one, and not the one best on the held-out tokens, which are the new-token test.
    At this learning rate the numbers go up and down."""
    out_dir, log = tmp_path / "out-best", tmp_path / "evals.jsonl"
    proc = succeeds(train(f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *SHORT, "--learning_rate=3e-2",
                          "--min_lr=3e-2", "--max_iters=30", "--eval_interval=2", "--always_save_checkpoint=False",
                          f"--log_file={log}", cwd=workdir))
    evals = [json.loads(line) for line in log.read_text().splitlines()][1:]  # the eval at iteration 0 is never saved
    selection, held_out = [e["val/cosine"] for e in evals], [e["test/cosine"] for e in evals]
    best = evals[selection.index(max(selection))]["iter"]
    # or this run could tell neither best from last nor the val tokens from the test tokens
    assert best != evals[-1]["iter"] and best != evals[held_out.index(max(held_out))]["iter"], (selection, held_out)
    assert load(out_dir)["iter_num"] == best
    assert "not saved: val/cosine" in proc.stderr + proc.stdout


def test_auto_passes_mps_over_and_mps_itself_ends_in_one_sentence(monkeypatch):
    """On a Mac: device=auto trains on the CPU, and device=mps says why not and what to use."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "cpu"
    with pytest.raises(UserError, match="MPS lacks the sparse kernels the n-gram table needs; use device=cpu"):
        pick_device("mps")
