"""
Side by side, on the same prepared data and the same wall-clock budget: the prototype's
recipe (config/prototype.py) against this repo's default (config/smollm2_cpu.py, or
config/smollm2_gpu.py on a GPU). Both run through train.py unchanged, so what is timed is
what a user gets; then evaluate.py and test_mistral.py give each recipe's spliced perplexity
ratio on the two evaluation texts, the number that says whether the LM still works.

$ python bench.py                 # 10 minutes each on the CPU
$ python bench.py --minutes=2     # a quick look
"""
import json
import os
import subprocess
import sys

import torch

from configurator import UserError, check, configure
from storage import data_dir, load_checkpoint

model = "smollm2"
minutes = 10.0  # training budget of each recipe; evals are read off at 10/20/50/100% of it
baseline_config = "config/prototype.py"
default_config = "config/smollm2_gpu.py" if torch.cuda.is_available() else "config/smollm2_cpu.py"
speed_seconds = 60.0  # extra short run: the prototype recipe at the default's encoder size, for samples/s alone
out_dir = "out-bench"
configure(globals())
check(globals(), "minutes", 0, low_open=True)
check(globals(), "speed_seconds", 0, low_open=True)
if not os.path.isfile(os.path.join(data_dir(model), "meta.json")):
    raise UserError(f"no prepared data in {data_dir(model)}; run: python prepare_mistral_data.py --model={model}")
budget = 60 * minutes
report_at = [0.1, 0.2, 0.5, 1.0]
os.makedirs(out_dir, exist_ok=True)


def train(name, config_file, seconds, evals, *overrides):
    """Run train.py for `seconds` of training time, evaluating `evals` times; return the eval records."""
    log = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.exists(log):
        os.remove(log)
    cmd = [sys.executable, "train.py", config_file, f"--model={model}", f"--out_dir={os.path.join(out_dir, name)}",
           f"--max_seconds={seconds}", "--max_iters=0", "--eval_interval=0",
           f"--eval_interval_seconds={seconds / evals}", f"--log_file={log}", *overrides]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"train.py failed for {name}; its output is above")
    with open(log) as f:
        return [json.loads(line) for line in f]


def splice(name):
    """evaluate.py then test_mistral.py on a recipe's checkpoint: {text: spliced / original perplexity}."""
    folder = os.path.join(out_dir, name)
    for script in ("evaluate.py", "test_mistral.py"):
        print(f"\n== {name}: {script}", flush=True)
        if subprocess.run([sys.executable, script, f"--model={model}", f"--out_dir={folder}"]).returncode != 0:
            raise UserError(f"{script} failed for {name}; its output is above")
    with open(os.path.join(folder, "splice.json")) as f:
        return json.load(f)["ratio"]


def at(records, seconds):
    """The first eval taken once `seconds` of training had passed."""
    return next((r for r in records if r["seconds"] >= seconds * 0.999), records[-1])


def samples_per_second(records):
    return records[-1]["samples"] / records[-1]["seconds"]


baseline = train("prototype", baseline_config, budget, 20)
default = train("default", default_config, budget, 20)
# the same encoder as the default, trained the prototype's way: isolates what batching and padding give
default_ckpt = load_checkpoint(os.path.join(out_dir, "default"))
size = {k: default_ckpt["model_args"][k] for k in ("n_layer", "n_head", "n_embd", "head_hidden")}
same_size = train("prototype_same_size", baseline_config, speed_seconds, 1, *(f"--{k}={v}" for k, v in size.items()))
ratios = {name: splice(name) for name in ("prototype", "default")}

device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {os.cpu_count()} cores"
print(f"\n## {model}, {minutes:g} minutes of training each, {device}\n")
texts = list(ratios["default"])
header = "| recipe | params | peak MB | samples/s | " + " | ".join(
    f"{f * minutes:g} min top-1 / cos / val cos / text expl." for f in report_at) + " | " + " | ".join(
    f"splice ratio, {text}" for text in texts) + " |"
print(header)
print("|" + " --- |" * (header.count("|") - 1))
for name, records in (("prototype", baseline), ("default", default)):
    cells = [f"{100 * r['train/top1']:.2f}% / {r['train/cosine']:.3f} / {r['val/cosine']:.3f} / {r['text/explained']:.3f}"
             for r in (at(records, f * budget) for f in report_at)]
    cells += [f"{ratios[name][text]:.2f}x" for text in texts]
    print(f"| {name} | {records[-1]['params'] / 1e6:.2f}M | {records[-1]['peak_mb']} | {samples_per_second(records):.0f} | "
          + " | ".join(cells) + " |")

target = baseline[-1]["train/cosine"]
reached = next((r for r in default if r["train/cosine"] >= target), None)
print(f"\nsamples/s, default over prototype: {samples_per_second(default) / samples_per_second(baseline):.1f}x "
      f"(same encoder size: {samples_per_second(default) / samples_per_second(same_size):.1f}x, "
      f"prototype recipe at the default's size ran {samples_per_second(same_size):.0f} samples/s)")
if reached:
    print(f"default reached the prototype's final train cosine {target:.3f} after {reached['seconds']:.0f} s: "
          f"{reached['seconds'] / budget:.3f} of the prototype's budget (val cosine then {reached['val/cosine']:.3f} "
          f"vs the prototype's final {baseline[-1]['val/cosine']:.3f})")
else:
    print(f"default never reached the prototype's final train cosine {target:.3f}")
