"""
A second stage after train.py: train the byte encoder end to end through the frozen LM
(e2e.py: on windows of the LM's own sampled text and of the training text, the error of the LM's residual stream after its
first few layers, or the KL divergence of its next-token distributions, plus train.py's MSE
on tokens drawn from the whole vocabulary). It starts from train.py's
out_dir/ckpt.pt, which it never changes, and writes its own out_dir/e2e.pt, saved as it goes:
Ctrl-C keeps the work, and --e2e_init_from=resume continues it.

$ python train.py config/smollm2_cpu.py
$ python train_e2e.py config/smollm2_cpu.py --e2e_steps=200
$ python train_e2e.py config/smollm2_cpu.py --e2e_init_from=resume --e2e_steps=400   # 200 steps more
"""
import os
import time

import jinja2
import torch
from tqdm import tqdm

from soft_tokenizer.configurator import UserError, check, configure, pick_device, progress
from soft_tokenizer.e2e import cut_windows, e2e_loss
from soft_tokenizer.filling import vocabulary_fvt_rows
from soft_tokenizer.lm import chat_turns, decoder_layers, load_lm, pick_dtype, training_text
from soft_tokenizer.schedule import budget_used
from soft_tokenizer.storage import (STAGE_FILES, check_lm_table, claim_out_dir, data_identity, load_checkpoint, load_data, load_encoder,
                     read_checkpoint, save_checkpoint)

model = "smollm2"  # hub id, local folder, or "smollm2"; its data/<name>/ from prepare_mistral_data.py
out_dir = "out-smollm2"  # ckpt.pt from train.py is read here, e2e.pt is written here
e2e_init_from = "scratch"  # "scratch": a new stage from ckpt.pt; "resume": continue out_dir/e2e.pt
e2e_context = 128  # tokens per window of training text
e2e_windows = 4  # windows per step
# share of each step's windows cut from the training text rendered as chat turns (when the tokenizer
# has a chat template), so that the rows of the chat markers learn what the LM does with them
e2e_chat_share = 0.25
# share of each step's windows from the LM's own sampled text (prepare's sample_ids): what it
# reads in general, where the training text is one domain; the rest are the training text
e2e_sample_share = 0.75
e2e_learning_rate = 1e-4
e2e_ngram_lr_scale = 30.0  # the n-gram table's learning rate over e2e_learning_rate (SparseAdam); 0: it stays as train.py left it
# what the LM computes is matched after its first this many decoder layers (e2e.py): a seventh of
# a full pass of SmolLM2 and no vocabulary-wide head, so four times the steps; 0: its
# next-token distributions (KL) throughout
e2e_hidden_layers = 4
# with e2e_hidden_layers, the last share of the budget trains on the KL, which is what the splice is judged by
e2e_kl_share = 0.0
# the budget in steps, in all (a resumed stage trains until it has had this many), so the same
# command trains the same encoder on any machine; 0: e2e_seconds is the budget
e2e_steps = 200
e2e_seconds = 0.0  # the budget in seconds of training, in all, when e2e_steps is 0
e2e_save_seconds = 60.0  # e2e.pt is saved each time this much more training time has passed, and at the end
e2e_regression_tokens = 256  # training tokens drawn from the whole vocabulary each step for the MSE term
mse_weight = 1000.0  # the MSE term's weight, as in train.py (a config file sets both), in the same units
seed = 1337
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
dtype = "auto"  # the frozen LM's: auto is bfloat16 on cuda, float32 elsewhere; or float32, bfloat16, float16
configure(globals())
for key in ("e2e_context", "e2e_windows"):
    check(globals(), key, 2)
check(globals(), "e2e_chat_share", 0.0, 1.0)
check(globals(), "e2e_sample_share", 0.0, 1.0)
if e2e_chat_share + e2e_sample_share > 1:
    raise UserError(f"e2e_chat_share={e2e_chat_share:g} and e2e_sample_share={e2e_sample_share:g} add up to more than all of a step's windows; lower them")
check(globals(), "e2e_kl_share", 0.0, 1.0)
check(globals(), "e2e_hidden_layers", 0)
check(globals(), "e2e_ngram_lr_scale", 0)
check(globals(), "e2e_learning_rate", 0, low_open=True)
check(globals(), "e2e_steps", 0)
check(globals(), "e2e_seconds", 0)
if e2e_steps == 0 and e2e_seconds == 0:
    raise UserError("e2e_steps=0 and e2e_seconds=0 leave the stage without a budget; set one of them")
