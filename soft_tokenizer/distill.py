"""
Token Distillation (Dobler, Elliott and de Melo, "Token Distillation: Attention-aware Input
Embeddings for New Tokens", ICLR 2026; first called AweDist): new tokens' input rows fitted
with the LM itself. Each new token's string is found in a text; the LM reads each place twice,
as its own tokenizer cuts it (the string in pieces) and with the new token in the pieces'
place, and the rows are fitted so that the residual stream after the LM's first `layers`
layers, from the new token on, matches the one from the pieces' last on. Only the new rows
move, from any start (mean, fvt, soft).
"""
import re
import time

import torch

from soft_tokenizer.configurator import UserError, progress
from soft_tokenizer.lm import bos_id, decoder_layers, embed_rows, hidden_after


def find_contexts(text, strings, tokenizer, per_string, before, after):
    """Up to per_string places of each string in `text`, spread over it, as the LM's own token ids:
    (which string, the ids before it (led by the LM's BOS where it has one), the string's pieces, the ids after)."""
    bos = [bos_id(tokenizer)] if bos_id(tokenizer) is not None else []
    found = []
    for k, string in enumerate(strings):
        starts = [m.start() for m in re.finditer(re.escape(string), text)]
        pieces = tokenizer(string, add_special_tokens=False)["input_ids"]
        for start in starts[::max(1, len(starts) // per_string)][:per_string]:
            # a token is rarely more than 8 characters: cut the text generously, then the ids
            left = tokenizer(text[max(0, start - 8 * before):start], add_special_tokens=False)["input_ids"][-before:]
            end = start + len(string)
            right = tokenizer(text[end:end + 8 * after], add_special_tokens=False)["input_ids"][:after]
            found.append((k, bos + left, pieces, right))
    return found


def padded(sequences, fill=0):
    """[N, longest] ids, padded on the right: a causal LM's real positions never read the padding."""
    out = torch.full((len(sequences), max(map(len, sequences))), fill, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def at(hidden, positions):
    """hidden [N, T, D] at positions [N, S]: [N, S, D]."""
    return hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]).to(hidden.device))


def distill_rows(lm, tokenizer, strings, rows, text, per_string=8, before=24, after=8, layers=4, steps=60, lr=0.02, batch=32, seed=0):
    """Rows [len(strings), D] refined from `rows` (in the table's units), the seconds it took, and
    each step's loss (the mean relative squared error of the matched positions in its batch).
    lm reads text with its own, unchanged, table; `tokenizer` is its own, without the new tokens.
    layers=0: all of them; the default, 4, costs a sixth of all 30 on SmolLM2 and gives up part of
    the gain (RESEARCH_LOG, "new tokens, zero-shot"). lr is in units of a typical coordinate (the
    rows' RMS norm / sqrt(D))."""
    started = time.time()
    layers = min(layers, len(decoder_layers(lm))) if layers else len(decoder_layers(lm))  # an LM with fewer: all of them
    contexts = find_contexts(text, strings, tokenizer, per_string, before, after)
    if not contexts:
        raise UserError("none of the new tokens' strings occurs in the text; Token Distillation needs a text that uses them")
    which = torch.tensor([k for k, *_ in contexts])
    teacher = padded([left + pieces + right for _, left, pieces, right in contexts])
    student = padded([left + [0] + right for _, left, _, right in contexts])  # 0: a placeholder the new row replaces
    where = torch.tensor([len(left) for _, left, _, _ in contexts])
    matched = torch.tensor([len(right) + 1 for *_, right in contexts])
    shift = torch.tensor([len(pieces) - 1 for _, _, pieces, _ in contexts])
    span = int(matched.max())
    offsets = torch.arange(span)
    mask = offsets[None] < matched[:, None]  # [N, span]: the new token's position and those after it
    student_at = (where[:, None] + offsets).clamp(max=student.shape[1] - 1)
    teacher_at = (where[:, None] + shift[:, None] + offsets).clamp(max=teacher.shape[1] - 1)
    device = lm.device
    targets = []
    with torch.no_grad():
        for i in progress(range(0, len(contexts), batch), desc="distill: targets", leave=False):
            hidden = hidden_after(lm, layers, input_ids=teacher[i:i + batch].to(device)).float()
            targets.append(at(hidden, teacher_at[i:i + batch]))
    targets = torch.cat(targets)
    embed = lm.get_input_embeddings().weight
    unit = rows.norm(dim=1).pow(2).mean().sqrt().item() / rows.shape[1] ** 0.5
    fitted = rows.detach().clone().float().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([fitted], lr=lr * unit)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in progress(range(steps), desc="distill", leave=False):
        pick = torch.randperm(len(contexts), generator=generator)[:batch]
        ids = student[pick].to(device)
        inputs = embed[ids].detach().clone()
        inputs[torch.arange(len(pick)), where[pick]] = fitted[which[pick]].to(inputs.dtype)
        hidden = hidden_after(lm, layers, inputs_embeds=embed_rows(lm, inputs)).float()
        ours = at(hidden, student_at[pick])
        own = targets[pick.to(device)]
        error = ((ours - own) ** 2).sum(-1) / own.pow(2).sum(-1)
        loss = error[mask[pick].to(device)].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return fitted.detach().cpu().to(rows.dtype), time.time() - started, losses
