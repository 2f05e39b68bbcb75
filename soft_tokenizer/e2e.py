"""
The end-to-end loss of train_e2e.py: the frozen LM reads the encoder's rows on windows of
text, and the loss says how far what it computes from them is from what it computes from its
own rows: the KL divergence of its next-token distributions, or (cheaper: a few layers and no
vocabulary-wide head) the error of its residual stream after its first k layers. Plus an MSE
anchor on tokens drawn from the whole vocabulary, since the windows use only a few thousand
tokens and the other rows must not drift.
"""
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
