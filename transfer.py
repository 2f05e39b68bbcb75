"""
Zero-shot tokenizer transfer: give an LM another model's tokenizer. Every token of the new
tokenizer T whose bytes are a token of the LM keeps the LM's row; every other token gets a row
by a method of filling.py made from its bytes (soft: the byte encoder, any string at all; fvt:
the mean of the rows of the pieces the LM's own tokenizer splits it into; mean: the mean row).
A tied LM uses the row on both sides. An untied one keeps its output rows for the shared tokens
and gives the others the mean of its trained output rows (tokens.py says why). T's special
tokens take the LM's own where they have a role in common (BOS, EOS, padding, or the same
literal); T's BOS, for an LM that reads none, takes its EOS, for want of a better row. The
measure is bits per byte on each text, the LM with T against the LM with its own
tokenizer on the same characters (per byte, since the two cut the text into different tokens).

$ python transfer.py --model=smollm2 --out_dir=out-smollm2 --tokenizer=gemma3             # the table
$ python transfer.py --model=smollm2 --tokenizer=path/to/tokenizer_folder --text_file=notes.txt
$ python transfer.py --model=smollm2 --tokenizer=gemma3 --methods=soft --adapt_seconds=600 --save=smollm2-gemma-tokenizer

With --adapt_seconds, soft's rows are then adapted: the encoder trains (the LM frozen) on the
LM's own next-token loss over text in T's tokenization, and the table gets a column
soft+adapted. Writes out_dir/NAME.json (the table and what it came from) and out_dir/NAME.png;
with --save and one method, the LM with the new tokenizer (adapted, if it was) as a folder
stock transformers loads.
"""
import json
import os
import time
from statistics import mean

import matplotlib
matplotlib.use("Agg")  # plots go to PNG files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from model import PAD, trim_padding
from soft_tokenizer.configurator import UserError, check, configure, pick_device, progress
from soft_tokenizer.e2e import new_vocabulary_loss
from soft_tokenizer.filling import METHODS, fvt_rows, new_rows, vocabulary_fvt_rows
from soft_tokenizer.lm import (bits_per_byte, bos_id, evaluation_texts, load_lm, load_tokenizer, read_text_file, resolve_model, selection_text,
                               text_windows, tokenizer_folder, training_text)
from soft_tokenizer.spelling import byte_lengths, encode_bytes, token_bytes, untrained_rows
from soft_tokenizer.storage import (atomic_write, check_lm_table, check_writable, checkpoint_source, load_checkpoint, load_data,
                                    load_encoder, save_model_folder, untrained_in)

