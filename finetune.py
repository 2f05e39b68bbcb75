"""
Does a token's first row matter once fine-tuning starts? finetune.py gives the same tokens rows
by several methods and fine-tunes one copy of the LM per method, the same way (same batches in
the same order, same seed), on a text that uses them. It logs the loss on the whole text and at
the new tokens (positions where a new token is read or predicted), on the training part and on
a held-out part (every tenth document), for two settings: only the new tokens' rows train, or
the whole model does.

$ python finetune.py --model=smollm2 --out_dir=out-smollm2                  # 300 new words of numpy's docs
$ python finetune.py --model=smollm2 --steps=0 --methods=fvt,soft,fvt+distill,soft+distill --text_file=notes.txt   # zero-shot only
$ python finetune.py config/finetune_gemma3_tags.py                          # Gemma's <unused1/2> as code tags
$ python finetune.py --steps=0 --selection=True --held_out_every=4 --new_words=150   # choose on the selection text

Methods: soft (the encoder's row from the token's name, a checkpoint in out_dir), fvt and mean
(filling.py), each also refined by Token Distillation on the training part (soft+distill, ...:
soft_tokenizer/distill.py), and, for added tokens, what transformers' resize_token_embeddings gives without
help: random (normal, std initializer_range) and mean_resizing (samples around the mean of all
old rows, after Hewitt 2021); for repurposed tokens, shipped (the rows as the model ships them).
The tokens: new_words adds the training part's most frequent words that the tokenizer splits
into pieces (each its own spelling); rows_from names them (JSON {token: name}): a token the
vocabulary has is repurposed (its row is made from the name, and the name, where the text
writes it, is read as the token: "<code>" becomes <unused1>), any other is added.
Before any training, the zero-shot table: the LM's bits per byte on the held-out part with the
new tokens, per method, against the original LM reading the same text with its own tokenizer.
The excess over the original is the figure (bits, not perplexity per token: the two tokenizers
cut the text into different tokens). "input and output": in a tied LM the method's row serves
both sides, as after tokens.py add; "input only": the new tokens' output rows are the mean of
the trained output rows whatever the method (in an untied LM always so; tokens.py says why).
--steps=0 stops there.
Writes out_dir/NAME.json (the zero-shot table, every curve, and what they came from),
out_dir/NAME-zero-shot.png and out_dir/NAME.png.
"""
import collections
import hashlib
import json
import os
import re
import time

import matplotlib
matplotlib.use("Agg")  # plots go to PNG files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from tqdm import tqdm

from soft_tokenizer.configurator import UserError, check, configure, pick_device, progress
from soft_tokenizer.distill import distill_rows
from soft_tokenizer.filling import add_tokens, fill_output_rows, new_rows, read_names, set_rows
from soft_tokenizer.lm import bits_per_byte, finetune_text, load_lm, load_tokenizer, read_text_file, resolve_model, selection_text, text_windows, untie_head
from soft_tokenizer.spelling import byte_lengths, tokenizer_kind, vocab_id
from soft_tokenizer.storage import atomic_write, check_lm_table, checkpoint_source, load_checkpoint, load_data, save_model_folder, untrained_in, write_text_file

