"""
Which rows an LM never trained. A zero or shrunk row shows in its norm (Llama 3's reserved
tokens, Mistral's unreachable byte-fallback rows: spelling.untrained_rows). A tied table can
hide them: Gemma 3's 6,242 <unusedN> rows have ordinary norms but are near copies of each
other. There the indicator is the table's geometry, as in Magikarp (Land and Bartolo, 2024):
each row's cosine, with the table's mean and first principal component removed, to the mean
of rows the tokenizer itself names unused or reserved, and a line fit on those rows. A
candidate is verified through the LM: shown the token and asked to repeat it, the LM gives it
a probability below 0.01.
"""
import copy
import re
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from soft_tokenizer.configurator import progress

# names tokenizers give the rows they reserve: Gemma's <unused0>, Llama 3's <|reserved_special_token_0|>, T5's <extra_id_0>
UNUSED_NAME = re.compile(r"<unused\d+>|<\|reserved_special_token_\d+\|>|<extra_id_\d+>")
# a few-shot prompt for a base model: the candidate goes between the prefix and the suffix, and
# the LM's next token should be the candidate again
REPEAT_PREFIX = 'Each string is repeated.\n"apple" "apple"\n"ExternalHouse" "ExternalHouse"\n" blue" " blue"\n"'
REPEAT_SUFFIX = '" "'
VERIFIED_BELOW = 0.01  # Magikarp's line: an LM that cannot produce the token with 1% never learnt it


def named_unused(pieces):
    """The ids whose piece the tokenizer itself names unused or reserved."""
    return torch.tensor([i for i, piece in enumerate(pieces) if UNUSED_NAME.fullmatch(piece)], dtype=torch.int64)


def geometry_candidates(table, reference, recall=0.99, n_mean=100, seed=0):
    """Rows of a tied table that look like the reference rows: (candidate ids, every row's score,
    the line, the share of the reference rows not used for the mean that lie above it). The mean
    is taken over n_mean reference rows; the line is put so that `recall` of the others are
    above it."""
    centred = table.double() - table.double().mean(0)
    first_component = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]
    centred = centred - (centred @ first_component)[:, None] * first_component
    shuffled = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(seed))]
    fit, held = shuffled[:n_mean], shuffled[n_mean:]
    scores = F.cosine_similarity(centred, centred[fit].mean(0, keepdim=True), dim=1).float()
    check = held if len(held) else fit
    line = torch.quantile(scores[check], 1 - recall).item()
    return (scores >= line).nonzero()[:, 0], scores, line, (scores[check] >= line).float().mean().item()


@torch.no_grad()
def repeat_probabilities(lm, tokenizer, ids, batch_size=256):
    """For each token id: the probability the LM gives to producing it again right after it was
    shown in REPEAT_PREFIX <token> REPEAT_SUFFIX. The prefix is computed once and its cache is
    shared by every batch; only the last position's distribution is computed."""
    device = lm.device
    prefix = tokenizer(REPEAT_PREFIX, return_tensors="pt")["input_ids"].to(device)
    suffix = tokenizer(REPEAT_SUFFIX, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    cache = lm(input_ids=prefix, use_cache=True).past_key_values
    probabilities = []
    for batch in progress(ids.split(batch_size), desc="repeat after me", leave=False, disable=len(ids) <= batch_size):
        batch = batch.to(device)
        shared = copy.deepcopy(cache)
        shared.batch_repeat_interleave(len(batch))
        window = torch.cat([batch[:, None], suffix.expand(len(batch), -1)], 1)
        logits = lm(input_ids=window, past_key_values=shared, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        probabilities.append(logits.softmax(-1).gather(1, batch[:, None])[:, 0].cpu())
    return torch.cat(probabilities) if probabilities else torch.zeros(0)


def find_untrained(model, tokenizer, table, tied, lm=None):
    """The detector: rows of `table` (the LM's input rows for its tokenizer's vocabulary) that
    were never trained. A namespace: untrained (bool [V]: the norm rule's rows and the verified
    candidates), by_norm, reference, candidates (ids), probabilities (of each candidate), line,
    recall, verified (ids). Only a tied table with reference rows needs the LM (`lm`, or loaded here)."""
    from soft_tokenizer.lm import load_lm
    from soft_tokenizer.spelling import untrained_rows
    untrained = untrained_rows(table)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(table))))
    reference = named_unused(pieces)
    report = SimpleNamespace(by_norm=untrained.nonzero()[:, 0], reference=reference, candidates=torch.zeros(0, dtype=torch.int64),
                             probabilities=torch.zeros(0), line=None, recall=None, tied=tied, pieces=pieces)
    if tied and len(reference):
        candidates, report.scores, report.line, report.recall = geometry_candidates(table, reference)
        report.candidates = candidates[~untrained[candidates]]
        if lm is None:
            lm, _ = load_lm(model)
        report.probabilities = repeat_probabilities(lm, tokenizer, report.candidates)
        untrained[report.candidates[report.probabilities < VERIFIED_BELOW]] = True
    report.untrained = untrained
    report.verified = report.candidates[report.probabilities < VERIFIED_BELOW]
    return report
