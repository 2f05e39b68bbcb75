"""
Every artifact says what it came from, and the scripts that read one refuse a mismatch in one
sentence: predictions of another checkpoint, an LM whose table is not the data's, data
prepared with another split; a config file's misspelled key; pytest from the repository root.
"""
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from soft_tokenizer.storage import DATA_FILES, data_identity, sha256
from helpers import ONE_THREAD, REPO, SMALL_SAMPLE, TINY_TRAIN, fails_with, files_under, run_script, succeeds


def test_the_predicted_table_records_its_checkpoint_and_data(tiny_mistral, prepared_mistral, evaluated_mistral):
    checkpoint = torch.load(evaluated_mistral.out_dir / "ckpt.pt", weights_only=True)
    meta = json.loads((prepared_mistral.data / "meta.json").read_text())
    with safe_open(evaluated_mistral.out_dir / "new_embeddings.safetensors", "pt") as f:
        source = f.metadata()
    assert source["checkpoint_id"] == checkpoint["id"] and source["data_sha256"] == meta["data_sha256"]
    assert source["checkpoint"].endswith("ckpt.pt") and source["stage"] == "regression" and source["iter_num"] == "20"
    report = json.loads((evaluated_mistral.out_dir / "eval.json").read_text())
    assert report["checkpoint_id"] == checkpoint["id"] and report["table_sha256"] == meta["table_sha256"]