model = "smollm2"  # hub id, local folder, or "smollm2"; its data must be prepared (prepare_mistral_data.py)
out_dir = "out-smollm2"  # the encoder checkpoint soft reads; NAME.json and NAME.png are written here
checkpoint = "auto"  # regression, e2e, or auto: the last stage that ran
name = "finetune"  # out_dir/NAME.json and out_dir/NAME.png
text_file = ""  # UTF-8 text, documents separated by blank lines; empty: numpy's documentation (lm.finetune_text)
# instead: the selection text (lm.selection_text, which README never reports), to choose a
# setting or an encoder on; it is short: pass --held_out_every=4 --new_words=150 (Gemma: 120)
selection = False
code_tags = False  # the default text with every doctest example between lines <code> and </code>
new_words = 300  # add the training part's most frequent words (" word", space included) that the tokenizer splits in pieces
rows_from = ""  # instead: a JSON file {token: name}; a token the vocabulary has is repurposed, any other added
methods = "soft,fvt,mean,mean_resizing,random"  # for repurposed tokens: shipped instead of mean_resizing, random; soft+distill (fvt+, mean+): refined by Token Distillation
# Token Distillation (soft_tokenizer/distill.py, whose defaults these are) on the training part:
# places per token, the tokens before and after each, optimizer steps of distill_batch places,
# Adam's step in units of a typical coordinate of the rows, and the LM layers whose residual
# stream is matched (0: all, six times the cost of 4 on SmolLM2)
distill_contexts = 8
distill_before = 24
distill_after = 8
distill_steps = 60
distill_batch = 32
distill_lr = 0.02
distill_layers = 4
train_params = "new_rows,all"  # new_rows: only the new tokens' rows (input and output) train; all: the whole model
steps = 20  # optimizer steps per method and setting; 0: the zero-shot table only (20 x 4 x 128 tokens: about 17 minutes for 5 methods x 2 settings on 2 CPU cores)
finetune_batch_size = 4  # windows per step
finetune_context = 128  # tokens per window
finetune_learning_rate = 1e-3  # new_rows: Adam on the rows alone
finetune_learning_rate_all = 5e-5  # all: the usual full fine-tuning rate
finetune_eval_interval = 4  # steps between evaluations
zero_shot_chars = 50000  # the zero-shot table reads the held-out part's first documents up to this many characters (about 80 s a method on SmolLM2 on 2 CPU cores, before any fine-tuning)
zero_shot_context = 512  # in windows of this many tokens, each led by the LM's BOS where it has one
eval_windows = 8  # windows of each part evaluated, drawn once among those that hold a new token (the same for every method)
held_out_every = 10  # every this many-th document is held out
seed = 0
save_models = False  # also write every fine-tuned model to out_dir/NAME-models/SETTING-METHOD (a folder stock transformers loads)
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
configure(globals())
for key in ("finetune_batch_size", "finetune_eval_interval", "eval_windows", "zero_shot_chars", "distill_contexts", "distill_before", "distill_after", "distill_batch"):
    check(globals(), key, 1)
check(globals(), "steps", 0)
check(globals(), "distill_steps", 0)
check(globals(), "distill_layers", 0)
check(globals(), "distill_lr", 0, low_open=True)
check(globals(), "finetune_context", 8)
check(globals(), "zero_shot_context", 2)
check(globals(), "held_out_every", 2)
check(globals(), "new_words", 0)
check(globals(), "finetune_learning_rate", 0, low_open=True)
check(globals(), "finetune_learning_rate_all", 0, low_open=True)
METHODS = ("soft", "fvt", "mean", "mean_resizing", "random", "shipped", "soft+distill", "fvt+distill", "mean+distill")
method_list = [m for m in methods.split(",") if m]
settings = [s for s in train_params.split(",") if s]
if not method_list or set(method_list) - set(METHODS) or len(set(method_list)) != len(method_list):
    raise UserError(f"methods={methods!r}: give distinct names from {', '.join(METHODS)}, separated by commas")
if not settings or set(settings) - {"new_rows", "all"} or len(set(settings)) != len(settings):
    raise UserError(f"train_params={train_params!r}: give new_rows, all, or new_rows,all")
if not rows_from and not new_words:
    raise UserError("no tokens to fine-tune: set new_words above 0 or pass --rows_from=FILE.json")
dev = pick_device(device)
models_dir = os.path.join(out_dir, f"{name}-models")
if save_models and os.path.exists(models_dir):
    # found only after all the fine-tuning, it would cost the run: refuse before it starts
    raise UserError(f"{models_dir} already exists; pass another --name or remove it, the models are never written over")


# -----------------------------------------------------------------------------
# the text and the tokens

def frequent_words(docs, tokenizer, kind, count):
    """The `count` most frequent words (" word") of `docs` that are no token yet but several pieces."""
    vocab = tokenizer.get_vocab()
    words = collections.Counter(w for doc in docs for w in re.findall(r" [A-Za-z]+", doc))
    chosen = []
    for word, _ in words.most_common():
        if len(chosen) == count:
            break
        if vocab_id(vocab, kind, word) is None and len(tokenizer(word, add_special_tokens=False)["input_ids"]) > 1:
            chosen.append(word)
    if len(chosen) < count:
        raise UserError(f"the text has only {len(chosen)} words that the tokenizer splits; lower new_words to at most that")
    return chosen


if selection and (text_file or code_tags):
    raise UserError("selection=True is a text of its own: leave out text_file and code_tags")