model = "smollm2"  # the LM: hub id, local folder, or "smollm2"; its data must be prepared (prepare_mistral_data.py)
out_dir = "out-smollm2"  # the encoder checkpoint soft reads; NAME.json and NAME.png are written here
checkpoint = "auto"  # regression, e2e, or auto: the last stage that ran
tokenizer = "gemma3"  # the new tokenizer: a hub id, a local folder with tokenizer files, or "smollm2", "gemma3", "mistral" (Mistral-7B's), "llama3"
methods = "soft,fvt,mean"  # how the rows of T's tokens that the LM lacks are made (filling.py), each measured
save = ""  # with one method: write the LM with T here (a new folder)
text_file = ""  # a further UTF-8 text to measure on, beside the two evaluation texts
eval_chars = 20000  # each text's first this many characters are measured (about 30 s a method and text for SmolLM2 on 2 CPU cores)
context = 512  # tokens per window, each led by the tokenizer's BOS where it has one
name = "transfer"  # out_dir/NAME.json and out_dir/NAME.png
# measure on the selection text (lm.selection_text, which README never reports) instead of the
# two evaluation texts: to choose the encoder and the adaptation's settings on
selection = False
# with soft: afterwards train the encoder this many seconds (the LM frozen) on the LM's own
# next-token loss over text in T's tokenization (the training text and the LM's own sampled
# text, never a text measured), then measure again as soft+adapted; 0: zero-shot only
adapt_seconds = 0.0
adapt_context = 128  # tokens per window of the adaptation text
adapt_windows = 4  # windows per step
adapt_learning_rate = 1e-4
adapt_ngram_lr_scale = 30.0  # the n-gram table's learning rate over adapt_learning_rate (SparseAdam), as in train_e2e.py
# a tied LM's head scores every token as the next one, and a step predicts only a few made rows
# afresh: this many more made tokens, drawn at random each step, stand for all the others (their
# share of the softmax scaled up), so that no row can win by growing against stale ones
adapt_negatives = 512
# the LM's own tokens each step whose rows the encoder must still predict (train.py's MSE, in its
# units): an anchor, so the rows the text never uses do not drift
adapt_regression_tokens = 256
mse_weight = 1000.0  # the anchor's weight, as in train.py and train_e2e.py
seed = 0
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
configure(globals())
check(globals(), "eval_chars", 1)
check(globals(), "context", 2)
check(globals(), "adapt_seconds", 0)
check(globals(), "adapt_context", 2)
check(globals(), "adapt_windows", 1)
check(globals(), "adapt_learning_rate", 0, low_open=True)
check(globals(), "adapt_ngram_lr_scale", 0)
check(globals(), "adapt_negatives", 1)
check(globals(), "adapt_regression_tokens", 0)
check(globals(), "mse_weight", 0)
method_list = [m for m in methods.split(",") if m]
if not method_list or set(method_list) - set(METHODS) or len(set(method_list)) != len(method_list):
    raise UserError(f"methods={methods!r}: give distinct names from {', '.join(METHODS)}, separated by commas")
if adapt_seconds and "soft" not in method_list:
    raise UserError("adapt_seconds trains the byte encoder, which only soft uses: add soft to methods or set adapt_seconds=0")
if save and len(method_list) != 1:
    raise UserError(f"--save writes one model: pass one method with it, e.g. --methods={method_list[0]}")
if save and os.path.exists(save):
    raise UserError(f"{save} already exists; pass a new folder to --save, the model is never written over")
check_writable(out_dir)
dev = pick_device(device)


# -----------------------------------------------------------------------------
# which of T's tokens the LM has, and rows for the others

data = load_data(model)
lm_folder, _ = resolve_model(model)
own = load_tokenizer(lm_folder)
try:
    new = load_tokenizer(tokenizer_folder(tokenizer))
except (OSError, ValueError) as e:
    raise UserError(f"no tokenizer found at {tokenizer!r} ({type(e).__name__}); pass a folder with tokenizer files, a hub id, smollm2, gemma3, mistral or llama3") from None
table, vocab_size = data.table, data.meta["vocab_size"]
known = ~untrained_in(data)
own_tokens, _ = token_bytes(own)
# the LM's row for a string of bytes: its normal tokens' (one per string, the one its tokenizer
# produces), then its special tokens' by literal, then by role
by_bytes = {spelling: i for i, (spelling, flags) in enumerate(own_tokens) if known[i] and not flags & {"special", "duplicate"}}
own_specials = {spelling: i for i, (spelling, flags) in enumerate(own_tokens) if known[i] and "special" in flags}
roles = ("bos_token_id", "eos_token_id", "pad_token_id")
role_rows = {role: getattr(own, role) for role in roles[1:] if getattr(own, role) is not None and known[getattr(own, role)]}
if bos_id(own) is not None:
    role_rows["bos_token_id"] = bos_id(own)
elif "eos_token_id" in role_rows:
    role_rows["bos_token_id"] = role_rows["eos_token_id"]  # an LM without BOS has no row for one: its EOS, for want of a better
new_tokens, _ = token_bytes(new)
source = torch.full((len(new_tokens),), -1)  # the LM's id whose rows a token of T takes; -1: made by the method
for i, (spelling, flags) in enumerate(new_tokens):
    source[i] = (own_specials if "special" in flags else by_bytes).get(spelling, -1)
