"""
What the tests share: the tiny Mistral's constants, and running the repository's scripts
the way a user does and checking how they end.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Mistral-7B-v0.1 has zero or near-zero rows for byte-fallback tokens that never occur, since
# a normal token with the same bytes always wins: <0x41> (id 68) is the byte "A", and so is
# the normal token "A" (id 28741)
BYTE_A, TOKEN_A = 68, 28741
ZEROED = [BYTE_A, 100, 29000]  # <0x41>, <0x61> ("a"), and a normal token the LM never saw
SHRUNK = [30000]  # not zero, but far below every trained row's norm
TINY_TRAIN = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--head_hidden=64", "--batch_size=32",
              "--gradient_accumulation_steps=1", "--eval_tokens=512"]


def mistral_tokenizer_model():
    """Mistral-7B-v0.1's tokenizer.model, found without importing mistral_common."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.fail("mistral-common is not installed; run: make install")
    return os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1")


def script_env(**extra):
    """The user's environment, offline: nothing may come from the Hugging Face hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def run_script(script, *args, cwd, env=None, timeout=600):
    """`python <script> --key=value ...` from cwd; data/ lands in cwd, as for a user."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)


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