if selection:
    docs = [d for d in re.split(r"\n\s*\n", next(iter(selection_text().values()))) if d.strip()]
else:
    docs = [d for d in re.split(r"\n\s*\n", read_text_file(text_file)) if d.strip()] if text_file else finetune_text(code_tags)
if len(docs) < held_out_every:
    raise UserError(f"the text has {len(docs)} documents (separated by blank lines); a held-out part needs at least held_out_every={held_out_every}")
parts = {"train": [d for i, d in enumerate(docs) if (i + 1) % held_out_every],
         "held_out": docs[held_out_every - 1::held_out_every]}
data = load_data(model)
folder, revision = resolve_model(model)
tokenizer = load_tokenizer(folder)
kind = tokenizer_kind(tokenizer)
vocab = tokenizer.get_vocab()
names = read_names(rows_from) if rows_from else {w: w for w in frequent_words(parts["train"], tokenizer, kind, new_words)}
repurposed = {token: vocab_id(vocab, kind, token) for token in names if vocab_id(vocab, kind, token) is not None}
added = [token for token in names if token not in repurposed]
if repurposed and set(method_list) & {"random", "mean_resizing"}:
    raise UserError("random and mean_resizing are what resizing gives added tokens; for repurposed tokens compare shipped, mean, fvt, soft")
if added and "shipped" in method_list:
    raise UserError(f"shipped is for repurposed tokens, but {added[0]!r} is not a token of {model} yet; use random or mean_resizing")
original_parts = parts  # the text as the original LM reads it, names and all
for token in repurposed:  # the text writes a repurposed token by its name
    parts = {part: [d.replace(names[token], token) for d in part_docs] for part, part_docs in parts.items()}

# every method's rows come from the same evidence: the table's rows the detector trusts, minus the tokens being given new rows
table, vocab_size = data.table, data.meta["vocab_size"]
known = ~untrained_in(data)
known[list(repurposed.values())] = False
starts = {m.removesuffix("+distill") for m in method_list} & {"soft", "fvt", "mean"}
encoder = load_checkpoint(out_dir, {"model": model, "vocab_size": vocab_size, "dim": table.shape[1]}, checkpoint) if "soft" in starts else None
order_of_ids = list(repurposed) + added  # the order make_model gives the ids in
spelled = [names[token].encode("utf-8") for token in order_of_ids]
rows = {m: new_rows(m, spelled, table, known, tokenizer, encoder) for m in starts}
distill_seconds = {}  # what Token Distillation cost, per method
if any(m.endswith("+distill") for m in method_list):
    lm, _ = load_lm(model, device=dev)
    for method in [m for m in method_list if m.endswith("+distill")]:
        rows[method], distill_seconds[method], losses = distill_rows(lm, tokenizer, [names[t] for t in order_of_ids], rows[method.removesuffix("+distill")],
                                                     "\n\n".join(original_parts["train"]), distill_contexts, distill_before, distill_after,
                                                     distill_layers, distill_steps, distill_lr, distill_batch, seed)
        print(f"{method}: {distill_seconds[method]:.0f} s for {len(names)} tokens ({distill_seconds[method] / len(names):.2f} s a token); "
              f"the matching error {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last" if losses else "")
    del lm


def make_model(method):
    """A fresh copy of the LM with the tokens added or repurposed and their rows set by `method`;
    random draws come from `seed` every time, so each setting gets the same rows."""
    torch.manual_seed(seed)
    lm, tok = load_lm(model, device=dev)
    check_lm_table(lm.get_input_embeddings().weight, data, model)
    ids = list(repurposed.values())
    if added:
        # as tokens.py add makes them: matched anywhere, so " ufunc" is also the start of " ufuncs"
        ids += add_tokens(lm, tok, added, mean_resizing=method == "mean_resizing").tolist()
    ids = torch.tensor(ids)
    if method in rows:
        n = len(repurposed)
        set_rows(lm, ids[:n].to(dev), rows[method][:n], vocab_size, added=False)
        set_rows(lm, ids[n:].to(dev), rows[method][n:], vocab_size, added=True)
    return lm, tok, ids


print(f"{model}: {len(names)} tokens ({len(added)} added, {len(repurposed)} repurposed), e.g. " +
      ", ".join(f"{t!r}" + (f" as {names[t]!r}" if names[t] != t else "") for t in list(names)[:6]))


