"""
How well does the trained byte encoder predict the LM's embedding table? Predicts every
row, reports the prototype's top-1 accuracy, cosine and norms per group of tokens and by
byte length, draws two plots, and saves the predicted table (with the id of the checkpoint it
came from) for the splice test and tokens.py.
A `# %%` notebook: run it cell by cell in VS Code or Jupyter, or top to bottom:

$ python evaluate.py config/smollm2_cpu.py
$ python evaluate.py config/smollm2_cpu.py --checkpoint=regression   # train.py's ckpt.pt, not the e2e stage
$ python evaluate.py config/mistral_gpu.py --out_dir=out-mistral-long
"""
# %%
import json
import os
import sys
import time

import matplotlib
matplotlib.use("Agg")  # plots go to PNG files; no display needed
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from soft_tokenizer.configurator import check, configure, pick_device, progress
from soft_tokenizer.filling import vocabulary_fvt_rows
from soft_tokenizer.lm import load_tokenizer, resolve_model
from soft_tokenizer.metrics import closeness, top1_hits
from model import PAD
from soft_tokenizer.splice import PREDICTED_FILE, write_predicted_table
from soft_tokenizer.storage import atomic_write, check_writable, checkpoint_source, data_identity, load_checkpoint, load_data, load_encoder, write_text_file

model = "smollm2"  # whose table: data/<name>/ from prepare_mistral_data.py
out_dir = "out-smollm2"  # holds the checkpoints; the plots, eval.json and new_embeddings.safetensors go here too
checkpoint = "auto"  # regression (train.py's ckpt.pt), e2e (train_e2e.py's e2e.pt), or auto: the last stage that ran
predict_batch_size = 1024  # tokens per encoder forward pass
top1_rows = 0  # top-1 is V x V x D work: 0 scores every row, else this many rows drawn at random (the same ones each run)
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
# inside a Jupyter kernel sys.argv holds the kernel's own flags: edit the globals above instead
configure(globals(), [] if "ipykernel" in sys.modules else None)
check(globals(), "predict_batch_size", 1)
check(globals(), "top1_rows", 0)
device = pick_device(device)
started = time.time()

# %% load the prepared data and the checkpoint trained on it
data = load_data(model)
checkpoint = load_checkpoint(out_dir, data_identity(data), checkpoint)
source = checkpoint_source(checkpoint, out_dir)
check_writable(out_dir)
encoder = load_encoder(checkpoint, device)
input_ids, table = data.input_ids, data.table
vocab_size, dim = table.shape
print(f"{data.meta['model']}: table {vocab_size}x{dim}; checkpoint {source['checkpoint']} ({checkpoint['stage']} stage"
      + (f", {checkpoint['e2e']['steps']} e2e steps after" if checkpoint["stage"] == "e2e" else ",") + f" iteration {checkpoint['iter_num']})")

# %% predict the whole table, untrained and duplicate rows included: new tokens are the point.
# This prediction, as it is, is what test_mistral.py splices in and tokens.py's soft rows are
fvt = vocabulary_fvt_rows(load_tokenizer(resolve_model(model, only_embeddings=True)[0]), table, data.train_ids) if encoder.config.fvt_residual else None
predicted = encoder.predict(input_ids, predict_batch_size, fvt)
# argmax over the whole table, chunked; on the device because it is V x V x D work. Rows not
# scored (top1_rows) are NaN and left out of every group's top-1
ids = torch.arange(vocab_size)
if 0 < top1_rows < vocab_size:
    ids = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))[:top1_rows].sort().values
table_dev, chunk = table.to(device), 8192
hits = torch.full((vocab_size,), float("nan"))
hits[ids] = torch.cat([top1_hits(predicted[chunk_ids].to(device), table_dev, chunk_ids.to(device)).cpu().float()
                       for chunk_ids in progress(ids.split(chunk), desc="top-1", leave=False)])
del table_dev
cosine = F.cosine_similarity(predicted, table, dim=1)
norm_original, norm_predicted = table.norm(dim=1), predicted.norm(dim=1)
mean_row = table[data.train_ids].mean(0)

# %% the numbers per group; special tokens also sit in trained or held-out, the rest are disjoint.
# "in text" counts every token as often as the training text uses it: that is what a spliced LM reads;
# "LM's text", every token of the LM's own sampled text by the LM's share of it (prepare's lm_share):
# what it reads in general, beyond the docstrings' domain
def flagged(flag):
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[[t["id"] for t in data.meta["tokens"] if flag in t["flags"]]] = True
    return mask


def id_mask(token_ids):
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[token_ids] = True
    return mask


groups = {"trained": id_mask(data.train_ids), "val": id_mask(data.val_ids), "held-out": id_mask(data.test_ids),
          "in text": data.text_counts > 0, "LM's text": id_mask(data.sample_ids.flatten()) & (data.lm_share > 0),
          "special": flagged("special"), "untrained": flagged("untrained"), "duplicate": flagged("duplicate"),
          "all": torch.ones(vocab_size, dtype=torch.bool)}


def summarize(mask, weights=None):
    if not mask.any():
        return {"count": 0, "top1": None, "cosine": None, "explained": None, "norm_original": None, "norm_predicted": None}
    weights = torch.ones(int(mask.sum())) if weights is None else weights[mask].float()
    share = weights / weights.sum()
    scored = ~hits[mask].isnan()
    top1 = (weights[scored] * hits[mask][scored]).sum().item() / weights[scored].sum().item() if scored.any() else None
    return {"count": int(mask.sum()), "top1": top1,
            **closeness(predicted[mask], table[mask], mean_row, weights),
            "norm_original": (share * norm_original[mask]).sum().item(), "norm_predicted": (share * norm_predicted[mask]).sum().item()}


