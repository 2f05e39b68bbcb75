"""
The whole recipe against the prototype's, at equal training time, judged by the splice: for
each budget, the prototype's recipe (config/prototype.py: regression alone) trains for all of
it, and this repo's recipe (config/smollm2_cpu.py, or config/smollm2_gpu.py on a GPU) splits
it between train.py and train_e2e.py as `make demo` does. Every run goes through the scripts
unchanged, then evaluate.py and test_mistral.py give its spliced perplexity ratio on the two
evaluation texts and its answer. Each budget is a run of its own, so each point is what a
user with that many minutes gets (its learning rate decays over its own budget). Both recipes
get the same `compile`, whatever their config files say, so neither is faster for it alone.

$ python bench.py                   # 2.5, 5 and 10 minutes each (35 minutes of training in all)
$ python bench.py --minutes=4       # 1, 2 and 4 minutes
Writes out-bench/bench.json and out-bench/bench.png (splice ratio against training minutes).
"""
import json
import os
import subprocess
import sys

import matplotlib
import torch

from soft_tokenizer.configurator import UserError, check, configure
from soft_tokenizer.storage import data_dir, write_text_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

model = "smollm2"
minutes = 10.0  # the largest budget of training time per recipe
fractions = "0.25,0.5,1"  # the budgets, as shares of minutes
e2e_share = 0.5  # of this repo's recipe's budget, the end-to-end stage's share (make demo: 5 + 5 minutes)
baseline_config = "config/prototype.py"
default_config = "config/smollm2_gpu.py" if torch.cuda.is_available() else "config/smollm2_cpu.py"
out_dir = "out-bench"
# train.py's torch.compile (CUDA only; the step that compiles is not training time). Off: it was
# only ever tried on the hashed n-gram table the solved vectors replaced, whose sparse gradient broke its graph
compile = False
configure(globals())
REPO = os.path.dirname(os.path.abspath(__file__))  # the scripts it runs; data/ and out_dir are found from where it is run
check(globals(), "minutes", 0, low_open=True)
check(globals(), "e2e_share", 0, 1, low_open=True, high_open=True)
try:
    budgets = sorted(float(f) * minutes for f in fractions.split(","))
except ValueError:
    raise UserError(f"fractions={fractions!r} must be numbers separated by commas, such as 0.25,0.5,1") from None
if not budgets or budgets[0] <= 0:
    raise UserError(f"fractions={fractions!r} must be positive shares of minutes, such as 0.25,0.5,1")
if not os.path.isfile(os.path.join(data_dir(model), "meta.json")):
    raise UserError(f"no prepared data in {data_dir(model)}; run: python prepare_mistral_data.py --model={model}")
os.makedirs(out_dir, exist_ok=True)


def run(name, script, *args):
    cmd = [sys.executable, os.path.join(REPO, script), *args, f"--model={model}"]
    print(f"\n== {name}: {' '.join([script, *cmd[2:]])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"{script} failed for {name}; its output is above")


def recipe(name, config_file, budget_minutes, e2e):
    """Train one recipe for budget_minutes of training time in a fresh folder, splice it, and
    return what bench.json keeps of it."""
    folder = os.path.join(out_dir, f"{name}-{budget_minutes:g}min")
    for stale in ("ckpt.pt", "e2e.pt"):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))  # a rerun is a new measurement, never a resume
    seconds = 60 * budget_minutes
    log = os.path.join(folder, "train.jsonl")
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(log):
        os.remove(log)
    regression = seconds * (1 - e2e_share) if e2e else seconds
    run(name, "train.py", config_file, f"--out_dir={folder}", f"--max_seconds={regression}", "--max_iters=0",
        "--eval_interval=0", f"--eval_interval_seconds={regression / 4}", f"--log_file={log}", f"--compile={compile}")
    if e2e:
        run(name, "train_e2e.py", config_file, f"--out_dir={folder}", f"--e2e_seconds={seconds * e2e_share}")
    for script in ("evaluate.py", "test_mistral.py"):
        run(name, script, config_file, f"--out_dir={folder}")
    with open(log) as f:
        last = [json.loads(line) for line in f][-1]
    with open(os.path.join(folder, "splice.json")) as f:
        splice = json.load(f)
    with open(os.path.join(folder, "eval.json")) as f:
        evaluation = json.load(f)
    return {"recipe": name, "minutes": budget_minutes, "params": last["params"], "regression_samples_s": last["samples"] / last["seconds"],
            "ratio": splice["ratio"], "answer": splice["answer"]["spliced"], "checkpoint": splice["checkpoint"],
            "held_out_cosine": evaluation["groups"]["held-out"]["cosine"]}


results = [recipe(name, config_file, m, e2e) for m in budgets
           for name, config_file, e2e in (("prototype", baseline_config, False), ("default", default_config, True))]

device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {os.cpu_count()} cores"
texts = list(results[0]["ratio"])
print(f"\n## {model}, {device}: {baseline_config} against {default_config} ({1 - e2e_share:g} regression, {e2e_share:g} end to end; compile={compile})\n")
header = "| recipe | training minutes | encoder params | regression samples/s | " + " | ".join(
    f"splice ratio, {text}" for text in texts) + " | held-out cosine | spliced answer |"
print(header)
print("|" + " --- |" * (header.count("|") - 1))
for r in results:
    print(f"| {r['recipe']} | {r['minutes']:g} | {r['params'] / 1e6:.1f}M | {r['regression_samples_s']:.0f} | "
          + " | ".join(f"{r['ratio'][text]:.2f}x" for text in texts) + f" | {r['held_out_cosine']:.3f} | {r['answer'][:60]!r} |")

figure, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4), squeeze=False)
for ax, text in zip(axes[0], texts):
    for name in ("prototype", "default"):
        points = [(r["minutes"], r["ratio"][text]) for r in results if r["recipe"] == name]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="training minutes", ylabel="spliced / original perplexity", yscale="log", title=text[:50])
    ax.legend()
figure.suptitle(f"{model}, {device}")
figure.tight_layout()
figure.savefig(os.path.join(out_dir, "bench.png"), dpi=120)
write_text_file(os.path.join(out_dir, "bench.json"), json.dumps({"model": model, "device": device, "e2e_share": e2e_share, "compile": compile,
                                                                 "configs": [baseline_config, default_config], "runs": results}, indent=1) + "\n")
print(f"\nwrote {out_dir}/bench.json and {out_dir}/bench.png")