for role in roles:
    # a BOS only where T puts one before every text (SmolLM2's bos_token is a chat marker it never puts there)
    if getattr(new, role) is not None and role in role_rows and (role != "bos_token_id" or bos_id(new) is not None):
        source[getattr(new, role)] = role_rows[role]
made = (source < 0).nonzero()[:, 0]
print(f"{model} given the tokenizer of {tokenizer}: {len(new_tokens)} tokens, {len(new_tokens) - len(made)} with the LM's own rows, "
      f"{len(made)} made by {', '.join(method_list)}")
encoder = load_checkpoint(out_dir, {"model": model, "vocab_size": vocab_size, "dim": table.shape[1]}, checkpoint) if "soft" in method_list else None


made_spelled = [new_tokens[i][0] for i in made.tolist()]
# the encoder reads at most its block of bytes: a longer token (a run of spaces, say) gets FVT's row instead
readable = torch.tensor([0 < len(s) <= encoder["model_args"]["block_size"] - 2 for s in made_spelled]) if encoder else None


def made_rows(method):
    """Rows for T's tokens the LM lacks."""
    if method != "soft":
        return new_rows(method, made_spelled, table, known, own, None)
    rows = torch.empty(len(made_spelled), table.shape[1])
    if (~readable).any():
        print(f"soft: {int((~readable).sum())} tokens are longer than the encoder's {encoder['model_args']['block_size'] - 2} bytes (or empty) and get fvt's row")
        rows[~readable] = new_rows("fvt", [s for s, r in zip(made_spelled, readable) if not r], table, known, own, None)
    if readable.any():
        rows[readable] = new_rows("soft", [s for s, r in zip(made_spelled, readable) if r], table, known, own, encoder)
    return rows


def transferred_lm(method):
    """A fresh copy of the LM reading and writing T's tokens."""
    lm, _ = load_lm(model, device=dev)
    check_lm_table(lm.get_input_embeddings().weight, data, model)
    head = lm.get_output_embeddings().weight
    tied = head is lm.get_input_embeddings().weight
    old_head = head.detach()[:vocab_size].clone()
    shared = source >= 0
    rows = torch.empty(len(new_tokens), table.shape[1])
    rows[shared] = table[source[shared]]
    rows[made] = made_rows(method)
    lm.resize_token_embeddings(len(new_tokens), mean_resizing=False)
    with torch.no_grad():
        embed = lm.get_input_embeddings().weight
        embed[:] = rows.to(embed.dtype)
        if not tied:
            head = lm.get_output_embeddings().weight
            head[shared] = old_head[source[shared]]
            head[made] = old_head[~untrained_rows(old_head)].float().mean(0).to(head.dtype)
    for role in roles:
        setattr(lm.config, role, getattr(new, role))
        if lm.generation_config is not None:
            setattr(lm.generation_config, role, getattr(new, role))
    return lm.eval()


