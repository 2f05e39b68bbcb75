"""
finetune.py as a user runs it, on the tiny Mistral (Mistral-7B's real tokenizer, untied) and
numpy's documentation: the zero-shot table, every method and both settings in one call, every
curve in the JSON, and when only the new rows train, every other parameter of the saved model is
bit for bit the original's. Bits per byte, and Token Distillation finding a row it can know.
tokens.py repurpose and add --rows_from make a row from a name the user gives.
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from soft_tokenizer.configurator import UserError
from soft_tokenizer.distill import distill_rows
from soft_tokenizer.filling import read_names
from soft_tokenizer.lm import bits_per_byte, finetune_text, load_lm, load_tokenizer, selection_text, text_windows
from soft_tokenizer.spelling import byte_lengths
from helpers import fails_with, run_in_process, stock_load, succeeds

METHODS = ["soft", "fvt", "mean", "mean_resizing", "random"]


def test_finetune_compares_every_method_and_trains_only_the_new_rows(tiny_mistral, trained_mistral, workdir):
    out_dir = trained_mistral.out_dir
    proc = succeeds(run_in_process("finetune.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", "--name=ft",
                                   "--new_words=4", "--steps=3", "--finetune_batch_size=2", "--finetune_context=32", "--finetune_eval_interval=2",
                                   "--eval_windows=2", "--zero_shot_chars=8000", "--zero_shot_context=128", "--save_models=True", cwd=workdir))
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
    # zero-shot: the original reads the same text with its own tokenizer, so more tokens; in an
    # untied LM the new output rows are the mean output row either way, so the columns agree
    zero_shot = report["zero_shot"]["bits_per_byte"]
    assert list(zero_shot) == ["original", *METHODS] and (out_dir / "ft-zero-shot.png").stat().st_size > 5000
    assert all(r["input_only"] == r["input_and_output"] and 1 < r["input_and_output"] < 10 for r in zero_shot.values())
    assert all(zero_shot[m]["new_tokens"] > 0 for m in METHODS) and len({round(zero_shot[m]["input_only"], 9) for m in METHODS}) >= 4
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


def test_the_selection_text_chooses_new_words_of_its_own(tiny_mistral, trained_mistral, workdir):
    """finetune.py --selection=True: the zero-shot table on the selection text, which no report uses."""
    out_dir = trained_mistral.out_dir
    succeeds(run_in_process("finetune.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", "--name=ft-selection", "--selection=True",
                            "--steps=0", "--methods=mean,fvt", "--held_out_every=4", "--new_words=4", "--zero_shot_chars=12000",
                            "--zero_shot_context=128", cwd=workdir))
    report = json.loads((out_dir / "ft-selection.json").read_text())
    text = next(iter(selection_text().values()))
    assert report["text"]["source"] == "lm.selection_text()" and all(t["token"] in text for t in report["tokens"])
    assert report["zero_shot"]["bits_per_byte"]["fvt"]["new_tokens"] > 0
    fails_with(run_in_process("finetune.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", "--selection=True", "--code_tags=True",
                              cwd=workdir), "selection=True is a text of its own")


def test_repurpose_and_add_make_rows_from_a_name(tiny_mistral, workdir, tmp_path):
    """fvt from a name: the row is the mean of the name's pieces' rows; nothing else changes."""
    spelled_table = torch.from_numpy(tiny_mistral.embedding)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"<0x42>": " zorblax"}))
    save = workdir / "repurposed-mistral"
    succeeds(run_in_process("tokens.py", "repurpose", f"--model={tiny_mistral.folder}", "--method=fvt", f"--rows_from={names}",
                            f"--save={save}", cwd=workdir))
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
    succeeds(run_in_process("tokens.py", "add", f"--model={tiny_mistral.folder}", "--method=fvt", f"--rows_from={described}",
                            f"--save={save}", cwd=workdir))
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


def test_bits_per_byte_is_the_loss_in_bits_over_the_bytes_the_targets_spell(tiny_mistral):
    lm, tokenizer = load_lm(tiny_mistral.folder)
    text = "\n\n".join(finetune_text()[:20])
    windows = text_windows(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], 64)[:4]
    with torch.no_grad():
        nats = sum(lm(w[None], labels=w[None]).loss.item() * (len(w) - 1) for w in windows)
    # each window is <s> and 63 tokens of the text, and its bytes are the text's own
    spelled = sum(len(tokenizer.decode(w[1:]).encode("utf-8")) for w in windows)
    lengths = byte_lengths(tokenizer)
    assert abs(lengths[windows[:, 1:]].sum().item() - spelled) <= len(windows)  # SentencePiece drops a window's first space
    assert math.isclose(bits_per_byte(lm, windows, lengths), nats / math.log(2) / lengths[windows[:, 1:]].sum().item(), rel_tol=1e-5)


def test_token_distillation_finds_the_row_of_a_string_the_lm_reads_as_one_token(tiny_mistral):
    """Strings that are one token already: from the mean row, fitting the hidden states after them
    to those the token's own row gives must move the row toward that row (the loss is zero there)."""
    lm, tokenizer = load_lm(tiny_mistral.folder)
    strings = [" array", " function", " value", " shape"]
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in strings]
    assert all(len(i) == 1 for i in ids)
    table = lm.get_input_embeddings().weight.detach()
    true, start = table[[i[0] for i in ids]], table.mean(0).expand(len(strings), -1).clone()
    rows, seconds, losses = distill_rows(lm, tokenizer, strings, start, "\n\n".join(finetune_text()[:200]), steps=200, lr=0.05)
    before, after = torch.cosine_similarity(start, true), torch.cosine_similarity(rows, true)
    # measured: from about 0 to 0.63 - 0.70; the loss falls by about a tenth on this random LM
    assert (before < 0.2).all() and (after > 0.5).all(), (before, after)
    assert sum(losses[-20:]) < 0.95 * sum(losses[:20]) and seconds > 0
    with pytest.raises(UserError, match="none of the new tokens"):
        distill_rows(lm, tokenizer, [" zorblaxquux"], start[:1], "no such word here")