# -----------------------------------------------------------------------------
# zero-shot: bits per byte before any training

def first_documents(part_docs):
    """The first documents of a part, up to zero_shot_chars characters (at least one document)."""
    count, chars = 0, 0
    while count < len(part_docs) and (count == 0 or chars + len(part_docs[count]) <= zero_shot_chars):
        chars, count = chars + len(part_docs[count]) + 2, count + 1
    return "\n\n".join(part_docs[:count])


def zero_shot_windows(tok, text):
    windows = text_windows(tok, tok(text, add_special_tokens=False, verbose=False)["input_ids"], zero_shot_context)
    if len(windows) == 0:
        raise UserError(f"the zero-shot text (the held-out part's first {zero_shot_chars} characters) makes no window of "
                        f"zero_shot_context={zero_shot_context} tokens; raise zero_shot_chars or lower zero_shot_context")
    return windows


zero_shot_text = first_documents(parts["held_out"])
lm, tok = load_lm(model, device=dev)
tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
original_windows = zero_shot_windows(tok, first_documents(original_parts["held_out"]))
original_lengths = byte_lengths(tok)  # a Python loop over the vocabulary: once, the added ids come after it
zero_shot = {"original": {"input_and_output": bits_per_byte(lm, original_windows, original_lengths)}}
zero_shot["original"]["input_only"] = zero_shot["original"]["input_and_output"]
for method in progress(method_list, desc="zero-shot", leave=False):
    lm, tok, ids = make_model(method)
    windows = zero_shot_windows(tok, zero_shot_text)
    lengths = torch.cat([original_lengths, original_lengths.new_zeros(len(tok) - len(original_lengths))])
    lengths[ids] = torch.tensor([len(s) for s in spelled], dtype=lengths.dtype)  # a repurposed token stands for its name
    zero_shot[method] = {"input_and_output": bits_per_byte(lm, windows, lengths)}
    if untie_head(lm):
        fill_output_rows(lm, vocab_size, ids.to(dev))
        zero_shot[method]["input_only"] = bits_per_byte(lm, windows, lengths)
    else:  # untied: fill_output_rows already gave the new tokens the mean output row
        zero_shot[method]["input_only"] = zero_shot[method]["input_and_output"]
    zero_shot[method]["new_tokens"] = int(torch.isin(windows, ids).sum())
    zero_shot[method]["distill_seconds"] = distill_seconds.get(method, 0.0)
del lm
base = zero_shot["original"]["input_and_output"]
print(f"\nzero-shot: bits per byte on the held-out part's first {len(zero_shot_text)} characters, windows of {zero_shot_context} tokens "
      f"({original_windows.numel()} tokens with the original tokenizer); excess over the original in brackets" +
      ("" if tied else "; untied, so the new output rows are the mean output row in both columns"))
print("| rows | new tokens in the text | input and output | input only | seconds of distillation |")
print("|---|---:|---:|---:|---:|")
for method, result in zero_shot.items():
    cells = [f"{result[k]:.4f} ({result[k] - base:+.4f})" for k in ("input_and_output", "input_only")]
    print(f"| {method} | {result.get('new_tokens', 0)} | " + " | ".join(cells) + f" | {result.get('distill_seconds', 0):.0f} |")


new_ids, windows, counts, evaluated = ids, {}, {}, {}
if steps:
    windows = {part: text_windows(tok, tok("\n\n".join(part_docs), add_special_tokens=False, verbose=False)["input_ids"], finetune_context)
               for part, part_docs in parts.items()}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows["train"]), generator=generator)
    if steps * finetune_batch_size > len(order):
        raise UserError(f"{steps} steps of {finetune_batch_size} windows need {steps * finetune_batch_size} windows but the training part has {len(order)}; "
                        f"lower steps or finetune_batch_size, or use a longer text")
    counts = {part: int(torch.isin(w, new_ids).sum()) for part, w in windows.items()}
    for part, w in windows.items():
        holding = torch.isin(w, new_ids).any(1).nonzero()[:, 0]
        if len(holding) < eval_windows:
            raise UserError(f"only {len(holding)} windows of the {part.replace('_', '-')} part hold a new token; lower eval_windows or use a text that uses the tokens more")
        evaluated[part] = w[holding[torch.randperm(len(holding), generator=generator)[:eval_windows]]]
    print(f"text: {len(docs)} documents; training part {windows['train'].numel()} tokens ({counts['train']} new), "
          f"held-out part {windows['held_out'].numel()} tokens ({counts['held_out']} new); windows of {finetune_context}")


