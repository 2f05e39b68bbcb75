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
$ python transfer.py --model=smollm2 --tokenizer=gemma3 --methods=soft --save=smollm2-gemma-tokenizer

Writes out_dir/NAME.json (the table and what it came from) and out_dir/NAME.png; with --save
and one method, the LM with the new tokenizer as a folder stock transformers loads.
"""
import json
import os

import matplotlib
matplotlib.use("Agg")  # plots go to PNG files; no display needed
import matplotlib.pyplot as plt
import torch

from soft_tokenizer.configurator import UserError, check, configure, pick_device, progress
from soft_tokenizer.filling import METHODS, new_rows
from soft_tokenizer.lm import EMBEDDED, bits_per_byte, bos_id, evaluation_texts, load_lm, load_tokenizer, read_text_file, resolve_model, text_windows
from soft_tokenizer.spelling import byte_lengths, token_bytes, untrained_rows
from soft_tokenizer.storage import (atomic_write, check_lm_table, check_writable, checkpoint_source, load_checkpoint, load_data,
                                    save_model_folder, untrained_in)

model = "smollm2"  # the LM: hub id, local folder, or "smollm2"; its data must be prepared (prepare_mistral_data.py)
out_dir = "out-smollm2"  # the encoder checkpoint soft reads; NAME.json and NAME.png are written here
checkpoint = "auto"  # regression, e2e, or auto: the last stage that ran
tokenizer = "gemma3"  # the new tokenizer: a hub id, a local folder with tokenizer files, or "smollm2" / "gemma3"
methods = "soft,fvt,mean"  # how the rows of T's tokens that the LM lacks are made (filling.py), each measured
save = ""  # with one method: write the LM with T here (a new folder)
text_file = ""  # a further UTF-8 text to measure on, beside the two evaluation texts
eval_chars = 20000  # each text's first this many characters are measured (about 30 s a method and text for SmolLM2 on 2 CPU cores)
context = 512  # tokens per window, each led by the tokenizer's BOS where it has one
name = "transfer"  # out_dir/NAME.json and out_dir/NAME.png
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
configure(globals())
check(globals(), "eval_chars", 1)
check(globals(), "context", 2)
method_list = [m for m in methods.split(",") if m]
if not method_list or set(method_list) - set(METHODS) or len(set(method_list)) != len(method_list):
    raise UserError(f"methods={methods!r}: give distinct names from {', '.join(METHODS)}, separated by commas")
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
    new = load_tokenizer(resolve_model(tokenizer)[0] if tokenizer in EMBEDDED else tokenizer)
except (OSError, ValueError) as e:
    raise UserError(f"no tokenizer found at {tokenizer!r} ({type(e).__name__}); pass a folder with tokenizer files, a hub id, smollm2 or gemma3") from None
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


# -----------------------------------------------------------------------------
# bits per byte, the LM with its own tokenizer against the LM with T

texts = evaluation_texts()
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
for method in progress(method_list, desc="methods", leave=False):
    lm = transferred_lm(method)
    for text_name in texts:
        results[text_name][method] = bits_per_byte(lm, new_windows[text_name], new_lengths)
    if save:
        save_model_folder(lm, new, save)
    del lm

print(f"\nbits per byte, each text's first {eval_chars} characters in windows of {context} tokens; excess over the original in brackets")
print("| text | T's tokens the LM lacks (distinct) | original | " + " | ".join(method_list) + " |")
print("|---|---:|---:|" + "---:|" * len(method_list))
for text_name, result in results.items():
    base = result["original"]
    cells = [f"{result[m]:.4f} ({result[m] - base:+.4f})" for m in method_list]
    print(f"| {text_name} | {uses[text_name]['tokens_the_lm_lacks']} ({uses[text_name]['distinct']}) | {base:.4f} | " + " | ".join(cells) + " |")

report = {"model": model, "table_sha256": data.meta["table_sha256"], "data_sha256": data.meta["data_sha256"], "tokenizer": tokenizer, "methods": method_list, "eval_chars": eval_chars, "context": context,
          "tokens": len(new_tokens), "made": len(made), "bits_per_byte": results, "uses": uses,
          "source": checkpoint_source(encoder, out_dir) if encoder is not None else None}
fig, ax = plt.subplots(figsize=(7, 4))
width = 0.8 / len(method_list)
for k, method in enumerate(method_list):
    ax.bar([t + k * width for t in range(len(results))], [r[method] - r["original"] for r in results.values()], width, label=method)
ax.set_xticks([t + 0.4 - width / 2 for t in range(len(results))], [t[:40] for t in results], fontsize=7)
ax.set_ylabel("bits per byte over the original")
ax.set_title(f"{model} reading the tokenizer of {os.path.basename(tokenizer.rstrip('/'))}, zero-shot", fontsize=9)
ax.legend()
fig.tight_layout()
json_path, png_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.png")
atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_report(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)


atomic_write(json_path, write_report)
print(f"\nwrote {json_path} and {png_path}" + (f"; the LM with the new tokenizer in {save}" if save else ""))
