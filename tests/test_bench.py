"""
bench.py and gpu_check.py as a user runs them, on the tiny Mistral with a tiny recipe and
budgets of seconds: every stage runs through the real scripts, the prototype's recipe is
regression alone and this repo's ends on its e2e stage, and the tables, bench.json and
bench.png say what came out. What the numbers are is the scripts' own output, never a test's.
"""
import json
import math

from helpers import ONE_THREAD, PLAIN, fails_with, run_in_process, run_script, succeeds

# one config file for both recipes and both stages: train.py's tiny encoder, a short e2e window
TINY_RECIPE = "\n".join([arg[2:].replace("=", " = ", 1) for arg in PLAIN]
                        + ["n_layer = 1", "n_embd = 32", "n_head = 2", "head_hidden = 64", "batch_size = 32",
                           "eval_sample = 256", "e2e_context = 64", "e2e_windows = 2"]) + "\n"


def tiny_recipe(tmp_path):
    path = tmp_path / "tiny_recipe.py"
    path.write_text(TINY_RECIPE)
    return path


def last_line(log):
    return json.loads(log.read_text().splitlines()[-1])


def test_bench_runs_both_recipes_and_plots_the_splice(tiny_mistral, prepared_mistral, workdir, tmp_path):
    config, out_dir = tiny_recipe(tmp_path), tmp_path / "bench"
    # compile=True, not bench.py's default, so that the commands show it is passed on (train.py
    # never compiles on the CPU)
    proc = succeeds(run_script("bench.py", f"--model={tiny_mistral.folder}", "--minutes=0.05", "--fractions=1", "--compile=True",
                               f"--baseline_config={config}", f"--default_config={config}", f"--out_dir={out_dir}",
                               cwd=workdir, env=ONE_THREAD))
    trainings = [line for line in proc.stdout.splitlines() if line.startswith("== ") and ": train.py " in line]
    assert [line.split(":")[0] for line in trainings] == ["== prototype", "== default"]
    assert all("--compile=True" in line.split() for line in trainings), trainings
    report = json.loads((out_dir / "bench.json").read_text())
    runs = report["runs"]
    assert report["compile"] is True
    assert [(r["recipe"], round(r["minutes"], 6)) for r in runs] == [("prototype", 0.05), ("default", 0.05)]
    texts = list(runs[0]["ratio"])
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| prototype |", "| default |"))]
    assert len(rows) == len(runs) == 2
    for r, row in zip(runs, rows):
        assert r["checkpoint"].endswith("e2e.pt" if r["recipe"] == "default" else "ckpt.pt"), r
        assert len(r["ratio"]) == 2 and all(math.isfinite(v) and v > 0 for v in r["ratio"].values())
        # bench.json and the table hold what the run's own files say: samples/s from the last
        # line of its train log, the ratios from splice.json, the cosine from eval.json
        folder = out_dir / f"{r['recipe']}-{r['minutes']:g}min"
        last = last_line(folder / "train.jsonl")
        splice = json.loads((folder / "splice.json").read_text())
        cosine = json.loads((folder / "eval.json").read_text())["groups"]["held-out"]["cosine"]
        assert r["regression_samples_s"] == last["samples"] / last["seconds"] and r["params"] == last["params"]
        assert r["ratio"] == splice["ratio"] and r["held_out_cosine"] == cosine
        # the answer, last, may hold a "|" of its own
        cells = [cell.strip() for cell in row.strip("|").split("|")][:4 + len(texts) + 1]
        assert cells == [r["recipe"], f"{r['minutes']:g}", f"{last['params'] / 1e6:.1f}M", f"{last['samples'] / last['seconds']:.0f}",
                         *(f"{splice['ratio'][text]:.2f}x" for text in texts), f"{cosine:.3f}"], row
    assert (out_dir / "bench.png").read_bytes()[:4] == b"\x89PNG"
    fails_with(run_in_process("bench.py", f"--model={tiny_mistral.folder}", "--fractions=half", cwd=workdir), "fractions='half'", "0.25,0.5,1")


def test_gpu_check_runs_every_stage_and_prints_one_table(tiny_mistral, prepared_mistral, workdir, tmp_path):
    config, out_dir = tiny_recipe(tmp_path), tmp_path / "check"
    args = [f"--model={tiny_mistral.folder}", f"--config_file={config}", "--minutes=0.05", f"--out_dir={out_dir}"]
    proc = succeeds(run_script("gpu_check.py", *args, cwd=workdir, env=ONE_THREAD))
    assert "note: no CUDA GPU here" in proc.stdout
    table = proc.stdout[proc.stdout.index("| stage |"):]
    for stage in ("prepare_mistral_data.py", "train.py", "train_e2e.py", "evaluate.py", "test_mistral.py"):
        assert f"| {stage} |" in table
    assert "data/ was there already" in table and "held-out cosine" in table and "s a step" in table
    # train.py's figures are its last step's, the last line of its log, at the end of its budget
    # (half of 0.05 minutes), whichever step the checkpoint kept
    last = last_line(out_dir / "train.jsonl")
    assert last["seconds"] >= 1.5
    train_row = next(line for line in table.splitlines() if line.startswith("| train.py |"))
    assert train_row.split("|")[3].strip() == f"{last['iter']} steps, {last['samples'] / last['seconds']:.0f} samples/s", train_row
    # a second check never mixes its stages with the first one's
    fails_with(run_in_process("gpu_check.py", *args, cwd=workdir), "is from an earlier check", "another --out_dir")