# -----------------------------------------------------------------------------
# fine-tuning

def token_losses(lm, batch):
    """The loss of every predicted token of `batch`, and where a new token is read or predicted."""
    batch = batch.to(dev)
    logits = lm(input_ids=batch[:, :-1]).logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
    new = (torch.isin(batch[:, 1:], new_ids.to(dev)) | torch.isin(batch[:, :-1], new_ids.to(dev))).flatten()
    return loss, new


@torch.no_grad()
def evaluate(lm):
    lm.eval()
    result = {}
    for part, w in evaluated.items():
        pairs = [token_losses(lm, w[i:i + finetune_batch_size]) for i in range(0, len(w), finetune_batch_size)]
        loss, new = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        result[part] = {"all": loss.mean().item(), "new": loss[new].mean().item()}
    lm.train()
    return result


def trainable(lm, setting):
    """The parameters an optimizer steps. new_rows: the input (and an untied model's output) table
    only, its gradient masked to the new tokens' rows, so Adam leaves every other row exactly as it was."""
    if setting == "all":
        return list(lm.parameters()), finetune_learning_rate_all
    for p in lm.parameters():
        p.requires_grad_(False)
    tables = {id(t): t for t in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)}.values()
    mask = torch.zeros(lm.get_input_embeddings().weight.shape[0], 1, device=dev)
    mask[new_ids] = 1.0
    for t in tables:
        t.requires_grad_(True)
        t.register_hook(lambda grad: grad * mask.to(grad.dtype))
    return list(tables), finetune_learning_rate


