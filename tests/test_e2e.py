"""
train_e2e.py, the second stage through the frozen LM, as a user runs it on the tiny Mistral:
on its default path (the residual stream after the first 4 layers, all 2 of the tiny LM's) it
lowers that error and with it the KL divergence of the LM's next-token distributions, writes
e2e.pt and never touches train.py's ckpt.pt or the LM, saves as it goes and resumes, refuses
to stack on itself, and never predicts a held-out token's row in a window. The loss itself
(e2e.py) is checked in-process here, both measures, steps on each lowering it, and, on every
LM, in tests/test_identity.py (the LM's own rows give a loss of zero).
"""
import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from soft_tokenizer.e2e import e2e_loss
from soft_tokenizer.configurator import UserError
from soft_tokenizer.lm import hidden_after, load_tokenizer, training_text
from model import PAD
from soft_tokenizer.storage import data_identity, load_checkpoint, load_data, load_encoder
from helpers import ONE_THREAD, REPO, TINY_TRAIN, fails_with, files_under, run_in_process, run_script, succeeds

E2E = ["--e2e_context=64", "--mse_weight=0"]

# `python -c` program: train_e2e.py as a user runs it, interrupted (as by Ctrl-C) in its third step
INTERRUPTED = """
import runpy, sys
sys.path.insert(0, {repo!r})
from soft_tokenizer import e2e
loss, calls = e2e.e2e_loss, []
def interrupt_in_the_third_step(*args):
    calls.append(1)
    if len(calls) == 3:
        raise KeyboardInterrupt
    return loss(*args)
e2e.e2e_loss = interrupt_in_the_third_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def e2e_run(model_folder, out_dir, *args, cwd, launcher=None):
    if launcher is None:
        return run_script("train_e2e.py", f"--model={model_folder}", f"--out_dir={out_dir}", *E2E, *args, cwd=cwd, env=ONE_THREAD)
    return subprocess.run([sys.executable, "-c", launcher, str(REPO / "train_e2e.py"), f"--model={model_folder}", f"--out_dir={out_dir}",
                           *E2E, *args], cwd=cwd, env=ONE_THREAD, capture_output=True, text=True, timeout=600)


def windows_of_the_training_text(model_folder, windows=4, context=64):
    ids = load_tokenizer(model_folder)(training_text(), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:windows * context]).view(windows, context)


@torch.no_grad()
def measures_on_the_first_windows(model_folder, out_dir):
    """The stage's two measures, computed here on every token of the first windows: the mean
    KL(LM with its rows || LM with predicted rows), and the mean relative error of the residual
    stream after all the LM's layers, |h - h_own|^2 / |h_own|^2."""
    data = load_data(str(model_folder))
    encoder = load_encoder(load_checkpoint(str(out_dir), data_identity(data)), "cpu").eval()
    lm = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    batch = windows_of_the_training_text(model_folder)
    tokens, where = batch.unique(return_inverse=True)
    spelled = data.input_ids[tokens]
    rows, _ = encoder(spelled[:, :int((spelled != PAD).sum(1).max())])
    teacher = F.log_softmax(lm(input_ids=batch).logits, dim=-1)
    student = F.log_softmax(lm(inputs_embeds=rows[where]).logits, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean().item()
    layers = len(lm.model.layers)
    own, ours = hidden_after(lm, layers, input_ids=batch), hidden_after(lm, layers, inputs_embeds=rows[where])
    return SimpleNamespace(kl=kl, hidden=((ours - own) ** 2).sum(-1).div(own.pow(2).sum(-1)).mean().item())


def e2e_record(out_dir):
    return torch.load(out_dir / "e2e.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def out_dir(trained_mistral, tmp_path):
    """A copy of the tiny Mistral's regression out_dir, for one e2e stage."""
    out_dir = tmp_path / "out-e2e"
    out_dir.mkdir()
    shutil.copy(trained_mistral.out_dir / "ckpt.pt", out_dir / "ckpt.pt")
    return out_dir


def test_e2e_on_its_default_path_lowers_the_residual_stream_error_and_the_kl_writes_its_own_checkpoint_and_keeps_the_lm(
        tiny_mistral, workdir, out_dir, monkeypatch):
    monkeypatch.chdir(workdir)  # data/<name>/ is found from there, as the scripts find it
    before = measures_on_the_first_windows(tiny_mistral.folder, out_dir)
    lm_files, regression = files_under(tiny_mistral.folder), (out_dir / "ckpt.pt").read_bytes()
    # the default path: the residual stream after 4 layers, which the 2-layer LM cuts to 2, alone (no
    # MSE anchor, no KL share). After all the layers it fixes the logits, so the KL falls with it,
    # if less, and later: 40 steps took the error to 0.43x with the KL still 4% above where it
    # started, so 120 (the KL path itself is test_steps_on_each_measure_lower_it)
    proc = succeeds(e2e_run(tiny_mistral.folder, out_dir, "--e2e_steps=120", "--e2e_learning_rate=3e-3", cwd=workdir))
    assert "fewer than e2e_hidden_layers=4; matching after all of them" in proc.stdout
    assert "step 0: matching the LM's residual stream after 2 layers" in proc.stdout and "(KL)" not in proc.stdout
    after = measures_on_the_first_windows(tiny_mistral.folder, out_dir)  # the last stage: e2e.pt
    assert after.hidden < 0.6 * before.hidden and after.kl < before.kl, (before, after)
    assert "\r" not in proc.stderr  # piped into a log, the progress bar writes lines
    record = e2e_record(out_dir)
    assert record["e2e"]["hidden_layers"] == 2 and record["e2e"]["kl_share"] == 0.0
    # three of each step's four windows are the LM's own text that prepare sampled, cut to the context
    # (the fourth would be chat turns; this tokenizer has no chat template, so it is the training text)
    assert record["e2e"]["sample_windows"] == 3 and "4 of the LM's own text, 4 windows a step (0 chat, 3 the LM's)" in proc.stdout
    assert record["stage"] == "e2e" and record["e2e"]["steps"] > 0 and f"{record['e2e']['steps']} steps in" in proc.stdout
    assert record["e2e"]["parent"] == torch.load(out_dir / "ckpt.pt", weights_only=True)["id"] != record["id"]
    assert (out_dir / "ckpt.pt").read_bytes() == regression  # the regression stage's checkpoint survives
    assert files_under(tiny_mistral.folder) == lm_files


@pytest.fixture(scope="module")
def staged(trained_mistral, tiny_mistral, workdir, tmp_path_factory):
    """An out_dir holding the regression checkpoint and a 2-second e2e stage on it, made once;
    each test that starts from it takes a copy (staged_copy)."""
    out_dir = tmp_path_factory.mktemp("staged") / "out-e2e"
    out_dir.mkdir()
    shutil.copy(trained_mistral.out_dir / "ckpt.pt", out_dir / "ckpt.pt")
    succeeds(e2e_run(tiny_mistral.folder, out_dir, "--e2e_steps=8", cwd=workdir))
    return out_dir


@pytest.fixture
def staged_copy(staged, tmp_path):
    out_dir = tmp_path / "out-e2e"
    shutil.copytree(staged, out_dir)
    return out_dir


def e2e_in_process(model_folder, out_dir, *args, cwd):
    """A train_e2e.py run that must end in a user's mistake, in this process (helpers.run_in_process)."""
    return run_in_process("train_e2e.py", f"--model={model_folder}", f"--out_dir={out_dir}", *E2E, *args, cwd=cwd)


def test_e2e_refuses_to_stack_on_itself_and_resumes_when_asked(tiny_mistral, workdir, staged_copy):
    out_dir = staged_copy
    first = e2e_record(out_dir)
    before = files_under(out_dir)
    fails_with(e2e_in_process(tiny_mistral.folder, out_dir, "--e2e_steps=8", cwd=workdir), "already holds an e2e stage", "--e2e_init_from=resume")
    fails_with(e2e_in_process(tiny_mistral.folder, out_dir, "--e2e_steps=8", "--e2e_init_from=resume", cwd=workdir), "a larger --e2e_steps")
    assert files_under(out_dir) == before
    succeeds(e2e_run(tiny_mistral.folder, out_dir, "--e2e_steps=16", "--e2e_init_from=resume", cwd=workdir))
    second = e2e_record(out_dir)
    assert first["e2e"]["steps"] == 8 and second["e2e"]["steps"] == 16
    assert second["e2e"]["parent"] == first["e2e"]["parent"]


def test_ctrl_c_saves_the_stage_and_resume_continues_it(tiny_mistral, workdir, out_dir):
    proc = e2e_run(tiny_mistral.folder, out_dir, "--e2e_steps=1000", cwd=workdir, launcher=INTERRUPTED.format(repo=str(REPO)))
    fails_with(proc, "interrupted at step 2", "e2e.pt", "--e2e_init_from=resume")
    assert e2e_record(out_dir)["e2e"]["steps"] == 2
    proc = succeeds(e2e_run(tiny_mistral.folder, out_dir, "--e2e_steps=6", "--e2e_init_from=resume", cwd=workdir))
    assert "resuming" in proc.stdout and e2e_record(out_dir)["e2e"]["steps"] == 6


def test_a_new_regression_checkpoint_makes_the_e2e_stage_stale(tiny_mistral, workdir, staged_copy):
    """train.py run again: the e2e.pt in out_dir was trained from other weights. evaluate.py
    refuses it, and train_e2e.py replaces it, saying so."""
    out_dir = staged_copy
    succeeds(run_script("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=2",
                        "--eval_interval=2", cwd=workdir, env=ONE_THREAD))
    fails_with(run_in_process("evaluate.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", cwd=workdir),
               "e2e.pt was trained from an earlier", "--checkpoint=regression")
    # the new stage matches the residual stream after one layer, then the KL for its last half
    proc = succeeds(e2e_run(tiny_mistral.folder, out_dir, "--e2e_steps=4", "--e2e_hidden_layers=1", "--e2e_kl_share=0.5", cwd=workdir))
    assert "was trained from an earlier ckpt.pt" in proc.stdout
    assert "step 0: matching the LM's residual stream after 1 layers" in proc.stdout and "next-token distributions (KL)" in proc.stdout
    record = e2e_record(out_dir)["e2e"]
    assert record["parent"] == torch.load(out_dir / "ckpt.pt", weights_only=True)["id"]
    assert record["hidden_layers"] == 1 and record["kl_share"] == 0.5


def test_window_shares_that_add_up_to_more_than_a_step_are_one_sentence(tiny_mistral, workdir, tmp_path):
    fails_with(e2e_in_process(tiny_mistral.folder, tmp_path, "--e2e_sample_share=1", cwd=workdir),
               "e2e_chat_share=0.25 and e2e_sample_share=1 add up to more than all of a step's windows")


def test_e2e_without_a_checkpoint_is_one_sentence(tiny_mistral, prepared_mistral, workdir, tmp_path):
    fails_with(run_script("train_e2e.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'none'}", cwd=workdir),
               "no checkpoint")


@pytest.fixture(scope="module")
def in_process(tiny_mistral, trained_mistral, workdir):
    here = os.getcwd()
    os.chdir(workdir)
    try:
        data = load_data(str(tiny_mistral.folder))
    finally:
        os.chdir(here)
    lm = AutoModelForCausalLM.from_pretrained(tiny_mistral.folder, dtype=torch.float32).eval().requires_grad_(False)
    return SimpleNamespace(data=data, lm=lm, windows=windows_of_the_training_text(tiny_mistral.folder),
                           encoder=load_encoder(torch.load(trained_mistral.out_dir / "ckpt.pt", weights_only=True)).train())


@pytest.mark.parametrize("hidden_layers", [0, 1])
def test_e2e_loss_trains_the_encoder_only_and_frozen_tokens_read_their_own_rows(in_process, hidden_layers):
    """Both measures: the KL (hidden_layers=0) and the residual stream after the first layer."""
    data, lm = in_process.data, in_process.lm
    encoder = in_process.encoder
    none_frozen = torch.zeros(len(data.table), dtype=torch.bool)
    loss, match, _ = e2e_loss(encoder, lm, in_process.windows, data.input_ids, data.table, none_frozen, data.train_ids[:64], 1.0, hidden_layers)
    loss.backward()
    assert match.item() > 1e-4
    assert all(p.grad is None for p in lm.parameters()) and encoder.head[-1].weight.grad.abs().sum() > 0
    encoder.zero_grad(set_to_none=True)
    # every token of the windows frozen: the LM reads its own rows and the measure is exactly zero
    _, match, _ = e2e_loss(encoder, lm, in_process.windows, data.input_ids, data.table, ~none_frozen, data.train_ids[:0], 1.0, hidden_layers)
    assert match.item() < 1e-6


@pytest.mark.parametrize("hidden_layers", [0, 2])
def test_steps_on_each_measure_lower_it(in_process, hidden_layers):
    """train_e2e.py's step, in-process, again and again on two windows: the KL (hidden_layers=0)
    and the residual stream after both layers each fall when trained on (measured in 15 steps: to
    about 0.6 and 0.45 of where they started), their MSE anchor off."""
    data, lm = in_process.data, in_process.lm
    encoder = copy.deepcopy(in_process.encoder)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3, weight_decay=0.0)
    frozen = torch.ones(len(data.table), dtype=torch.bool)
    frozen[data.train_ids] = False  # as train_e2e.py: the tokens never trained on keep their own rows
    def measure():
        return e2e_loss(encoder, lm, in_process.windows[:2], data.input_ids, data.table, frozen, data.train_ids[:0], 0.0, hidden_layers)[1]
    with torch.no_grad():
        before = measure().item()
    for _ in range(15):
        measure().backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = measure().item()
    assert after < 0.7 * before, (before, after)


def test_hidden_after_stops_at_the_layer_a_full_pass_goes_through(in_process):
    """The hook's residual stream is the one the whole LM computes there (hidden_states[k] is
    the output of the k-th layer for every k below the last, which the final norm follows)."""
    lm, windows = in_process.lm, in_process.windows
    with torch.no_grad():
        full = lm(input_ids=windows, output_hidden_states=True).hidden_states
        for layers in range(1, len(lm.model.layers)):
            assert torch.allclose(hidden_after(lm, layers, input_ids=windows), full[layers], atol=1e-5)
    with pytest.raises(UserError, match="decoder layers; pick"):
        hidden_after(lm, len(lm.model.layers) + 1, input_ids=windows)


@pytest.fixture(scope="module")
def mostly_held_out(tiny_mistral, workdir, tmp_path_factory):
    """A copy of the tiny Mistral with all but 16 tokens held out, in a split (seed 37) in which
    none of the 16 occurs in the training text, and a checkpoint of 2 iterations on it."""
    folder = tmp_path_factory.mktemp("models") / "mostly-held-out"
    shutil.copytree(tiny_mistral.folder, folder)
    out_dir = folder.parent / "out-held-out"
    succeeds(run_script("prepare_mistral_data.py", f"--model={folder}", "--sample_windows_train=4", "--sample_windows_selection=2", "--test_fraction=0.9995", "--val_fraction=0",
                        "--split_seed=37", cwd=workdir))
    succeeds(run_script("train.py", f"--model={folder}", f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=2",
                        "--eval_interval=2", cwd=workdir, env=ONE_THREAD))
    return SimpleNamespace(folder=folder, out_dir=out_dir)


def test_held_out_tokens_keep_their_own_rows_in_the_windows(mostly_held_out, workdir, monkeypatch):
    """Held-out tokens are never targets, not even through the KL: no token of a window is a
    trained one here, so the LM reads its own rows everywhere and the KL is zero. (Were held-out
    rows predicted, it would not be: the first test starts from a KL well above zero.)"""
    folder, out_dir = mostly_held_out.folder, mostly_held_out.out_dir
    monkeypatch.chdir(workdir)
    data = load_data(str(folder))
    text_tokens = set(load_tokenizer(folder)(training_text(), add_special_tokens=False)["input_ids"])
    assert not text_tokens & set(data.train_ids.tolist()) and len(text_tokens & set(data.test_ids.tolist())) > 1000
    (out_dir / "e2e.pt").unlink(missing_ok=True)
    # the LM's own sampled text may hold one of the few trained tokens: the training text's windows only
    succeeds(e2e_run(folder, out_dir, "--e2e_steps=10", "--e2e_sample_share=0", cwd=workdir))
    record = e2e_record(out_dir)
    assert record["e2e"]["steps"] > 0 and record["e2e"]["last_match"] < 1e-6, record["e2e"]


def test_a_chat_template_that_cannot_render_the_turns_is_one_sentence(mostly_held_out, workdir):
    """Some templates refuse an assistant turn or a role they do not know; the chat windows then
    cannot be made, and the user is told to leave them out."""
    config_file = mostly_held_out.folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": "{{ raise_exception('only user turns') }}"}))
    (mostly_held_out.out_dir / "e2e.pt").unlink(missing_ok=True)
    try:
        proc = run_in_process("train_e2e.py", f"--model={mostly_held_out.folder}", f"--out_dir={mostly_held_out.out_dir}",
                              "--e2e_steps=3", cwd=workdir)
        fails_with(proc, "chat template", "only user turns", "--e2e_chat_share=0")
        succeeds(run_script("train_e2e.py", f"--model={mostly_held_out.folder}", f"--out_dir={mostly_held_out.out_dir}",
                            "--e2e_steps=3", "--e2e_chat_share=0", cwd=workdir, env=ONE_THREAD))
    finally:
        config_file.write_text(json.dumps(config))


def test_the_same_command_gives_the_same_table(tiny_mistral, prepared_mistral, workdir, tmp_path):
    """The demo's budgets are iterations and steps, so two runs of one command, the solve, the
    transformer's iterations and the end-to-end steps, predict the same table; a third run with
    another seed does not, so the check can fail."""
    def table(out_dir, *extra):
        common = [f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}"]
        succeeds(run_in_process("train.py", *common, *TINY_TRAIN, "--ngram_max=4", "--ngram_solve_iters=10", "--max_iters=6",
                                "--eval_interval=3", *extra, cwd=workdir))
        succeeds(run_in_process("train_e2e.py", *common, *E2E, "--e2e_steps=3", *extra, cwd=workdir))
        succeeds(run_in_process("evaluate.py", *common, cwd=workdir))
        return load_file(out_dir / "new_embeddings.safetensors")["embeddings"]
    first, second = table(tmp_path / "first"), table(tmp_path / "second")
    assert (second - first).abs().max() <= 1e-5
    assert (table(tmp_path / "other", "--seed=7") - first).abs().max() > 1e-3
