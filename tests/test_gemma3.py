"""
Gemma 3 270M, the real SentencePiece LM from PyPI (model=gemma3): its 6,242 <unusedN> rows have
ordinary norms, so the detector reads the tied table's geometry and asks the LM to repeat each
candidate; its embedding layer scales rows by sqrt(640), so rows handed over as inputs_embeds
must be scaled too. prepare, train and repair run on a tiny Gemma3ForCausalLM around the real
tokenizer (the real model would take most of the suite's time; `make demo
CONFIG=config/gemma3_cpu.py` runs it). The other stages are Gemma's only through the scale,
which the identity test here checks in-process: the e2e loss of Gemma's own rows is zero.
"""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from soft_tokenizer.lm import bos_id, load_lm, load_tokenizer, resolve_model, text_windows, training_text
from soft_tokenizer.spelling import token_bytes, untrained_rows
from soft_tokenizer.untrained import VERIFIED_BELOW, find_untrained, geometry_candidates, named_unused, repeat_probabilities
from helpers import SMALL_SAMPLE, TINY_TRAIN, assert_own_table_changes_nothing, first_windows, run_in_process, spelled_rows, succeeds

UNUSED = 6242


@pytest.fixture(scope="module")
def gemma():
    lm, tokenizer = load_lm("gemma3")
    table = lm.get_input_embeddings().weight.detach()[:len(tokenizer)].clone()
    return SimpleNamespace(lm=lm, tokenizer=tokenizer, table=table, pieces=tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def test_the_norms_see_nothing_but_the_geometry_finds_the_unused_rows(gemma):
    assert len(gemma.table) == 262144 and untrained_rows(gemma.table).sum() == 0
    reference = named_unused(gemma.pieces)
    assert len(reference) == UNUSED and all(re.fullmatch(r"<unused\d+>", gemma.pieces[i]) for i in reference)
    # the mean and the line from one random half of the named rows, recall on the other half, which
    # neither saw (on the half that drew it, recall is 99% by construction; measured here: 98.9%)
    g = torch.Generator().manual_seed(0)
    shuffled = reference[torch.randperm(UNUSED, generator=g)]
    seen, unseen = shuffled[:UNUSED // 2], shuffled[UNUSED // 2:]
    candidates, scores, line, _ = geometry_candidates(gemma.table, seen)
    assert torch.isin(unseen, candidates).float().mean() >= 0.98
    assert len(candidates) < 1.5 * UNUSED  # it singles out a few rows, not the table (measured: 8,922)
    assert scores[gemma.tokenizer.convert_tokens_to_ids("▁Paris")] < line
    # the candidates no name marks are untrained too, as the LM itself says: it cannot repeat them,
    # while it repeats most rows below the line (64 of each; measured: it cannot repeat 100% and 16%;
    # rows drawn at random, many of them rare tokens, would be near the second)
    others = candidates[~torch.isin(candidates, reference)]
    below = torch.ones(len(gemma.table), dtype=torch.bool)
    below[candidates], below[reference] = False, False
    below = below.nonzero()[:, 0]
    sample = torch.cat([others[torch.randperm(len(others), generator=g)[:64]], below[torch.randperm(len(below), generator=g)[:64]]])
    unrepeated = repeat_probabilities(gemma.lm, gemma.tokenizer, sample) < VERIFIED_BELOW
    assert unrepeated[:64].float().mean() >= 0.9 and unrepeated[64:].float().mean() <= 0.4, unrepeated


def test_the_lm_cannot_repeat_unused_tokens_but_repeats_words(gemma):
    unused = gemma.tokenizer.convert_tokens_to_ids([f"<unused{n}>" for n in range(10, 26)])
    words = gemma.tokenizer.convert_tokens_to_ids(["▁Paris", "apple", "ing", "▁house", "▁capital", "▁France"])
    probabilities = repeat_probabilities(gemma.lm, gemma.tokenizer, torch.tensor(unused + words))
    assert (probabilities[:len(unused)] < VERIFIED_BELOW).all(), probabilities
    assert (probabilities[len(unused):] > VERIFIED_BELOW).all(), probabilities


def test_a_candidate_the_lm_repeats_is_kept_as_trained(gemma):
    """find_untrained end to end, its verdict checked through the LM: on the table's first 1,000
    rows (so the candidates fit in one batch of the LM; they hold <unused0> to <unused98>), with
    four common tokens' rows set to the mean of those unused rows. The geometry takes them for
    unused; the LM, which reads its own rows, repeats them, so they stay trained, while the unused
    rows it cannot repeat are verified untrained."""
    table = gemma.table[:1000].clone()
    unused = named_unused(gemma.pieces[:1000])
    planted = torch.tensor(gemma.tokenizer.convert_tokens_to_ids(["▁the", "▁and", "▁of", "ing"]))
    table[planted] = table[unused].mean(0)
    found = find_untrained("gemma3", gemma.tokenizer, table, tied=True, lm=gemma.lm)
    assert len(unused) == 99 and len(found.by_norm) == 0
    assert torch.isin(planted, found.candidates).all()
    probability = dict(zip(found.candidates.tolist(), found.probabilities.tolist()))
    assert all(probability[i] > VERIFIED_BELOW for i in planted.tolist()), probability
    assert not found.untrained[planted].any() and not torch.isin(planted, found.verified).any()
    # the unused rows are verified (measured: all but two, <unused97> below the line and <unused0>,
    # which the LM repeats with 1.2%), and the verdict is the verified rows, no more
    assert torch.isin(unused, found.verified).float().mean() >= 0.95
    assert torch.equal(found.untrained.nonzero()[:, 0], found.verified.sort().values)


def test_every_window_starts_with_bos_as_gemma_read_text_in_training(gemma, smollm2_tokenizer):
    """The windows of perplexity, of the e2e stage and of finetune.py (lm.text_windows): Gemma's
    tokenizer puts <bos> before a text, so every window starts with it and holds the text's next
    tokens after it; SmolLM2's puts nothing, so its windows are the text's tokens alone."""
    text = training_text()[:40000]
    ids = gemma.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(gemma.tokenizer, ids, 64)
    assert bos_id(gemma.tokenizer) == gemma.tokenizer.bos_token_id == 2 and len(windows) > 10
    assert (windows[:, 0] == 2).all() and not (windows[:, 1:] == 2).any()
    assert windows[:, 1:].flatten().tolist() == ids[:len(windows) * 63]
    smol_ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bos_id(smollm2_tokenizer) is None
    assert text_windows(smollm2_tokenizer, smol_ids, 64).flatten().tolist() == smol_ids[:len(smol_ids) // 64 * 64]
    # what the perplexity is then: Gemma's loss on a text's start is far lower with its <bos> before it
    with torch.no_grad():
        led = gemma.lm(windows[:2], labels=windows[:2]).loss.item()
        bare = gemma.lm(windows[:2, 1:], labels=windows[:2, 1:]).loss.item()
    assert led < bare - 0.5, (led, bare)


def test_its_own_table_changes_nothing_when_rows_are_scaled_as_gemma_scales_them(gemma):
    windows = first_windows(gemma.tokenizer)
    with torch.no_grad():
        own = gemma.lm(input_ids=windows).logits
        raw = gemma.lm(inputs_embeds=gemma.lm.get_input_embeddings().weight[windows]).logits
    assert (own - raw).abs().max() > 10  # the trap: raw rows are 25 times too small
    assert_own_table_changes_nothing(gemma.lm, windows)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """The real Gemma 3 tokenizer on a tiny random tied Gemma3ForCausalLM whose rows are spelled
    (helpers.spelled_rows) and whose <unusedN> rows are near copies of one row, as in the real one.
    (On a table of random rows the near copies would be its first principal component, which
    the indicator removes.)"""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    folder = tmp_path_factory.mktemp("models") / "tiny-gemma3"
    tokenizer = load_tokenizer(resolve_model("gemma3")[0])
    tokenizer.save_pretrained(folder)
    tokens, _ = token_bytes(tokenizer)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    lm = Gemma3ForCausalLM(config)
    reference = named_unused(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    with torch.no_grad():
        table = lm.get_input_embeddings().weight
        table[:] = spelled_rows([data for data, _ in tokens], config.hidden_size, seed=0)
        table[reference] = table[reference[0]] + 0.05 * torch.randn(len(reference), config.hidden_size)
    lm.save_pretrained(folder)
    return SimpleNamespace(folder=folder, reference=reference)


def test_the_pipeline_runs_on_gemma_leaves_the_unused_rows_out_and_measures_new_tokens(tiny_gemma3, workdir):
    model, out_dir = f"--model={tiny_gemma3.folder}", workdir / "out-tiny-gemma3"
    # both cores: the detector's matrices are 262,144 rows long
    prepare = succeeds(run_in_process("prepare_mistral_data.py", model, *SMALL_SAMPLE, cwd=workdir))
    data = workdir / "data" / tiny_gemma3.folder.name
    meta = json.loads((data / "meta.json").read_text())
    untrained = {t["id"] for t in meta["tokens"] if "untrained" in t["flags"]}
    # a random LM repeats nothing, so every candidate is verified; the near copies are all found
    assert meta["untrained_by_norm"] == 0 and meta["untrained_verified"] == meta["untrained_candidates"] == len(untrained)
    assert len(set(tiny_gemma3.reference.tolist()) & untrained) >= 0.985 * UNUSED, prepare.stdout
    used = set(np.load(data / "train_ids.npy").tolist()) | set(np.load(data / "val_ids.npy").tolist()) | set(np.load(data / "test_ids.npy").tolist())
    assert not used & untrained and meta["tokenizer_kind"] == "sentencepiece" and meta["vocab_size"] == 262144
    # in this process: a new one would spend seconds importing torch and transformers again
    succeeds(run_in_process("train.py", model, f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=10", "--eval_interval=10", cwd=workdir))
    # repair fills exactly the rows the detector verified, from their bytes, and leaves the rest
    save = workdir / "tiny-gemma3-repaired"
    repair = succeeds(run_in_process("tokens.py", "repair", model, f"--out_dir={out_dir}", "--method=soft", f"--save={save}", cwd=workdir))
    # the detector's verdict is prepare's, read from meta.json, not a second run of the LM over every candidate
    assert "untrained rows: prepare's verdict in" in repair.stdout
    before = AutoModelForCausalLM.from_pretrained(tiny_gemma3.folder).get_input_embeddings().weight.detach()
    after = AutoModelForCausalLM.from_pretrained(save).get_input_embeddings().weight.detach()
    changed = set((before != after).any(1).nonzero()[:, 0].tolist())
    assert changed == untrained
    # finetune.py's zero-shot table on a tied LM with a BOS: the new tokens' rows serve as input and
    # output rows, then as input rows only (the output side the mean row); Token Distillation
    # goes through Gemma's scaled embedding layer
    succeeds(run_in_process("finetune.py", model, f"--out_dir={out_dir}", "--name=zs", "--steps=0", "--new_words=4", "--methods=soft+distill",
                        "--zero_shot_chars=2000", "--zero_shot_context=64", "--distill_steps=4", "--distill_contexts=2", cwd=workdir))
    zero_shot = json.loads((out_dir / "zs.json").read_text())["zero_shot"]["bits_per_byte"]
    assert zero_shot["original"]["input_only"] == zero_shot["original"]["input_and_output"]
    refined = zero_shot["soft+distill"]
    assert refined["new_tokens"] > 0 and refined["input_only"] != refined["input_and_output"] and refined["distill_seconds"] > 0, zero_shot
