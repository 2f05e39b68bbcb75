"""
train_e2e.py, the second stage through the frozen LM, as a user runs it on the tiny Mistral:
it lowers the KL divergence between the LM's next-token distributions with its own rows and
with the encoder's, leaves the LM's files as they were, never predicts a held-out token's row
in a window, and writes a checkpoint that the other scripts still accept.
"""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lm import load_tokenizer, training_text
from model import PAD
from storage import data_identity, load_checkpoint, load_data, load_encoder
from helpers import ONE_THREAD, TINY_TRAIN, fails_with, files_under, run_script, succeeds


@torch.no_grad()
def kl_on_the_first_windows(model_folder, out_dir, windows=4, context=64):
    """The stage's own measure, computed here: mean KL(LM with its rows || LM with predicted rows)."""
    data = load_data(str(model_folder))
    encoder = load_encoder(load_checkpoint(str(out_dir), data_identity(data)), "cpu").eval()
    lm = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    ids = load_tokenizer(model_folder)(training_text(), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[:windows * context]).view(windows, context)
    tokens, where = batch.unique(return_inverse=True)
    spelled = data.input_ids[tokens]
    rows, _ = encoder(spelled[:, :int((spelled != PAD).sum(1).max())])
    teacher = F.log_softmax(lm(input_ids=batch).logits, dim=-1)
    student = F.log_softmax(lm(inputs_embeds=rows[where]).logits, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean().item()


def test_e2e_lowers_the_kl_and_keeps_the_lm(tiny_mistral, trained_mistral, workdir, tmp_path, monkeypatch):
    out_dir = tmp_path / "out-e2e"
    out_dir.mkdir()
    shutil.copy(trained_mistral.out_dir / "ckpt.pt", out_dir / "ckpt.pt")
    monkeypatch.chdir(workdir)  # data/<name>/ is found from there, as the scripts find it
    before = kl_on_the_first_windows(tiny_mistral.folder, out_dir)
    lm_files = files_under(tiny_mistral.folder)
    # the KL alone (no MSE anchor), so the loss is exactly the measure; a random tiny LM barely
    # depends on its input rows, so the KL is small and falls slowly (measured: by about 30%)
    proc = succeeds(run_script("train_e2e.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", "--e2e_seconds=20",
                               "--e2e_context=64", "--e2e_learning_rate=3e-3", "--mse_weight=0", cwd=workdir, env=ONE_THREAD))
    after = kl_on_the_first_windows(tiny_mistral.folder, out_dir)
    assert after < 0.85 * before, (before, after)
    checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert checkpoint["e2e"]["steps"] > 0 and f"{checkpoint['e2e']['steps']} steps in" in proc.stdout
    assert files_under(tiny_mistral.folder) == lm_files


def test_e2e_without_a_checkpoint_is_one_sentence(tiny_mistral, prepared_mistral, workdir, tmp_path):
    fails_with(run_script("train_e2e.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'none'}", cwd=workdir),
               "no checkpoint")


@pytest.fixture(scope="module")
def mostly_held_out(tiny_mistral, workdir, tmp_path_factory):
    """A copy of the tiny Mistral with all but 16 tokens held out, in a split (seed 37) in which
    none of the 16 occurs in the training text, and a checkpoint of 2 iterations on it."""
    folder = tmp_path_factory.mktemp("models") / "mostly-held-out"
    shutil.copytree(tiny_mistral.folder, folder)
    out_dir = folder.parent / "out-held-out"
    succeeds(run_script("prepare_mistral_data.py", f"--model={folder}", "--val_fraction=0.9995", "--seed=37", cwd=workdir))
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
    assert not text_tokens & set(data.train_ids.tolist()) and len(text_tokens & set(data.val_ids.tolist())) > 1000
    succeeds(run_script("train_e2e.py", f"--model={folder}", f"--out_dir={out_dir}", "--e2e_seconds=3", "--e2e_context=64",
                        "--mse_weight=0", cwd=workdir, env=ONE_THREAD))
    checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert checkpoint["e2e"]["steps"] > 0 and checkpoint["e2e"]["last_kl"] < 1e-6, checkpoint["e2e"]


def test_a_chat_template_that_cannot_render_the_turns_is_one_sentence(mostly_held_out, workdir):
    """Some templates refuse an assistant turn or a role they do not know; the chat windows then
    cannot be made, and the user is told to leave them out."""
    config_file = mostly_held_out.folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": "{{ raise_exception('only user turns') }}"}))
    try:
        proc = run_script("train_e2e.py", f"--model={mostly_held_out.folder}", f"--out_dir={mostly_held_out.out_dir}",
                          "--e2e_seconds=1", cwd=workdir, env=ONE_THREAD)
        fails_with(proc, "chat template", "only user turns", "--e2e_chat_share=0")
        succeeds(run_script("train_e2e.py", f"--model={mostly_held_out.folder}", f"--out_dir={mostly_held_out.out_dir}",
                            "--e2e_seconds=1", "--e2e_chat_share=0", cwd=workdir, env=ONE_THREAD))
    finally:
        config_file.write_text(json.dumps(config))
