"""
A second stage after train.py: train the byte encoder end to end through the frozen LM.
On windows of the training text, the LM reads the encoder's rows for the window's tokens
(the held-out tokens keep their own rows),
and the loss is the KL divergence from the LM's next-token distributions with its own rows
to those with the predicted rows, plus train.py's MSE on tokens drawn from the whole
vocabulary: the windows use a few thousand tokens, and the rows of the others must not drift.
Gradients reach the encoder only.

$ python train.py config/smollm2_cpu.py
$ python train_e2e.py config/smollm2_cpu.py --e2e_seconds=300
"""
import os
import time

import jinja2
import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import UserError, check, configure, pick_device
from lm import chat_turns, load_lm, training_text
from model import PAD
from storage import claim_out_dir, data_identity, load_checkpoint, load_data, load_encoder, save_checkpoint

model = "smollm2"  # hub id, local folder, or "smollm2"; its data/<name>/ from prepare_mistral_data.py
out_dir = "out-smollm2"  # ckpt.pt from train.py is read here, and written back after this stage
e2e_context = 128  # tokens per window of training text
e2e_windows = 4  # windows per step
# share of each step's windows cut from the training text rendered as chat turns (when the tokenizer
# has a chat template), so that the rows of the chat markers learn what the LM does with them
e2e_chat_share = 0.25
e2e_learning_rate = 1e-4
e2e_seconds = 300.0  # training time of this stage
e2e_regression_tokens = 256  # training tokens drawn from the whole vocabulary each step for the MSE term
mse_weight = 100.0  # the MSE term's weight, as in train.py (a config file sets both)
seed = 1337
device = "auto"  # auto: cuda, then mps, then cpu
configure(globals())
for key in ("e2e_context", "e2e_windows"):
    check(globals(), key, 2)
check(globals(), "e2e_chat_share", 0.0, 1.0)
check(globals(), "e2e_learning_rate", 0, low_open=True)
check(globals(), "e2e_seconds", 0, low_open=True)
check(globals(), "e2e_regression_tokens", 0)
check(globals(), "mse_weight", 0)
dev = pick_device(device)

data = load_data(model)
checkpoint = load_checkpoint(out_dir, data_identity(data))
out_dir_lock = claim_out_dir(out_dir)  # no train.py may write ckpt.pt while this stage reads and rewrites it
encoder = load_encoder(checkpoint, dev).train()
lm, tokenizer = load_lm(model, device=dev)
lm.requires_grad_(False)


def cut_windows(ids, what):
    n_windows = len(ids) // e2e_context
    if n_windows < e2e_windows:
        raise UserError(f"{what} has {n_windows} windows of {e2e_context} tokens, fewer than e2e_windows={e2e_windows}; lower them")
    return torch.tensor(ids[:n_windows * e2e_context]).view(n_windows, e2e_context)


text = training_text()
windows = cut_windows(tokenizer(text, add_special_tokens=False)["input_ids"], "the training text")
n_chat = round(e2e_windows * e2e_chat_share) if tokenizer.chat_template else 0
if n_chat:
    try:
        chat_ids = chat_turns(tokenizer, text)
    except jinja2.TemplateError as e:
        raise UserError(f"the tokenizer's chat template does not render a user turn and an assistant turn ({e}); run with --e2e_chat_share=0") from None
    chat_windows = cut_windows(chat_ids, "the training text as chat turns")
input_ids, table, train_ids = data.input_ids.to(dev), data.table.to(dev), data.train_ids
embed = lm.get_input_embeddings()
# held-out tokens in a window read the LM's own rows: they are context, never targets, so they
# stay honest stand-ins for new tokens
held_out = torch.zeros(len(table), dtype=torch.bool, device=dev)
held_out[data.val_ids.to(dev)] = True
# the dense weights only: a fresh AdamW at a small rate, since the regression got the rows close
dense = [p for name, p in encoder.named_parameters() if not name.startswith("ngram.")]
optimizer = torch.optim.AdamW(dense, lr=e2e_learning_rate, weight_decay=0.0)
generator = torch.Generator().manual_seed(seed)
print(f"{data.meta['model']}: end to end on {len(windows)} windows of {e2e_context} tokens of the training text"
      + (f" and {len(chat_windows)} of it as chat turns" if n_chat else "") + f", {e2e_windows} windows a step ({n_chat} chat), from {out_dir}/ckpt.pt (iteration {checkpoint['iter_num']})")

bar = tqdm(total=round(e2e_seconds), unit="s")
seconds, steps = 0.0, 0
while seconds < e2e_seconds:
    started = time.time()
    batch = windows[torch.randint(0, len(windows), (e2e_windows - n_chat,), generator=generator)]
    if n_chat:
        batch = torch.cat([batch, chat_windows[torch.randint(0, len(chat_windows), (n_chat,), generator=generator)]])
    batch = batch.to(dev)
    tokens, where = batch.unique(return_inverse=True)
    anchors = train_ids[torch.randint(0, len(train_ids), (e2e_regression_tokens,), generator=generator)].to(dev)
    both = torch.cat([tokens, anchors])
    width = int((input_ids[both] != PAD).sum(1).max())
    rows, _ = encoder(input_ids[both][:, :width])
    mse = F.mse_loss(rows[len(tokens):].float(), table[anchors]) if len(anchors) else torch.zeros((), device=dev)
    rows = torch.where(held_out[tokens, None], embed.weight[tokens], rows[:len(tokens)].to(embed.weight.dtype))
    with torch.no_grad():
        teacher = F.log_softmax(lm(input_ids=batch).logits.float(), dim=-1)
    student = F.log_softmax(lm(inputs_embeds=rows[where]).logits.float(), dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
    loss = kl + mse_weight * mse
    if not torch.isfinite(loss):
        raise UserError(f"the loss became {loss.item()} at step {steps}; nothing was saved, lower e2e_learning_rate")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dense, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    encoder.zero_grad(set_to_none=True)  # the sparse n-gram table's gradient, not trained here
    steps += 1
    seconds += time.time() - started
    bar.update(min(round(seconds), bar.total) - bar.n)
    bar.set_postfix(kl=f"{kl.item():.4f}", mse=f"{mse.item():.4f}", s_per_step=f"{seconds / steps:.2f}")
bar.close()

checkpoint["model"] = encoder.state_dict()
checkpoint["e2e"] = {"steps": steps, "seconds": round(seconds, 1), "context": e2e_context, "windows": e2e_windows, "chat_windows": n_chat,
                     "last_kl": kl.item(), "learning_rate": e2e_learning_rate, "regression_tokens": e2e_regression_tokens, "mse_weight": mse_weight}
if not all(torch.isfinite(p).all() for p in encoder.parameters()):
    raise UserError("the weights became non-finite; nothing was saved, lower e2e_learning_rate")
save_checkpoint(os.path.join(out_dir, "ckpt.pt"), checkpoint)
print(f"{steps} steps in {seconds:.0f}s ({seconds / steps:.2f} s a step on {dev}); wrote {out_dir}/ckpt.pt")