check(globals(), "e2e_save_seconds", 0, low_open=True)
check(globals(), "e2e_regression_tokens", 0)
check(globals(), "mse_weight", 0)
if e2e_init_from not in ("scratch", "resume"):
    raise UserError(f"e2e_init_from={e2e_init_from!r} is not known; use 'scratch' or 'resume'")
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
dev = pick_device(device)
lm_dtype = pick_dtype(dtype, dev)

data = load_data(model)
identity = data_identity(data)
regression = load_checkpoint(out_dir, identity, "regression")
out_dir_lock = claim_out_dir(out_dir)  # no train.py may write ckpt.pt while this stage reads it
path = os.path.join(out_dir, STAGE_FILES["e2e"])
earlier = read_checkpoint(path, identity) if os.path.isfile(path) else None
ours = earlier is not None and earlier["e2e"]["parent"] == regression["id"]
if e2e_init_from == "resume" and not ours:
    raise UserError(f"there is no e2e stage trained from {out_dir}/ckpt.pt to resume in {path}; run without --e2e_init_from=resume")
if e2e_init_from == "scratch" and ours:
    raise UserError(f"{path} already holds an e2e stage trained from this ckpt.pt ({earlier['e2e']['steps']} steps, "
                    f"{earlier['e2e']['seconds']:.0f}s); continue it with --e2e_init_from=resume (and a larger --e2e_steps), "
                    f"or delete it to start over")
if earlier is not None and not ours:
    print(f"note: {path} was trained from an earlier ckpt.pt; this stage starts from the one there now and replaces it")
start = earlier if e2e_init_from == "resume" else regression
encoder = load_encoder(start, dev).train()
lm, tokenizer = load_lm(model, dtype=lm_dtype, device=dev)
lm.requires_grad_(False)
check_lm_table(lm.get_input_embeddings().weight, data, model)
if e2e_hidden_layers and e2e_hidden_layers > len(decoder_layers(lm)):
    print(f"note: the LM has {len(decoder_layers(lm))} decoder layers, fewer than e2e_hidden_layers={e2e_hidden_layers}; matching after all of them")
    e2e_hidden_layers = len(decoder_layers(lm))

text = training_text()
windows = cut_windows(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], e2e_context, e2e_windows, "the training text")
n_chat = round(e2e_windows * e2e_chat_share) if tokenizer.chat_template else 0
n_sample = round(e2e_windows * e2e_sample_share)
if n_sample and len(data.sample_ids) == 0:
    raise UserError(f"the prepared data holds none of the LM's own text to take e2e_sample_share={e2e_sample_share:g} of the windows from; "
                    f"prepare again with --sample_windows_train above 0, or run with --e2e_sample_share=0")
if n_sample and e2e_context > data.sample_ids.shape[1]:
    raise UserError(f"the sampled text's windows have {data.sample_ids.shape[1]} tokens, fewer than e2e_context={e2e_context}; "
                    f"lower e2e_context or prepare again with --sample_length={e2e_context}")
sample_windows = data.sample_ids[:, :e2e_context]
if n_chat:
    try:
        chat_ids = chat_turns(tokenizer, text)
    except jinja2.TemplateError as e:
        raise UserError(f"the tokenizer's chat template does not render a user turn and an assistant turn ({e}); run with --e2e_chat_share=0") from None
    chat_windows = cut_windows(tokenizer, chat_ids, e2e_context, e2e_windows, "the training text as chat turns")
input_ids, table, train_ids = data.input_ids.to(dev), data.table.to(dev), data.train_ids
fvt = vocabulary_fvt_rows(tokenizer, data.table, train_ids).to(dev) if encoder.config.fvt_residual else None
# the tokens never trained on (val and test) keep the LM's own rows in a window
frozen = torch.ones(len(table), dtype=torch.bool, device=dev)
frozen[train_ids.to(dev)] = False
# fresh optimizers at a small rate, since the regression got the rows close: AdamW for the dense
# weights, and SparseAdam for the n-gram table if it trains here too
dense = [p for name, p in encoder.named_parameters() if not name.startswith("ngram.")]
optimizer = torch.optim.AdamW(dense, lr=e2e_learning_rate, weight_decay=0.0)
train_ngrams = bool(e2e_ngram_lr_scale and encoder.config.ngram_max)
ngram_optimizer = torch.optim.SparseAdam([encoder.ngram.weight], lr=e2e_learning_rate * e2e_ngram_lr_scale) if train_ngrams else None
generator = torch.Generator().manual_seed(seed)
steps, seconds, match = 0, 0.0, None
if e2e_init_from == "resume":
    optimizer.load_state_dict(earlier["optimizer"])
    if train_ngrams and earlier.get("ngram_optimizer"):
        ngram_optimizer.load_state_dict(earlier["ngram_optimizer"])
    generator.set_state(earlier["generator"])
    steps, seconds, match = earlier["e2e"]["steps"], earlier["e2e"]["seconds"], earlier["e2e"].get("last_match")
    if budget_used(steps, seconds, e2e_steps, e2e_seconds) >= 1:
        raise UserError(f"{path} has trained {steps} steps ({seconds:.0f}s) already, its whole budget; pass a larger --e2e_steps "
                        f"(or --e2e_seconds, with --e2e_steps=0) to train longer")