def adapt(lm):
    """Train the encoder through the frozen LM reading T (e2e.new_vocabulary_loss) plus train.py's
    MSE on some of the LM's own tokens, then put the trained encoder's rows for every made token
    it reads into the LM. Returns what a report records of it."""
    trainee = load_encoder(encoder, dev).train()
    lm.requires_grad_(False)
    embed = lm.get_input_embeddings().weight
    learned = made[readable]
    spelled = [s for s, r in zip(made_spelled, readable) if r]
    learned_bytes = torch.from_numpy(encode_bytes(spelled, encoder["model_args"]["block_size"]).astype("int64"))
    residual = trainee.config.fvt_residual
    learned_fvt = fvt_rows(spelled, table, known, own).to(dev) if residual else None
    anchor_fvt = vocabulary_fvt_rows(own, table, data.train_ids).to(dev) if residual else None
    position = torch.full((len(new_tokens),), -1)  # T's tokens whose rows stay keep -1: the LM's own, and those too long for the encoder
    position[learned] = torch.arange(len(learned))
    text = training_text() + "\n\n" + "\n\n".join(own.batch_decode(data.sample_ids, skip_special_tokens=True))
    windows = text_windows(new, new(text, add_special_tokens=False, verbose=False)["input_ids"], adapt_context)
    if len(windows) < adapt_windows:
        raise UserError(f"the adaptation text makes {len(windows)} windows of {adapt_context} tokens, fewer than adapt_windows={adapt_windows}; lower them")
    dense = [p for p_name, p in trainee.named_parameters() if not p_name.startswith("ngram.")]
    optimizers = [torch.optim.AdamW(dense, lr=adapt_learning_rate, weight_decay=0.0)]
    if trainee.config.ngram_max and adapt_ngram_lr_scale:
        optimizers.append(torch.optim.SparseAdam([trainee.ngram.weight], lr=adapt_learning_rate * adapt_ngram_lr_scale))
    generator = torch.Generator().manual_seed(seed)

    def rows_of(byte_ids, fvt, chunk=256):
        """The encoder's rows, with gradients, for tokens spelled byte_ids [N, block] (fvt: their
        FVT rows, or None), in chunks of similar length: one token of 80 bytes would pad a whole batch to it."""
        order = (byte_ids != PAD).sum(1).argsort()
        rows = [trainee(trim_padding(byte_ids[part]).to(dev), fvt=None if fvt is None else fvt[part.to(dev)])[0] for part in order.split(chunk)]
        return torch.cat(rows)[order.argsort().to(dev)] if rows else torch.zeros(0, table.shape[1], device=dev)

    def made_rows_of(at):
        return rows_of(learned_bytes[at], None if learned_fvt is None else learned_fvt[at.to(dev)])

    steps, seconds, losses, mse = 0, 0.0, [], None
    bar = progress(total=round(adapt_seconds), unit="s", desc="adapting")
    while seconds < adapt_seconds:
        started = time.time()
        batch = windows[torch.randint(0, len(windows), (adapt_windows,), generator=generator)]
        loss = new_vocabulary_loss(lm, batch, position, made_rows_of, adapt_negatives, generator)
        anchors = data.train_ids[torch.randint(0, len(data.train_ids), (adapt_regression_tokens,), generator=generator)]
        if len(anchors):
            predicted = rows_of(data.input_ids[anchors], None if anchor_fvt is None else anchor_fvt[anchors.to(dev)])
            mse = F.mse_loss(predicted.float() / trainee.config.row_scale, table[anchors].to(dev) / trainee.config.row_scale)
        total = loss + mse_weight * mse if len(anchors) else loss
        if not torch.isfinite(total):
            raise UserError(f"the adaptation loss became {total.item()} at step {steps}; lower adapt_learning_rate")
        total.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        for optimizer in optimizers:
            optimizer.step()
        trainee.zero_grad(set_to_none=True)
        steps, seconds = steps + 1, seconds + time.time() - started
        losses.append(round(loss.item(), 4))
        bar.update(min(round(seconds), bar.total) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.3f}", mse="-" if mse is None else f"{mse.item():.4f}", s_per_step=f"{seconds / steps:.2f}", refresh=False)
    bar.close()
    started = time.time()
    trainee.eval()
    with torch.no_grad():
        embed[learned.to(dev)] = trainee.predict(learned_bytes, fvt=learned_fvt).to(dev, embed.dtype)
    return {"steps": steps, "seconds": round(seconds, 1), "predict_seconds": round(time.time() - started, 1), "losses": losses,
            "learning_rate": adapt_learning_rate, "context": adapt_context, "windows": adapt_windows, "negatives": adapt_negatives,
            "regression_tokens": adapt_regression_tokens, "mse_weight": mse_weight, "seed": seed, "text_windows": len(windows)}


# -----------------------------------------------------------------------------
# bits per byte, the LM with its own tokenizer against the LM with T

texts = selection_text() if selection else evaluation_texts()
if text_file:
    texts[os.path.basename(text_file)] = read_text_file(text_file)
