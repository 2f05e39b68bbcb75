"""
The end-to-end loss of train_e2e.py: the frozen LM reads the encoder's rows on windows of
text, and the loss is the KL divergence from the LM's next-token distributions with its own
rows to those with the predicted rows, plus an MSE anchor on tokens drawn from the whole
vocabulary, since the windows use only a few thousand tokens and the other rows must not drift.
"""
import torch
import torch.nn.functional as F

from configurator import UserError
from lm import embed_rows
from model import trim_padding


def cut_windows(ids, context, needed, what):
    """[N, context] windows cut from a list of token ids, at least `needed` of them."""
    n_windows = len(ids) // context
    if n_windows < needed:
        raise UserError(f"{what} has {n_windows} windows of {context} tokens, fewer than e2e_windows={needed}; lower them")
    return torch.tensor(ids[:n_windows * context]).view(n_windows, context)


def e2e_loss(encoder, lm, windows, input_ids, table, frozen, anchors, mse_weight):
    """(loss, kl, mse) of one step on windows [W, T] of token ids. The LM reads the encoder's
    rows for the windows' tokens, except those marked `frozen` (bool [V]: the tokens never
    trained on), which keep the LM's own rows: they are context, never targets, so they stay
    honest stand-ins for new tokens. kl: the mean over positions of KL(LM with its own rows ||
    LM with these rows); mse: the encoder's rows for the `anchors` ids against their true rows.
    Gradients reach the encoder only. The rows go in scaled as the LM scales its own (lm.embed_rows)."""
    embed = lm.get_input_embeddings()
    tokens, where = windows.unique(return_inverse=True)
    rows, _ = encoder(trim_padding(input_ids[torch.cat([tokens, anchors])]))
    mse = F.mse_loss(rows[len(tokens):].float(), table[anchors]) if len(anchors) else torch.zeros((), device=rows.device)
    rows = torch.where(frozen[tokens, None], embed.weight[tokens], rows[:len(tokens)].to(embed.weight.dtype))
    with torch.no_grad():
        teacher = F.log_softmax(lm(input_ids=windows).logits.float(), dim=-1)
    student = F.log_softmax(lm(inputs_embeds=embed_rows(lm, rows[where])).logits.float(), dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
    return kl + mse_weight * mse, kl, mse