print(f"{data.meta['model']}: end to end on {len(windows)} windows of {e2e_context} tokens of the training text"
      + (f" and {len(chat_windows)} of it as chat turns" if n_chat else "") + f", {len(sample_windows)} of the LM's own text, "
      + f"{e2e_windows} windows a step ({n_chat} chat, {n_sample} the LM's), "
      + (f"resuming {path} at step {steps}" if steps else f"from {out_dir}/ckpt.pt (iteration {regression['iter_num']})"))


def save():
    if not all(torch.isfinite(p).all() for p in encoder.parameters()):
        raise UserError(f"the weights became non-finite at step {steps}; {path} keeps its last save, lower e2e_learning_rate")
    save_checkpoint(path, {
        "stage": "e2e", "model": encoder.state_dict(), "model_args": regression["model_args"], "config": config, "data": identity,
        "iter_num": regression["iter_num"], "optimizer": optimizer.state_dict(),
        "ngram_optimizer": ngram_optimizer.state_dict() if train_ngrams else None, "generator": generator.get_state(),
        "e2e": {"parent": regression["id"], "steps": steps, "seconds": round(seconds, 1), "last_match": match, "context": e2e_context,
                "windows": e2e_windows, "chat_windows": n_chat, "sample_windows": n_sample, "learning_rate": e2e_learning_rate,
                "regression_tokens": e2e_regression_tokens, "mse_weight": mse_weight, "hidden_layers": e2e_hidden_layers,
                "kl_share": e2e_kl_share, "ngram_lr_scale": e2e_ngram_lr_scale if train_ngrams else 0.0}})


bar = progress(total=100, initial=round(100 * budget_used(steps, seconds, e2e_steps, e2e_seconds)), unit="%")
next_save = seconds + e2e_save_seconds
kl_from = 1 - e2e_kl_share if e2e_hidden_layers else 0.0
matching = None
try:
    while budget_used(steps, seconds, e2e_steps, e2e_seconds) < 1:
        started = time.time()
        batch = windows[torch.randint(0, len(windows), (e2e_windows - n_chat - n_sample,), generator=generator)]
        if n_chat:
            batch = torch.cat([batch, chat_windows[torch.randint(0, len(chat_windows), (n_chat,), generator=generator)]])
        if n_sample:
            batch = torch.cat([batch, sample_windows[torch.randint(0, len(sample_windows), (n_sample,), generator=generator)]])
        anchors = train_ids[torch.randint(0, len(train_ids), (e2e_regression_tokens,), generator=generator)]
        layers = e2e_hidden_layers if budget_used(steps, seconds, e2e_steps, e2e_seconds) < kl_from else 0
        if layers != matching:
            tqdm.write(f"step {steps}: matching the LM's " + (f"residual stream after {layers} layers" if layers else "next-token distributions (KL)"))
            matching = layers
        loss, match_step, mse = e2e_loss(encoder, lm, batch.to(dev), input_ids, table, frozen, anchors.to(dev), mse_weight, layers, fvt)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()} at step {steps}; {path} keeps its last save, lower e2e_learning_rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        optimizer.step()
        if train_ngrams:
            ngram_optimizer.step()
        encoder.zero_grad(set_to_none=True)  # the n-gram table's sparse gradient too, trained here or not
        steps, match = steps + 1, match_step.item()
        seconds += time.time() - started
        bar.update(min(round(100 * budget_used(steps, seconds, e2e_steps, e2e_seconds)), bar.total) - bar.n)
        bar.set_postfix({f"hidden{layers}" if layers else "kl": f"{match:.4f}", "mse": f"{mse.item():.4f}", "s_per_step": f"{seconds / steps:.2f}"}, refresh=False)
        if seconds >= next_save:
            save()
            next_save = seconds + e2e_save_seconds
except KeyboardInterrupt:
    bar.close()
    if steps:
        save()
    raise UserError(f"interrupted at step {steps}; " + (f"saved {path}, continue with --e2e_init_from=resume" if steps else "nothing was trained yet")) from None
finally:
    bar.close()
save()
print(f"{steps} steps in {seconds:.0f}s ({seconds / steps:.2f} s a step on {dev}); wrote {path}")
