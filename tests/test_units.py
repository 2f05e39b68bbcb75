"""
The pieces of training, checked in-process: the loss, the batches of an epoch, the learning
rate schedule and the train / held-out split.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model import LossConfig, embedding_loss
from soft_tokenizer.schedule import batch_order, get_lr
from soft_tokenizer.storage import split_vocabulary


@pytest.fixture
def rows():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g)


def test_loss_terms_are_the_plain_l1_and_mse(rows):
    pred, true, _ = rows
    assert embedding_loss(pred, true, LossConfig(1, 0, 0)).item() == pytest.approx(F.l1_loss(pred, true).item(), rel=1e-6)
    assert embedding_loss(pred, true, LossConfig(0, 1, 0)).item() == pytest.approx(F.mse_loss(pred, true).item(), rel=1e-6)
    both = embedding_loss(pred, true, LossConfig(2, 3, 0)).item()
    assert both == pytest.approx(2 * F.l1_loss(pred, true).item() + 3 * F.mse_loss(pred, true).item(), rel=1e-6)
    assert embedding_loss(true, true, LossConfig(1, 1, 0)).item() == 0.0


def test_token_weights_weigh_each_token(rows):
    pred, true, _ = rows
    config = LossConfig(0, 1, 0)
    assert embedding_loss(pred, true, config, weights=torch.ones(8)).item() == pytest.approx(embedding_loss(pred, true, config).item())
    # all the weight on token 3: the loss is that token's own squared error, times 8 / 8
    weights = torch.zeros(8)
    weights[3] = 8.0
    assert embedding_loss(pred, true, config, weights=weights).item() == pytest.approx((pred[3] - true[3]).pow(2).mean().item(), rel=1e-6)


def test_softmax_term_is_cross_entropy_over_the_batch_and_negatives(rows):
    pred, true, negatives = rows
    config = LossConfig(0, 0, 1, softmax_temperature=0.5)
    expected = F.cross_entropy(pred @ torch.cat([true, negatives]).T / 0.5, torch.arange(8))
    assert embedding_loss(pred, true, config, negatives=negatives).item() == pytest.approx(expected.item(), rel=1e-5)
    # a prediction far along its own row wins: the loss goes to zero
    assert embedding_loss(50 * true, true, LossConfig(0, 0, 1)).item() < 1e-3


def test_softmax_weights_weigh_the_softmax_term_alone(rows):
    pred, true, negatives = rows
    config = LossConfig(0, 2, 1)
    mse = 2 * F.mse_loss(pred, true, reduction="none").mean(1)
    softmax = F.cross_entropy(pred @ torch.cat([true, negatives]).T, torch.arange(8), reduction="none")
    mask = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    loss = embedding_loss(pred, true, config, negatives=negatives, softmax_weights=mask)
    assert loss.item() == pytest.approx((mse + mask * softmax).mean().item(), rel=1e-5)
    assert embedding_loss(pred, true, config, negatives=negatives, softmax_weights=torch.zeros(8)).item() == pytest.approx(mse.mean().item(), rel=1e-6)


def test_softmax_counts_every_token_once(rows):
    """With ids, the full table as negatives gives exactly the V-way softmax, whatever tokens
    the batch holds: a negative that is in the batch, or a token twice in the batch, is one row."""
    _, _, table = rows
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([3, 17, 3, 30, 5])  # token 3 twice, as frequency sampling can draw it
    pred = 0.3 * table[ids] + 0.3 * torch.randn(5, 16, generator=g)
    config = LossConfig(0, 0, 1)
    full = F.cross_entropy(pred @ table.T, ids)
    loss = embedding_loss(pred, table[ids], config, ids=ids, negatives=table, negative_ids=torch.arange(32))
    assert full.item() > 0.5 and loss.item() == pytest.approx(full.item(), rel=1e-5)
    # without the ids the batch's rows count twice, and token 3's own row three times
    assert embedding_loss(pred, table[ids], config, negatives=table).item() > full.item() + 0.1


def test_split_is_deterministic_disjoint_and_sized():
    usable = torch.arange(0, 1000, 3)
    train, val, test = split_vocabulary(usable, 0.1, 0.05, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), split_vocabulary(usable, 0.1, 0.05, seed=7)))
    assert len(test) == round(0.1 * len(usable)) and len(val) == round(0.05 * len(usable))
    assert len(train) + len(val) + len(test) == len(usable)
    parts = [set(part.tolist()) for part in (train, val, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert parts[0] | parts[1] | parts[2] == set(usable.tolist())
    assert torch.equal(train, train.sort().values)
    assert not torch.equal(split_vocabulary(usable, 0.1, 0.05, seed=8)[2], test)
    assert [len(part) for part in split_vocabulary(usable, 0.0, 0.0, seed=7)[1:]] == [0, 0]


def test_batches_of_an_epoch():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(1000)
    lengths = torch.randint(1, 40, (1000,), generator=g)
    batches = batch_order(ids, lengths, epoch=3, batch_size=32, bucket=False, seed=1)
    # every id at most once, all batches full, only the last partial batch (1000 = 31 x 32 + 8) dropped
    seen = torch.cat(batches)
    assert len(batches) == 31 and all(len(b) == 32 for b in batches) and len(seen.unique()) == len(seen) == 992
    # the same (seed, epoch) gives the same batches, on every process and after a restart
    assert all(torch.equal(a, b) for a, b in zip(batches, batch_order(ids, lengths, 3, 32, False, 1)))
    assert not torch.equal(torch.cat(batch_order(ids, lengths, 4, 32, False, 1)), seen)
    # bucketing by length leaves less padding when a batch is trimmed to its longest token
    def padding(batches):
        return sum((lengths[b].max() - lengths[b]).sum().item() for b in batches)
    bucketed = batch_order(ids, lengths, 3, 32, True, 1)
    assert padding(bucketed) < 0.3 * padding(batches)


def test_weighted_batches_draw_each_token_in_proportion_to_its_weight():
    """train.py's sample_power: weights[j] is the weight of train_ids[j], and an epoch draws
    len(train_ids) ids with replacement, each in proportion to its weight."""
    g = torch.Generator().manual_seed(0)
    # ids that are not positions (5, 8, 11, ...), so a position returned as an id shows
    train_ids = torch.arange(5, 3005, 3)
    lengths = torch.randint(1, 40, (3005,), generator=g)
    # 50 tokens 10 times as heavy as the 900 light ones, and 50 that must never come, at random places
    heavy, light, never = torch.randperm(len(train_ids), generator=g).split([50, 900, 50])
    weights = torch.ones(len(train_ids))
    weights[heavy], weights[never] = 10.0, 0.0
    epochs, batch_size = 40, 40  # 1000 = 25 full batches: nothing dropped, 40,000 draws
    counts = torch.zeros(3005, dtype=torch.int64)
    for epoch in range(epochs):
        batches = batch_order(train_ids, lengths, epoch, batch_size, False, 1, weights)
        assert len(batches) == 25 and all(len(b) == batch_size for b in batches)
        # bucketing by length reorders an epoch's draws, never changes them
        assert torch.equal(torch.cat(batches).sort().values,
                           torch.cat(batch_order(train_ids, lengths, epoch, batch_size, True, 1, weights)).sort().values)
        counts += torch.bincount(torch.cat(batches), minlength=3005)
    assert counts.sum() == epochs * len(train_ids)
    assert counts[train_ids].sum() == counts.sum()  # every id drawn is one of train_ids
    assert counts[train_ids[never]].sum() == 0
    # each token's count against its binomial expectation, within 5 standard deviations
    draws, p = epochs * len(train_ids), weights / weights.sum()
    expected, sd = draws * p, (draws * p * (1 - p)).sqrt()
    assert ((counts[train_ids] - expected).abs() <= 5 * sd + 1e-9).all()
    # a heavy token comes 10 times as often as a light one: the ratio of their mean counts, within
    # 4 standard deviations of it (each mean's relative one is 1 / sqrt(its group's total count))
    ratio = counts[train_ids[heavy]].double().mean() / counts[train_ids[light]].double().mean()
    relative_sd = (1 / expected[heavy].sum() + 1 / expected[light].sum()).sqrt()
    assert abs(ratio / 10 - 1) <= 4 * relative_sd, (ratio, relative_sd)
    # without weights, each token exactly once an epoch
    for epoch in range(3):
        assert torch.equal(torch.cat(batch_order(train_ids, lengths, epoch, batch_size, False, 1)).sort().values, train_ids)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    lr = [get_lr(step, step / 100, warmup_steps=10, max_lr=1e-3, min_lr=1e-4) for step in range(101)]
    assert lr[0] == pytest.approx(1e-3 * 1 / 11, rel=1e-3) and lr[4] < lr[9]
    assert lr[50] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert lr[100] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lr[10:], lr[11:]))
    # past the budget the rate stays at min_lr
    assert get_lr(200, 2.0, 10, 1e-3, 1e-4) == pytest.approx(1e-4)


def test_a_module_this_python_lacks_is_left_out_of_the_texts():
    """Pythons built without ssl or sqlite3 exist: their docstrings are skipped, not an ImportError."""
    from soft_tokenizer.lm import docstrings
    assert docstrings(["json", "a_module_no_python_has", "textwrap"]) == docstrings(["json", "textwrap"])
    assert "JSON" in docstrings(["json"])


def test_the_selection_text_is_a_third_text_neither_trained_on_nor_reported():
    """Levers are chosen on the selection text; training reads the training text and README reports the evaluation texts."""
    from soft_tokenizer.lm import EVAL_MODULES, SELECTION_MODULES, TRAIN_MODULES, evaluation_texts, scoring_texts, selection_text, training_text
    assert not set(SELECTION_MODULES) & (set(TRAIN_MODULES) | set(EVAL_MODULES))
    assert scoring_texts(selection=True) == selection_text() and scoring_texts() == evaluation_texts()
    (text,) = selection_text().values()
    others = training_text() + "".join(evaluation_texts().values())
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200]
    assert len(text) > 50000 and len(paragraphs) > 20 and not any(p in others for p in paragraphs)


def test_chat_turns_are_paragraph_pairs_in_the_template(smollm2_tokenizer):
    """train_e2e.py's chat windows: SmolLM2's own template around pairs of the text's paragraphs."""
    from soft_tokenizer.lm import chat_turns, training_text
    text = "\n\n".join(training_text().split("\n\n")[:4])
    rendered = smollm2_tokenizer.decode(chat_turns(smollm2_tokenizer, text))
    first, second, third, fourth = text.split("\n\n")
    assert rendered.count("<|im_start|>user\n") == 2 and rendered.count("<|im_start|>assistant\n") == 2
    assert rendered.count("<|im_end|>") == 6  # a system turn the template adds, then user and assistant, twice
    assert f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n{second}<|im_end|>" in rendered
    assert rendered.index(second) < rendered.index(f"user\n{third}<|im_end|>\n<|im_start|>assistant\n{fourth}")
