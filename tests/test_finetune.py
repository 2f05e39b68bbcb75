"""
finetune.py as a user runs it, on the tiny Mistral (Mistral-7B's real tokenizer, untied) and
numpy's documentation: every method and both settings in one call, every curve in the JSON, and
when only the new rows train, every other parameter of the saved model is bit for bit the
original's. tokens.py repurpose and add --rows_from make a row from a name the user gives.
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from soft_tokenizer.configurator import UserError
from soft_tokenizer.filling import read_names
from soft_tokenizer.lm import load_tokenizer
from helpers import ONE_THREAD, fails_with, run_in_process, run_script, stock_load, succeeds

METHODS = ["soft", "fvt", "mean", "mean_resizing", "random"]


def test_finetune_compares_every_method_and_trains_only_the_new_rows(tiny_mistral, trained_mistral, workdir):
    out_dir = trained_mistral.out_dir
    proc = succeeds(run_script("finetune.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", "--name=ft",
                               "--new_words=4", "--steps=3", "--finetune_batch_size=2", "--finetune_context=32", "--finetune_eval_interval=2",
                               "--eval_windows=2", "--save_models=True", cwd=workdir, env=ONE_THREAD))
    report = json.loads((out_dir / "ft.json").read_text())
    assert (out_dir / "ft.png").stat().st_size > 10000 and "reaches mean" in proc.stdout
    assert report["encoder"]["checkpoint_id"] and report["text"]["sha256"] and report["text"]["new_tokens"]["held_out"] > 0
    tokenizer = load_tokenizer(tiny_mistral.folder)
    words = [t["token"] for t in report["tokens"]]
    assert [t["id"] for t in report["tokens"]] == [32000, 32001, 32002, 32003] and not any(t["repurposed"] for t in report["tokens"])
    assert all(w.startswith(" ") and len(tokenizer(w, add_special_tokens=False)["input_ids"]) > 1 for w in words)
    assert set(report["runs"]) == {"new_rows", "all"}
    for setting, runs in report["runs"].items():
        assert list(runs) == METHODS
        for curve in runs.values():
            assert curve["step"] == [0, 2, 3] and len(curve["step_loss"]) == 3
            assert all(math.isfinite(v) for part in ("train", "held_out") for v in curve[part]["all"] + curve[part]["new"])
    # the methods start from different rows, and the same batches make the same step-0 loss where the rows agree
    start = {m: c["held_out"]["new"][0] for m, c in report["runs"]["new_rows"].items()}
    assert len({round(v, 6) for v in start.values()}) >= 4
    assert start == {m: c["held_out"]["new"][0] for m, c in report["runs"]["all"].items()}, report["runs"]

    original = dict(AutoModelForCausalLM.from_pretrained(tiny_mistral.folder).named_parameters())
    tables = ("model.embed_tokens.weight", "lm_head.weight")
    for method in METHODS:
        for setting in ("new_rows", "all"):
            lm, tuned_tokenizer = stock_load(out_dir / "ft-models" / f"{setting}-{method}")
            assert tuned_tokenizer.convert_tokens_to_ids(words) == [32000, 32001, 32002, 32003]
            tuned = dict(lm.named_parameters())
            unchanged = [torch.equal(tuned[n][:32000] if n in tables else tuned[n], p) for n, p in original.items()]
            if setting == "new_rows":
                assert all(unchanged), method
            else:
                assert not all(unchanged), method
    # the new rows trained: mean put the mean of the trained input rows there, and they moved from it
    trained = torch.ones(32000, dtype=torch.bool)
    trained[tiny_mistral.untrained] = False
    mean_row = original["model.embed_tokens.weight"][trained].mean(0)
    tuned = stock_load(out_dir / "ft-models" / "new_rows-mean")[0].get_input_embeddings().weight.detach()[32000:]
    assert not torch.allclose(tuned, mean_row.expand_as(tuned), atol=1e-4)
    assert (tuned - mean_row).abs().max() < 0.1  # 3 Adam steps of 1e-3 move a coordinate at most 3e-3
    # a second run that would save its models over the first's is refused before it trains
    fails_with(run_in_process("finetune.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", "--name=ft", "--save_models=True",
                          cwd=workdir), "already exists")


def test_repurpose_and_add_make_rows_from_a_name(tiny_mistral, workdir, tmp_path):
    """fvt from a name: the row is the mean of the name's pieces' rows; nothing else changes."""
    spelled_table = torch.from_numpy(tiny_mistral.embedding)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"<0x42>": " zorblax"}))
    save = workdir / "repurposed-mistral"
    succeeds(run_script("tokens.py", "repurpose", f"--model={tiny_mistral.folder}", "--method=fvt", f"--rows_from={names}",
                        f"--save={save}", cwd=workdir, env=ONE_THREAD))
    lm, tokenizer = stock_load(save)
    table = lm.get_input_embeddings().weight.detach()
    pieces = tokenizer(" zorblax", add_special_tokens=False)["input_ids"]
    target = tokenizer.convert_tokens_to_ids("<0x42>")
    assert len(pieces) > 1 and torch.allclose(table[target], spelled_table[pieces].mean(0), atol=1e-6)
    others = torch.ones(len(table), dtype=torch.bool)
    others[target] = False
    assert torch.equal(table[others], spelled_table[others]) and len(tokenizer) == 32000

    described = tmp_path / "described.json"
    described.write_text(json.dumps({" zorblax": " a made-up word"}))
    save = workdir / "described-mistral"
    succeeds(run_script("tokens.py", "add", f"--model={tiny_mistral.folder}", "--method=fvt", f"--rows_from={described}",
                        f"--save={save}", cwd=workdir, env=ONE_THREAD))
    lm, tokenizer = stock_load(save)
    pieces = tokenizer(" a made-up word", add_special_tokens=False)["input_ids"]
    assert tokenizer(" zorblax", add_special_tokens=False)["input_ids"] == [32000]
    assert torch.allclose(lm.get_input_embeddings().weight[32000], spelled_table[pieces].mean(0), atol=1e-6)

    fails_with(run_in_process("tokens.py", "repurpose", f"--model={tiny_mistral.folder}", f"--rows_from={described}", "--method=mean",
                          f"--save={workdir / 'y'}", cwd=workdir), "not a token of")
    assert not (workdir / "y").exists()
    names.write_text("{not json")
    with pytest.raises(UserError, match="is not a JSON file"):
        read_names(names)
    names.write_text('{"<0x42>": ""}')
    with pytest.raises(UserError, match="non-empty strings"):
        read_names(names)
