"""
The whole recipe once on a GPU, timed stage by stage, in one table: prepare, train.py,
train_e2e.py, evaluate.py, test_mistral.py, each run as a user runs it (config/smollm2_gpu.py,
the LM in bfloat16 on CUDA). It has never run on a GPU: how long it takes there is what it is for.
Steps and samples/s are the last step's, from train.py's log, not the kept checkpoint's.

$ python gpu_check.py                     # prepare if needed, 2.5 + 2.5 minutes of training
$ python gpu_check.py --minutes=10        # a 10-minute budget
"""
import json
import os
import subprocess
import sys
import time

import torch

from soft_tokenizer.configurator import UserError, check, configure
from soft_tokenizer.storage import STAGE_FILES, data_dir, read_checkpoint

model = "smollm2"
config_file = "config/smollm2_gpu.py"
out_dir = "out-gpu-check"
minutes = 5.0  # training time, regression and end to end together
e2e_share = 0.5  # the end-to-end stage's share of it
configure(globals())
REPO = os.path.dirname(os.path.abspath(__file__))  # the scripts it runs; data/ and out_dir are found from where it is run
check(globals(), "minutes", 0, low_open=True)
check(globals(), "e2e_share", 0, 1, low_open=True, high_open=True)
if not torch.cuda.is_available():
    print("note: no CUDA GPU here; the check runs on the CPU, and its times say nothing about a GPU")
for stale in STAGE_FILES.values():
    if os.path.exists(os.path.join(out_dir, stale)):
        raise UserError(f"{out_dir}/{stale} is from an earlier check; delete {out_dir} or pass another --out_dir")
stages = {}


def run(script, *args):
    cmd = [sys.executable, os.path.join(REPO, script), config_file, f"--model={model}", *args]
    print(f"\n== {' '.join([script, *cmd[2:]])}", flush=True)
    started = time.time()
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"{script} failed; its output is above")
    stages[script] = time.time() - started


started = time.time()
if not os.path.isfile(os.path.join(data_dir(model), "meta.json")):
    run("prepare_mistral_data.py")
seconds = 60 * minutes
# the steps and samples/s reported are the last line of train.py's log, the last step's (there
# is always an eval at the end), not the checkpoint's: it keeps the step best on the val tokens
log = os.path.join(out_dir, "train.jsonl")
if os.path.exists(log):
    os.remove(log)  # train.py appends to it
run("train.py", f"--out_dir={out_dir}", f"--max_seconds={seconds * (1 - e2e_share)}", "--max_iters=0", f"--log_file={log}")
run("train_e2e.py", f"--out_dir={out_dir}", f"--e2e_seconds={seconds * e2e_share}")
run("evaluate.py", f"--out_dir={out_dir}")
run("test_mistral.py", f"--out_dir={out_dir}")

with open(log) as f:
    last = json.loads(f.read().splitlines()[-1])
e2e = read_checkpoint(os.path.join(out_dir, STAGE_FILES["e2e"]))["e2e"]
with open(os.path.join(out_dir, "eval.json")) as f:
    groups = json.load(f)["groups"]
with open(os.path.join(out_dir, "splice.json")) as f:
    splice = json.load(f)
device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {os.cpu_count()} cores"
rows = [("prepare_mistral_data.py", stages.get("prepare_mistral_data.py"), "data/ was there already" if "prepare_mistral_data.py" not in stages else ""),
        ("train.py", stages["train.py"], f"{last['iter']} steps, {last['samples'] / last['seconds']:.0f} samples/s"),
        ("train_e2e.py", stages["train_e2e.py"], f"{e2e['steps']} steps, {e2e['seconds'] / e2e['steps']:.2f} s a step"),
        ("evaluate.py", stages["evaluate.py"], f"held-out cosine {groups['held-out']['cosine']:.3f}, in-text cosine {groups['in text']['cosine']:.3f}"),
        ("test_mistral.py", stages["test_mistral.py"], ", ".join(f"{ratio:.3f}x" for ratio in splice["ratio"].values())
         + f" ({splice['dtype']}); {splice['answer']['spliced'][:60]!r}")]
print(f"\n## {model} on {device}: {minutes:g} minutes of training ({config_file}), {time.time() - started:.0f} s in all\n")
print("| stage | wall seconds | result |\n| --- | ---: | --- |")
for stage, wall, result in rows:
    print(f"| {stage} | {'' if wall is None else f'{wall:.0f}'} | {result} |")
print(f"\nsplice ratio on: {', '.join(splice['ratio'])}")
