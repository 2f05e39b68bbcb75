"""
The end-to-end loss of train_e2e.py: the frozen LM reads the encoder's rows on windows of
text, and the loss says how far what it computes from them is from what it computes from its
own rows: the KL divergence of its next-token distributions, or (cheaper: a few layers and no
vocabulary-wide head) the error of its residual stream after its first k layers. Plus an MSE
anchor on tokens drawn from the whole vocabulary, since the windows use only a few thousand
tokens and the other rows must not drift. And transfer.py's adaptation loss: the LM's own
next-token loss on text in another tokenizer, where the encoder's rows stand for that
tokenizer's tokens the LM lacks.
"""
import math

import torch
import torch.nn.functional as F

from soft_tokenizer.configurator import UserError
from soft_tokenizer.lm import embed_rows, hidden_after, text_windows
from model import trim_padding


def cut_windows(tokenizer, ids, context, needed, what):
    """[N, context] windows of token ids as lm.text_windows cuts them (BOS-led where the LM has
    one, so that the targets are what the LM computes on text as it was trained), at least `needed` of them."""
    windows = text_windows(tokenizer, ids, context)
    if len(windows) < needed:
        raise UserError(f"{what} has {len(windows)} windows of {context} tokens, fewer than e2e_windows={needed}; lower them")
    return windows


def e2e_loss(encoder, lm, windows, input_ids, table, frozen, anchors, mse_weight, hidden_layers=0, fvt=None):
    """(loss, match, mse) of one step on windows [W, T] of token ids. The LM reads the encoder's
    rows for the windows' tokens, except those marked `frozen` (bool [V]: the tokens never
    trained on), which keep the LM's own rows: they are context, never targets, so they stay
    honest stand-ins for new tokens. match, with hidden_layers=0: the mean over positions of
    KL(LM with its own rows || LM with these rows); with hidden_layers=k: the mean over positions
    of |h - h_own|^2 / |h_own|^2, h the residual stream after the first k layers (relative, since
    a position's norm varies by orders of magnitude along a window). mse: the encoder's rows
    for the `anchors` ids against their true rows. Gradients reach the encoder only. The rows
    go in scaled as the LM scales its own (lm.embed_rows). fvt: [V, D] FVT's rows
    (filling.vocabulary_fvt_rows), for an encoder that reads them."""
    embed = lm.get_input_embeddings()
    tokens, where = windows.unique(return_inverse=True)
    ids = torch.cat([tokens, anchors])
    rows, _ = encoder(trim_padding(input_ids[ids]), fvt=None if fvt is None else fvt[ids])
    # in the units train.py's loss uses (the table's RMS row norm), so mse_weight means the same in both
    scale = encoder.config.row_scale
    mse = F.mse_loss(rows[len(tokens):].float() / scale, table[anchors] / scale) if len(anchors) else torch.zeros((), device=rows.device)
    rows = torch.where(frozen[tokens, None], embed.weight[tokens], rows[:len(tokens)].to(embed.weight.dtype))
    inputs_embeds = embed_rows(lm, rows[where])
    if hidden_layers:
        with torch.no_grad():
            own = hidden_after(lm, hidden_layers, input_ids=windows).float()
        ours = hidden_after(lm, hidden_layers, inputs_embeds=inputs_embeds).float()
        match = ((ours - own) ** 2).sum(-1).div(own.pow(2).sum(-1)).mean()
    else:
        with torch.no_grad():
            own = F.log_softmax(lm(input_ids=windows).logits.float(), dim=-1)
        ours = F.log_softmax(lm(inputs_embeds=inputs_embeds).logits.float(), dim=-1)
        match = F.kl_div(ours, own, log_target=True, reduction="none").sum(-1).mean()
    return match + mse_weight * mse, match, mse


def new_vocabulary_loss(lm, windows, position, rows_of, negatives, generator):
    """The LM's mean next-token loss on windows [W, T] of ids of a vocabulary it was given
    (transfer.py), whose tokens keep the LM's current rows (position -1) or take the encoder's
    (position p >= 0: rows_of(at) gives the rows, with gradients, for positions `at`). The LM
    reads the encoder's rows for the windows' tokens. A tied LM also scores every token as the
    next one: the fixed rows, the encoder's rows for the windows' tokens, and those for
    `negatives` other tokens drawn at random (without replacement, from the generator), each
    scored as if it stood for its share of all the tokens not drawn, so that the softmax's sum
    is estimated without predicting every row at each step; with as many negatives as there are
    other tokens, it is exactly the LM's loss with every row the encoder's. An untied LM scores
    with its own output rows."""
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    tokens, where = windows.unique(return_inverse=True)
    learning = position[tokens] >= 0
    ours = tokens[learning]  # sorted, as unique returns them
    fresh = rows_of(position[ours])
    rows = embed.detach()[tokens.to(embed.device)].index_put((learning.to(embed.device),), fresh.to(embed.dtype))
    hidden = lm.get_decoder()(inputs_embeds=embed_rows(lm, rows[where.to(embed.device)])).last_hidden_state
    hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), windows[:, 1:].reshape(-1)
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)

    def scores(candidates):
        logits = (hidden @ candidates.T.to(hidden.dtype)).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    if head is not embed:
        return F.cross_entropy(scores(head), targets.to(hidden.device))
    fixed = (position < 0).nonzero()[:, 0]
    others = (position >= 0).nonzero()[:, 0]
    others = others[~torch.isin(others, ours)]
    drawn = others[torch.randperm(len(others), generator=generator)[:negatives]]
    # each drawn token counts as len(others) / len(drawn) of them: its weight in the sum is a log added to its score
    stands_for = math.log(len(others) / len(drawn)) if len(drawn) else 0.0
    logits = torch.cat([scores(embed.detach()[fixed.to(embed.device)]), scores(fresh), scores(rows_of(position[drawn])) + stands_for], 1)
    column = torch.full((len(position),), -1)
    column[fixed] = torch.arange(len(fixed))
    column[ours] = len(fixed) + torch.arange(len(ours))
    return F.cross_entropy(logits, column[targets].to(logits.device))