texts = {text_name: text[:eval_chars] for text_name, text in texts.items()}


def windows_of(tok, text):
    windows = text_windows(tok, tok(text, add_special_tokens=False, verbose=False)["input_ids"], context)
    if len(windows) == 0:
        raise UserError(f"a text's first {eval_chars} characters make no window of context={context} tokens; raise eval_chars or lower context")
    return windows


new_windows = {text_name: windows_of(new, text) for text_name, text in texts.items()}
uses = {text_name: {"tokens_the_lm_lacks": int(torch.isin(w, made).sum()), "distinct": int(torch.isin(w.unique(), made).sum()), "tokens": w.numel()}
        for text_name, w in new_windows.items()}
lm, _ = load_lm(model, device=dev)
own_lengths, new_lengths = byte_lengths(own), byte_lengths(new)
results = {text_name: {"original": bits_per_byte(lm, windows_of(own, text), own_lengths)} for text_name, text in texts.items()}
del lm
adapted = None
for method in progress(method_list, desc="methods", leave=False):
    lm = transferred_lm(method)
    for text_name in texts:
        results[text_name][method] = bits_per_byte(lm, new_windows[text_name], new_lengths)
    if method == "soft" and adapt_seconds:
        adapted = adapt(lm)
        print(f"adapted the encoder for {adapted['steps']} steps in {adapted['seconds']:.0f} s ({adapted['seconds'] / adapted['steps']:.2f} s a step), "
              f"then {adapted['predict_seconds']:.0f} s to predict the {int(readable.sum())} made rows again; loss {mean(adapted['losses'][:10]):.3f} -> {mean(adapted['losses'][-10:]):.3f} nats (the first and last 10 steps)")
        for text_name in texts:
            results[text_name]["soft+adapted"] = bits_per_byte(lm, new_windows[text_name], new_lengths)
    if save:
        save_model_folder(lm, new, save)
    del lm
columns = method_list + (["soft+adapted"] if adapted else [])

print(f"\nbits per byte, each text's first {eval_chars} characters in windows of {context} tokens; excess over the original in brackets")
print("| text | T's tokens the LM lacks (distinct) | original | " + " | ".join(columns) + " |")
print("|---|---:|---:|" + "---:|" * len(columns))
for text_name, result in results.items():
    base = result["original"]
    cells = [f"{result[m]:.4f} ({result[m] - base:+.4f})" for m in columns]
    print(f"| {text_name} | {uses[text_name]['tokens_the_lm_lacks']} ({uses[text_name]['distinct']}) | {base:.4f} | " + " | ".join(cells) + " |")

report = {"model": model, "table_sha256": data.meta["table_sha256"], "data_sha256": data.meta["data_sha256"], "tokenizer": tokenizer, "methods": columns, "eval_chars": eval_chars, "context": context, "adapted": adapted,
          "tokens": len(new_tokens), "made": len(made), "bits_per_byte": results, "uses": uses,
          "source": checkpoint_source(encoder, out_dir) if encoder is not None else None}
fig, ax = plt.subplots(figsize=(7, 4))
width = 0.8 / len(columns)
for k, method in enumerate(columns):
    ax.bar([t + k * width for t in range(len(results))], [r[method] - r["original"] for r in results.values()], width, label=method)
ax.set_xticks([t + 0.4 - width / 2 for t in range(len(results))], [t[:40] for t in results], fontsize=7)
ax.set_ylabel("bits per byte over the original")
ax.set_title(f"{model} reading the tokenizer of {os.path.basename(tokenizer.rstrip('/'))}, zero-shot"
             + (f", and soft adapted for {adapted['seconds']:.0f} s" if adapted else ""), fontsize=9)
ax.legend()
fig.tight_layout()
json_path, png_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.png")
atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_report(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


atomic_write(json_path, write_report)
print(f"\nwrote {json_path} and {png_path}" + (f"; the LM with the new tokenizer in {save}" if save else ""))