weighting = {"in text": data.text_counts, "LM's text": data.lm_share}
summary = {name: summarize(mask, weighting.get(name)) for name, mask in groups.items()}
print(f"\n{'group':<10} {'tokens':>7} {'top-1':>7} {'cosine':>7} {'expl.var':>8} {'norm orig':>10} {'norm pred':>10}")
for name, g in summary.items():
    if g["count"] == 0:
        print(f"{name:<10} {0:>7} {'-':>7} {'-':>7} {'-':>8} {'-':>10} {'-':>10}")
    else:
        top1 = "-" if g["top1"] is None else f"{g['top1']:.2%}"
        print(f"{name:<10} {g['count']:>7} {top1:>7} {g['cosine']:>7.3f} {g['explained']:>8.3f} "
              f"{g['norm_original']:>10.3f} {g['norm_predicted']:>10.3f}")
print(f"(in text: weighted by each token's count in the {data.meta['training_text_tokens']} tokens of the training text; "
      f"LM's text: by the LM's share of it over its {data.sample_ids.numel()} tokens of sampled text)")
if summary["untrained"]["count"] or summary["duplicate"]["count"]:
    # the original rows of untrained tokens are noise and a duplicate's prediction is its owner's
    print("(untrained and duplicate rows have no real target: only their norms say something)")

# %% accuracy by byte length: long tokens are rarer and their bytes say more, so they behave differently
byte_length = (input_ids != PAD).sum(1) - 2
buckets = [str(n) for n in range(1, 11)] + ["11-15", "16+"]
# bucket i holds lengths up to edge i: 1..10 one by one, then 11-15, then the rest
bucket_of = torch.bucketize(byte_length, torch.tensor(list(range(1, 11)) + [15]))
by_length = {}
for split in ("trained", "held-out"):
    by_length[split] = []
    for i, label in enumerate(buckets):
        g = summarize(groups[split] & (bucket_of == i))
        by_length[split].append({"bytes": label, "count": g["count"], "top1": g["top1"], "cosine": g["cosine"], "explained": g["explained"]})
print(f"\n{'bytes':<6} {'trained':>8} {'top-1':>7} {'cosine':>7} {'held-out':>9} {'top-1':>7} {'cosine':>7}")
for train_row, val_row in zip(by_length["trained"], by_length["held-out"]):
    cells = [f"{row['count']:>{w}} " + (f"{'-' if row['top1'] is None else format(row['top1'], '.2%'):>7} {row['cosine']:>7.3f}"
                                        if row["count"] else f"{'-':>7} {'-':>7}")
             for row, w in ((train_row, 8), (val_row, 9))]
    print(f"{train_row['bytes']:<6} " + " ".join(cells))

# %% plots
fig, ax = plt.subplots(figsize=(8, 4.5))
top = torch.quantile(torch.cat([norm_original, norm_predicted]), 0.999).item()
bins = torch.linspace(0, top, 81).numpy()
ax.hist(norm_original.numpy(), bins=bins, histtype="stepfilled", alpha=0.35, color="C0", label="original rows")
ax.hist(norm_predicted.numpy(), bins=bins, histtype="step", linewidth=1.8, color="C3", label="predicted rows")
ax.set_xlabel("row norm (L2)")
ax.set_ylabel("tokens")
ax.set_title(f"{data.meta['name']}: embedding row norms, all {vocab_size} tokens")
ax.legend()
fig.tight_layout()
atomic_write(os.path.join(out_dir, "norms.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
plt.close(fig)

fig, (acc_ax, cos_ax, count_ax) = plt.subplots(3, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.2]})
x = torch.arange(len(buckets)).numpy()
for offset, split, color in ((-0.2, "trained", "C0"), (0.2, "held-out", "C1")):
    acc_ax.bar(x + offset, [r["top1"] or 0.0 for r in by_length[split]], width=0.4, color=color, label=split)
    cos_ax.bar(x + offset, [r["cosine"] or 0.0 for r in by_length[split]], width=0.4, color=color)
    count_ax.bar(x + offset, [r["count"] for r in by_length[split]], width=0.4, color=color)
acc_ax.set_ylim(0, 1)
acc_ax.set_ylabel("top-1 accuracy")
acc_ax.set_title(f"{data.meta['name']}: top-1 and cosine to the true row by token length")
acc_ax.legend()
cos_ax.set_ylim(0, 1)
cos_ax.set_ylabel("cosine")
for ax in (acc_ax, cos_ax):
    ax.grid(axis="y", alpha=0.3)
count_ax.set_yscale("log")
count_ax.set_ylabel("tokens")
count_ax.set_xlabel("token length in bytes")
count_ax.set_xticks(x, buckets)
fig.tight_layout()
atomic_write(os.path.join(out_dir, "accuracy_by_length.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
plt.close(fig)

# %% save the prediction for test_mistral.py, and the numbers for bench and README
write_predicted_table(out_dir, predicted, checkpoint)
report = {**source, "revision": data.meta["revision"], "table_sha256": data.meta["table_sha256"],
          "groups": summary, "by_length": by_length, "seconds": round(time.time() - started, 1)}
write_text_file(os.path.join(out_dir, "eval.json"), json.dumps(report, indent=1) + "\n")
print(f"\nwrote {out_dir}/{PREDICTED_FILE}, eval.json, norms.png, accuracy_by_length.png in {report['seconds']:.0f}s")
