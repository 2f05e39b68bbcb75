"""
train_e2e.py, the second stage through the frozen LM, as a user runs it on the tiny Mistral:
it lowers the KL divergence between the LM's next-token distributions with its own rows and
with the encoder's, leaves the LM's files as they were, and writes a checkpoint that the
other scripts still accept.
"""
import shutil

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lm import load_tokenizer, training_text
from model import PAD
from storage import data_identity, load_checkpoint, load_data, load_encoder
from helpers import ONE_THREAD, fails_with, files_under, run_script, succeeds


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
