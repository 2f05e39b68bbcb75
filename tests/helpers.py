"""
What the tests share: the tiny Mistral's constants, and running the repository's scripts
the way a user does and checking how they end.
"""
import gc
import io
import os
import runpy
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Mistral-7B-v0.1 has zero or near-zero rows for byte-fallback tokens that never occur, since
# a normal token with the same bytes always wins: <0x41> (id 68) is the byte "A", and so is
# the normal token "A" (id 28741)
BYTE_A, TOKEN_A = 68, 28741
ZEROED = [BYTE_A, 100, 29000]  # <0x41>, <0x61> ("a"), and a normal token the LM never saw
SHRUNK = [30000]  # not zero, but far below every trained row's norm
# the plain recipe the tests train with, whatever train.py's defaults (the CPU demo's): a budget in
# iterations, evals by iteration only, every eval saved, no n-grams, each token once an epoch
PLAIN = ["--eval_interval_seconds=0", "--always_save_checkpoint=True", "--ngram_max=0", "--sample_power=0",
         "--lm_share_tokens=0", "--softmax_weight=0", "--l1_weight=1", "--mse_weight=1"]
# a small encoder that learns a spelled table (spelled_rows) well in a test's time
SPELLING_ENCODER = [*PLAIN, "--n_layer=2", "--n_embd=64", "--n_head=2", "--head_hidden=256", "--batch_size=256",
                    "--gradient_accumulation_steps=1", "--eval_sample=256", "--max_iters=500", "--eval_interval=500",
                    "--learning_rate=5e-3", "--min_lr=5e-4", "--warmup_iters=20", "--l1_weight=0"]
# the LM's own text that prepare samples, cut to a few windows: on the real LMs and the large
# vocabularies the default's 20,000 tokens would take minutes, on the tiny Mistral seconds each time
SMALL_SAMPLE = ["--sample_windows_train=4", "--sample_windows_selection=2", "--sample_length=64"]
TINY_TRAIN = [*PLAIN, "--n_layer=1", "--n_embd=32", "--n_head=2", "--head_hidden=64", "--batch_size=32",
              "--gradient_accumulation_steps=1", "--eval_sample=512"]


def spelled_rows(byte_strings, dim, seed, noise=0.3):
    """A table in which spelling decides the row, as it partly does in a trained LM: the sum of
    random vectors of a token's bytes, plus noise of its own. A random table has nothing a byte
    encoder could learn in a test's time. noise=0 with the same seed: what the spelling alone
    says, the row a repair from the bytes should come close to."""
    g = torch.Generator().manual_seed(seed)
    byte_vectors = torch.randn(256, dim, generator=g)
    rows = torch.empty(len(byte_strings), dim)
    for i, data in enumerate(byte_strings):
        rows[i] = 0.3 * (byte_vectors[list(data)].sum(0) / len(data) ** 0.5 + noise * torch.randn(dim, generator=g))
    return rows


def script_env(**extra):
    """The user's environment, offline: nothing may come from the Hugging Face hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


# tiny matrices: one thread is faster than two fighting other processes for the cores
ONE_THREAD = script_env(OMP_NUM_THREADS="1")


def stock_load(folder):
    """What a user of a written model folder does. fix_mistral_regex=False only skips transformers'
    probe for Mistral's tekken format, which needs parts of mistral-common that `make install` leaves out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, fix_mistral_regex=False)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def generates(lm, tokenizer, inputs):
    """Greedy generation adds three tokens; inputs is a text or what a chat template gave."""
    if isinstance(inputs, str):
        inputs = tokenizer(inputs, return_tensors="pt")
    out = lm.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def run_script(script, *args, cwd, env=None, timeout=600):
    """`python <script> --key=value ...` from cwd; data/ lands in cwd, as for a user."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(script, *args, cwd):
    """A script's run inside the test process: its own code from the top, as a user runs it,
    without the seconds a new Python spends importing torch and transformers.
    Returns what run_script returns, the sentence as the scripts' excepthook prints it, so
    fails_with reads both alike (test_errors.py checks that hook once, in a real process)."""
    from soft_tokenizer.configurator import UserError
    out, err, returncode = io.StringIO(), io.StringIO(), 0
    argv, here = sys.argv, os.getcwd()
    sys.argv = [str(REPO / script), *map(str, args)]
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except UserError as error:
        err.write(f"error: {error}\n")
        returncode = 1
    except SystemExit as stop:
        # as a process exits: SystemExit() and SystemExit(0) are success, a message is status 1
        returncode = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except Exception:
        err.write(traceback.format_exc())
        returncode = 1
    finally:
        sys.argv = argv
        os.chdir(here)
        # what a process lets go of when it exits: the script's globals, and with them an
        # out_dir's lock (storage.claim_out_dir), held by frames the traceback kept in a cycle
        gc.collect()
    return subprocess.CompletedProcess(sys.argv, returncode, out.getvalue(), err.getvalue())


def succeeds(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def fails_with(proc, *words):
    """A mistake the user can make ends in exit 1 and one sentence, never a traceback.
    Returns that sentence."""
    assert proc.returncode == 1, f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-5000:]
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


def files_under(folder):
    """Every file below folder with its bytes, to show that a failed run changed nothing."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class OwnRows(torch.nn.Module):
    """An 'encoder' that answers every token with the LM's own row: what a perfect one would do.
    It reads ids, not bytes: row i of the byte rows it is given is [1000 + i] (never PAD)."""
    def __init__(self, table):
        super().__init__()
        self.table = table
        self.scale = torch.nn.Parameter(torch.ones(()))
        from model import ByteEncoderConfig
        self.config = ByteEncoderConfig(row_scale=table.norm(dim=1).pow(2).mean().sqrt().item())

    @staticmethod
    def byte_rows(vocab_size):
        return torch.arange(vocab_size)[:, None] + 1000

    def forward(self, idx, fvt=None):  # fvt: what an encoder reading FVT's row is handed; this one needs none
        return self.scale * self.table[idx[:, 0] - 1000], None


def first_windows(tokenizer, windows=2, context=32):
    """[windows, context] token ids from the start of the training text."""
    from soft_tokenizer.lm import training_text
    ids = tokenizer(training_text()[:20000], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:windows * context]).view(windows, context)


def assert_own_table_changes_nothing(lm, windows):
    """The identity splice: the LM's own table spliced in gives the same logits, and the e2e loss
    of its own rows (handed over as inputs_embeds, scaled as the LM scales them) is zero, both
    through the KL and through the residual stream after the first layer."""
    from soft_tokenizer.e2e import e2e_loss
    from soft_tokenizer.splice import splice_rows
    lm.eval().requires_grad_(False)
    with torch.no_grad():
        before = lm(input_ids=windows).logits
        table = lm.get_input_embeddings().weight.detach().clone()
        splice_rows(lm, table)
        assert torch.equal(lm(input_ids=windows).logits, before)
    for hidden_layers in (0, 1):  # the KL, and the residual stream after the first layer
        loss, match, mse = e2e_loss(OwnRows(table), lm, windows, OwnRows.byte_rows(len(table)), table,
                                    torch.zeros(len(table), dtype=torch.bool), windows[0, :8], 100.0, hidden_layers)
        assert match.item() < 1e-6 and mse.item() == 0.0, (hidden_layers, match.item(), mse.item())