def fine_tune(method, setting):
    lm, tok, _ = make_model(method)
    lm.train()
    params, lr = trainable(lm, setting)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: rows that do not train stay as they are
    curve = {"step": [], "train": {"all": [], "new": []}, "held_out": {"all": [], "new": []}, "step_loss": []}
    started = time.time()
    for step in progress(range(steps + 1), desc=f"{setting} {method}", dynamic_ncols=True, mininterval=10):
        if step % finetune_eval_interval == 0 or step == steps:
            result = evaluate(lm)
            curve["step"].append(step)
            for part in result:
                for metric in result[part]:
                    curve[part][metric].append(result[part][metric])
            tqdm.write(f"{setting:>8} {method:<13} step {step:>4}: train {result['train']['all']:.4f} (new {result['train']['new']:.4f}), "
                       f"held-out {result['held_out']['all']:.4f} (new {result['held_out']['new']:.4f})")
        if step == steps:
            break
        loss = token_losses(lm, windows["train"][order[step * finetune_batch_size:(step + 1) * finetune_batch_size]])[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve["step_loss"].append(loss.item())
    curve["seconds"] = time.time() - started
    if save_models:
        save_model_folder(lm, tok, os.path.join(models_dir, f"{setting}-{method}"))
    return curve


runs = {setting: {} for setting in settings} if steps else {}
for setting in runs:
    for method in method_list:
        runs[setting][method] = fine_tune(method, setting)


# -----------------------------------------------------------------------------
# the report: a table per setting, the JSON and the plot

def reached(setting, part, metric):
    """Per method: the first evaluated step at which its loss is at most the loss mean ends at."""
    target = runs[setting]["mean"][part][metric][-1]
    return {m: next((s for s, v in zip(c["step"], c[part][metric]) if v <= target), None) for m, c in runs[setting].items()}


summary = {}
for setting in runs:
    print(f"\n{setting}: {steps} steps of {finetune_batch_size} x {finetune_context} tokens; loss on {eval_windows} windows of each part "
          f"(all tokens / where a new token is read or predicted)" + ("; 'reaches mean': first evaluated step at most mean's final loss" if "mean" in method_list else ""))
    columns = ["method"] + [f"{part} {metric}, step {when}" for part in ("train", "held_out") for metric in ("all", "new") for when in (0, steps)]
    summary[setting] = {}
    steps_to_mean = {(part, metric): reached(setting, part, metric) for part in ("train", "held_out") for metric in ("all", "new")} if "mean" in method_list else {}
    print("| method | " + " | ".join(f"{part} {metric}: step 0, step {steps}" + (", reaches mean" if steps_to_mean else "")
                                      for part in ("train", "held_out") for metric in ("all", "new")) + " | seconds |")
    print("|---|" + "---:|" * 5)
    for method, curve in runs[setting].items():
        cells = []
        for part in ("train", "held_out"):
            for metric in ("all", "new"):
                values = curve[part][metric]
                cell = f"{values[0]:.3f}, {values[-1]:.3f}"
                if steps_to_mean:
                    at = steps_to_mean[(part, metric)][method]
                    cell += f", {at if at is not None else 'no'}"
                cells.append(cell)
        summary[setting][method] = {f"{part}_{metric}_reaches_mean": steps_to_mean[(part, metric)][method] for part, metric in steps_to_mean}
        print(f"| {method} | " + " | ".join(cells) + f" | {curve['seconds']:.0f} |")

text_hash = hashlib.sha256("\n\n".join(docs).encode("utf-8")).hexdigest()
report = {
    "model": model, "revision": revision, "table_sha256": data.meta["table_sha256"],
    "text": {"source": "lm.selection_text()" if selection else text_file or f"lm.finetune_text(code_tags={code_tags})", "sha256": text_hash, "documents": len(docs),
             "held_out_every": held_out_every, "tokens": {part: w.numel() for part, w in windows.items()}, "new_tokens": counts},
    "tokens": [{"token": t, "name": names[t], "id": int(i), "repurposed": t in repurposed} for t, i in zip(order_of_ids, new_ids.tolist())],
    "encoder": checkpoint_source(encoder, out_dir) if encoder is not None else None,
    "settings": {k: globals()[k] for k in ("steps", "finetune_batch_size", "finetune_context", "finetune_learning_rate", "finetune_learning_rate_all", "finetune_eval_interval",
                                           "eval_windows", "zero_shot_chars", "zero_shot_context", "distill_contexts", "distill_before", "distill_after",
                                           "distill_steps", "distill_batch", "distill_lr", "distill_layers", "seed", "methods", "train_params", "new_words", "rows_from", "code_tags")},
    "zero_shot": {"characters": len(zero_shot_text), "context": zero_shot_context, "bits_per_byte": zero_shot},
    "runs": runs, "steps_to_mean": summary,
}
os.makedirs(out_dir, exist_ok=True)
json_path, png_path, zero_shot_png = (os.path.join(out_dir, f"{name}{suffix}") for suffix in (".json", ".png", "-zero-shot.png"))
write_text_file(json_path, json.dumps(report, indent=1))

fig, ax = plt.subplots(figsize=(7, 4))
excess = {m: r for m, r in zero_shot.items() if m != "original"}
for k, (column, label) in enumerate((("input_and_output", "input and output"), ("input_only", "input only"))):
    ax.bar([i + 0.4 * k for i in range(len(excess))], [r[column] - base for r in excess.values()], width=0.4, label=label)
ax.set_xticks([i + 0.2 for i in range(len(excess))], list(excess))
ax.axhline(0, color="k", linewidth=0.8)
ax.set_ylabel("bits per byte over the original")
ax.set_title(f"{model}: {len(names)} new tokens, zero-shot, the held-out part of {'the selection text' if selection else os.path.basename(text_file) or 'numpy docs'}", fontsize=10)
ax.legend()
ax.grid(alpha=0.3, axis="y")
fig.tight_layout()
atomic_write(zero_shot_png, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
plt.close(fig)
if not runs:
    print(f"\nwrote {json_path} and {zero_shot_png}")
    raise SystemExit

fig, axes = plt.subplots(len(runs), 4, figsize=(18, 4 * len(runs)), squeeze=False)
for r, setting in enumerate(runs):
    for c, (part, metric) in enumerate((p, m) for m in ("all", "new") for p in ("train", "held_out")):
        ax = axes[r][c]
        for method, curve in runs[setting].items():
            ax.plot(curve["step"], curve[part][metric], marker=".", label=method)
        ax.set_title(f"{setting}: {part.replace('_', '-')}, {'all tokens' if metric == 'all' else 'at the new tokens'}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[r][0].legend()
fig.suptitle(f"{model}: fine-tuning with {len(names)} new tokens' rows by each method", fontsize=11)
fig.tight_layout()
atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
plt.close(fig)
print(f"\nwrote {json_path}, {zero_shot_png} and {png_path}")
