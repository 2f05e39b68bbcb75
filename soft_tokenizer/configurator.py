"""
Settings for every script, nanoGPT style: the hyperparameters are the globals at the top of
the script, a config file (plain Python, run as code: only use your own) sets any of them,
and `--key=value` overrides one. A mistake the user can fix ends in one sentence, not a
traceback.

$ python train.py config/smollm2_cpu.py --batch_size=128
"""
import ast
import math
import os
import sys

import torch
from tqdm import tqdm


class UserError(Exception):
    """A mistake the user can fix: the script prints its one sentence and exits 1."""


def _one_sentence(kind, error, tb):
    if issubclass(kind, UserError):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.__excepthook__(kind, error, tb)


# scripts raise UserError wherever they find the mistake, module level included
sys.excepthook = _one_sentence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the scripts are
# the scripts that read config files; a key none of them declares is a typo, not another script's option
SCRIPTS = ("prepare_mistral_data.py", "train.py", "train_e2e.py", "evaluate.py", "test_mistral.py", "tokens.py", "bench.py", "gpu_check.py", "finetune.py")


def settings_of(source):
    """The statements of a script that set its options: its module-level assignments to
    lowercase names before it calls configure()."""
    settings = []
    for node in ast.parse(source).body:
        if "configure(" in ast.unparse(node):
            break
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and not t.id.isupper() for t in node.targets):
            settings.append(node)
    return settings


def declared_options():
    """Every option some script declares."""
    names = set()
    for script in SCRIPTS:
        with open(os.path.join(REPO, script), encoding="utf-8") as f:
            for node in settings_of(f.read()):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def print_help(config):
    """`python train.py --help`: the script's docstring, then its settings as the script sets
    them, with their comments, since the source is where a researcher changes them."""
    print((config.get("__doc__") or "").strip())
    with open(config["__file__"], encoding="utf-8") as f:
        lines = f.read().splitlines()
    settings = settings_of("\n".join(lines))
    if not settings:
        return
    first = settings[0].lineno - 1
    while first > 0 and lines[first - 1].startswith("#") and not lines[first - 1].startswith("# ---"):
        first -= 1  # the comment that introduces the first setting
    print("\nsettings (change them here, in a config file, or as --key=value):\n")
    print("\n".join(line for line in lines[first:settings[-1].end_lineno] if not line.startswith(("import ", "from "))))


def configure(config, argv=None):
    """Apply a config file and --key=value overrides to the dict of a script's globals."""
    # UPPERCASE globals are constants (PAD), not options
    known = {k for k, v in config.items() if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, type(None)))}
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_help(config)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg} does not exist; pass a path such as config/smollm2_cpu.py")
            with open(arg) as f:
                source = f.read()
            try:
                exec(compile(source, arg, "exec"), {}, values := {})
            except Exception as e:
                raise UserError(f"config file {arg} failed to run ({type(e).__name__}: {e}); fix it, it is plain Python") from None
            # a config file may also set keys that only other scripts use, so one file serves them all
            values = {k: v for k, v in values.items() if not k.startswith("_") and not isinstance(v, type(os))}
            unknown = sorted(set(values) - known - declared_options())
            if unknown:
                raise UserError(f"config file {arg} sets {', '.join(unknown)}, which no script declares; fix the name "
                                f"(the options are the globals at the top of each script)")
            config.update({k: v for k, v in values.items() if k in known})
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep or key not in known:
            raise UserError(f"unknown option {arg}; the options are the globals at the top of the script: {', '.join(sorted(known))}")
        config[key] = parse_value(value, config[key], key)


def parse_value(text, current, key):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--{key} takes True or False, not {text!r}")
    if isinstance(current, (int, float)):
        try:
            value = float(text) if isinstance(current, float) or "." in text or "e" in text.lower() else int(text)
        except ValueError:
            raise UserError(f"--{key} takes a number, not {text!r}") from None
        return float(value) if isinstance(current, float) else value
    return None if text == "None" else text


def check(config, key, low=None, high=None, *, low_open=False, high_open=False):
    """A numeric setting must be finite and inside its range; else one sentence naming it."""
    value = config[key]
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise UserError(f"{key}={value} is out of range; it must be {' and '.join(s for s in (left, right) if s)}")


def pick_device(device, local_rank=0):
    """"auto" means CUDA, else the CPU; under torchrun each process takes its own GPU. Never
    MPS: it lacks the sparse kernels (sparse Embedding gradients, SparseAdam) the n-gram table
    trains with."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps":
        raise UserError("device=mps is not supported, since MPS lacks the sparse kernels the n-gram table needs; use device=cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} but this machine has no CUDA GPU; use device=auto or device=cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"device={device!r} is not known; use auto, cpu or cuda")
    return f"cuda:{local_rank}" if device == "cuda" else device


class _LineLog:
    """Where progress bars draw when stderr is a file or a pipe (`make demo > log`): each redraw
    becomes one line of its own instead of a carriage return over the last, and the prints
    made before it come out first."""

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            sys.stdout.flush()
            sys.stderr.write(text + "\n")

    def flush(self):
        sys.stderr.flush()


if not sys.stderr.isatty():
    # transformers' own bars (loading weights) read this when transformers is first imported, after this module
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def progress(iterable=None, **kwargs):
    """A tqdm bar; in a log, one line every 30 seconds (and at the end) instead of ten redraws a second."""
    if not sys.stderr.isatty():
        # maxinterval too: else tqdm's monitor thread redraws a slow bar every 10 s
        kwargs = {**kwargs, "file": _LineLog(), "mininterval": 30.0, "maxinterval": 30.0, "dynamic_ncols": False, "ncols": 100}
    return tqdm(iterable, **kwargs)
