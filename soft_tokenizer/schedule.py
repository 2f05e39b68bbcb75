"""
The training schedule: which tokens go into which step, and at what learning rate. Both are
pure functions of their arguments, so every process of a DDP run and every resumed run
agree on them.
"""
import math

import torch


def batch_order(train_ids, lengths, epoch, batch_size, bucket, seed, weights=None):
    """The batches of one epoch: train_ids shuffled from (seed, epoch), or with weights, as many
    ids drawn with probability proportional to their weight (a frequent token comes many times,
    a rare one maybe not at all); with bucket, sorted by length within windows of 64 batches so
    each batch is short yet batches still vary."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if weights is None:
        ids = train_ids[torch.randperm(len(train_ids), generator=generator)]
    else:
        ids = train_ids[torch.multinomial(weights.double().cpu(), len(train_ids), replacement=True, generator=generator).to(train_ids.device)]
    if bucket:
        window = 64 * batch_size
        ids = torch.cat([w[lengths[w].argsort(stable=True)] for w in ids.split(window)])
    batches = list(ids.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # equal batches keep DDP shards and the loss scale uniform
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def get_lr(step, budget_used, warmup_steps, max_lr, min_lr):
    """Linear warmup over warmup_steps, then cosine decay from max_lr to min_lr as budget_used
    (the share of the step or time budget spent) goes from 0 to 1."""
    warmup = min(1.0, (step + 1) / (warmup_steps + 1))
    return warmup * (min_lr + 0.5 * (1.0 + math.cos(math.pi * min(budget_used, 1.0))) * (max_lr - min_lr))


def budget_used(iter_num, train_seconds, max_iters, max_seconds):
    """The share of a run's one budget spent: iterations if it has max_iters, else training
    seconds. The learning rate decays over it and the run stops at 1; a run with neither (train.py's
    solve alone) has spent it before it starts."""
    if max_iters == 0 and max_seconds == 0:
        return 1.0
    return iter_num / max_iters if max_iters > 0 else train_seconds / max_seconds