def test_add_refines_the_rows_on_a_text_that_uses_them(tiny_mistral, workdir, tmp_path):
    """tokens.py add --distill_text: the fvt row, then Token Distillation on the user's text; the
    other rows stay as shipped. A text that never uses the string is refused before anything is written."""
    spelled_table = torch.from_numpy(tiny_mistral.embedding)
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"Every zorblax has {i} legs, and a zorblax of {i} legs is a small zorblax." for i in range(12)))
    save = workdir / "distilled-mistral"
    proc = succeeds(run_in_process("tokens.py", "add", f"--model={tiny_mistral.folder}", "--method=fvt", f"--distill_text={notes}",
                                   f"--save={save}", "--tokens", " zorblax", cwd=workdir))
    assert "refined by Token Distillation" in proc.stdout and "and Token Distillation" in proc.stdout
    lm, tokenizer = stock_load(save)
    table = lm.get_input_embeddings().weight.detach()
    fvt = spelled_table[load_tokenizer(tiny_mistral.folder)(" zorblax", add_special_tokens=False)["input_ids"]].mean(0)
    assert tokenizer(" zorblax", add_special_tokens=False)["input_ids"] == [32000]
    assert not torch.allclose(table[32000], fvt, atol=1e-3) and torch.equal(table[:32000], spelled_table)
    unused = tmp_path / "unused.txt"
    unused.write_text("a text without the word")
    fails_with(run_in_process("tokens.py", "add", f"--model={tiny_mistral.folder}", "--method=fvt", f"--distill_text={unused}",
                              f"--save={workdir / 'never-written'}", "--tokens", " zorblax", cwd=workdir), "none of the new tokens")
    assert not (workdir / "never-written").exists()
    fails_with(run_in_process("tokens.py", "add", f"--model={tiny_mistral.folder}", "--method=fvt", f"--distill_text={tmp_path / 'missing.txt'}",
                              f"--save={workdir / 'never-written'}", "--tokens", " zorblax", cwd=workdir), "does not exist")