def test_stale_predictions_are_refused(tiny_mistral, evaluated_mistral, workdir, tmp_path):
    """train.py run again, evaluate.py skipped: the splice and compare would use old rows."""
    out_dir = tmp_path / "out"
    shutil.copytree(evaluated_mistral.out_dir, out_dir)
    succeeds(run_script("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=2",
                        "--eval_interval=2", cwd=workdir, env=ONE_THREAD))
    before = files_under(out_dir)
    for script, args in (("test_mistral.py", []), ("tokens.py", ["compare"])):
        proc = run_script(script, *args, f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", cwd=workdir, env=ONE_THREAD)
        fails_with(proc, "new_embeddings.safetensors was predicted from", "iteration 20", "rerun evaluate.py")
    assert files_under(out_dir) == before


def test_an_lm_whose_table_is_not_the_datas_is_refused(tiny_mistral, evaluated_mistral, workdir, tmp_path):
    """The folder changed after prepare (another revision, a fine-tune saved over it)."""
    folder = tmp_path / tiny_mistral.name  # same name, so the same data/<name>/
    shutil.copytree(tiny_mistral.folder, folder)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        lm.get_input_embeddings().weight[1234] += 0.01
    lm.save_pretrained(folder)
    out_dir = tmp_path / "out"
    shutil.copytree(evaluated_mistral.out_dir, out_dir)
    # one check (storage.check_lm_table) that train_e2e.py and tokens.py compare make too
    proc = run_script("test_mistral.py", f"--model={folder}", f"--out_dir={out_dir}", cwd=workdir, env=ONE_THREAD)
    fails_with(proc, f"input table of {folder} is not the one", "prepare_mistral_data.py")


@pytest.fixture(scope="module")
def other_split(tiny_mistral, tmp_path_factory):
    """The same model prepared again in another folder with another split_seed."""
    cwd = tmp_path_factory.mktemp("other-split")
    succeeds(run_script("prepare_mistral_data.py", f"--model={tiny_mistral.folder}", *SMALL_SAMPLE, "--split_seed=7", cwd=cwd))
    return SimpleNamespace(cwd=cwd, data=cwd / "data" / tiny_mistral.name)


def written(folder):
    """meta.json and the arrays prepare wrote in folder."""
    return json.loads((folder / "meta.json").read_text()), {name: np.load(folder / name) for name in DATA_FILES}


def test_the_data_identity_is_a_hash_of_the_files_prepare_wrote_and_of_the_split(prepared_mistral, other_split):
    meta, arrays = written(prepared_mistral.data)
    other_meta, other_arrays = written(other_split.data)
    # what meta.json says is what the files hold, as a reader recomputes it
    assert meta["data_sha256"] == sha256(*arrays.values()) and other_meta["data_sha256"] == sha256(*other_arrays.values())
    assert meta["table_sha256"] == other_meta["table_sha256"] == sha256(arrays["embeddings.npy"])
    # another split of the same table, bytes and counts: only the split differs, and the identity with it
    for name in ("input_ids.npy", "embeddings.npy", "text_counts.npy"):
        assert np.array_equal(arrays[name], other_arrays[name]), name
    test, train = arrays["test_ids.npy"], arrays["train_ids.npy"]
    assert len(test) == len(other_arrays["test_ids.npy"]) and not np.array_equal(test, other_arrays["test_ids.npy"])
    assert data_identity(SimpleNamespace(meta=meta)) != data_identity(SimpleNamespace(meta=other_meta))
    # a split that keeps the held-out ids' count and sum (what was compared before) changes the hash
    # too: two held-out ids traded for two training ids of the same sum
    a, b = test[0], test[1]
    in_train = set(train.tolist())
    c = next(c for c in train if c != a + b - c and a + b - c in in_train)
    traded = {**arrays, "test_ids.npy": np.sort(np.concatenate([test[2:], [c, a + b - c]])),
              "train_ids.npy": np.sort(np.concatenate([train[(train != c) & (train != a + b - c)], [a, b]]))}
    assert traded["test_ids.npy"].sum() == test.sum() and len(traded["test_ids.npy"]) == len(test)
    assert sha256(*traded.values()) != meta["data_sha256"]


def test_a_checkpoint_of_another_split_is_refused(tiny_mistral, trained_mistral, other_split, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_mistral.out_dir, out_dir)
    fails_with(run_script("evaluate.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", cwd=other_split.cwd), "other prepared data")


def test_a_misspelled_key_in_a_config_file_is_one_sentence(tmp_path):
    (tmp_path / "typo.py").write_text("model = 'smollm2'\nlearning_rte = 3e-4\ne2e_steps = 10\n")
    fails_with(run_script("train.py", "typo.py", cwd=tmp_path), "typo.py sets learning_rte, which no script declares")
    # a key that another script declares (e2e_steps is train_e2e.py's) is left to that script
    (tmp_path / "other.py").write_text("e2e_steps = 10\nmax_iters = 0\nmax_seconds = 0.0\nngram_max = 0\n")
    fails_with(run_script("train.py", "other.py", cwd=tmp_path), "without a budget")


def test_pytest_from_the_repository_root_collects_the_suite():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests/test_provenance.py::test_pytest_from_the_repository_root_collects_the_suite" in proc.stdout


def test_the_time_budget_stops_the_run_and_decays_the_learning_rate(tiny_mistral, prepared_mistral, workdir, tmp_path):
    """A budget in seconds of training, the option beside max_iters: the run stops at the first
    step past it, and the schedule reaches min_lr there."""
    from soft_tokenizer.schedule import budget_used, get_lr
    # the iterations when the run has max_iters, whatever the clock says; else the seconds
    assert budget_used(5, 60.0, 10, 300.0) == 0.5 and budget_used(5, 270.0, 10, 300.0) == 0.5
    assert budget_used(5, 60.0, 0, 300.0) == 0.2
    assert get_lr(1000, budget_used(1000, 300.0, 0, 300.0), 50, 1e-3, 1e-4) == 1e-4
    args = [a for a in TINY_TRAIN if not a.startswith("--eval_interval_seconds")]
    succeeds(run_script("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={tmp_path / 'out'}", *args, "--max_iters=0", "--max_seconds=3",
                        "--eval_interval_seconds=1", cwd=workdir, env=ONE_THREAD))
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    step = checkpoint["train_seconds"] / checkpoint["iter_num"]
    assert 3.0 <= checkpoint["train_seconds"] < 3.0 + 2 * step + 0.5 and checkpoint["iter_num"] > 5
