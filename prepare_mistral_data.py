"""
Turn an LM's vocabulary into training data for the byte encoder, in data/<name>/:
  input_ids.npy   uint16 [V, block]  [start] bytes [end] pad...
  embeddings.npy  float32 [V, D]     the LM's input-embedding rows
  train_ids.npy   int64              the ids trained on
  val_ids.npy     int64              never trained on; they choose the checkpoint kept
  test_ids.npy     int64              the held-out ids, never trained on nor chosen by: the new-token test
  text_counts.npy int64 [V]          how often each token occurs in the training text (lm.training_text)
  sample_ids.npy  int64 [N, L]       the LM's own text (lm.sample_windows), to train on
  selection_ids.npy int64 [M, L]     more of it, never trained on: a selection text (test_mistral.py --selection=True)
  lm_share.npy    float64 [V]        the LM's expected share of each token over sample_ids
  meta.json       model, revision, sizes, hashes (table_sha256, data_sha256), and per token: text, bytes, flags
The LM is loaded to sample its own text; when its table is tied and its tokenizer names rows
unused or reserved, it also verifies the candidates (untrained.py). With no sampled text
(--sample_windows_train=0 --sample_windows_selection=0) and no candidates, only the tokenizer and
the shard that holds the input table are read.

$ python prepare_mistral_data.py                                       # the embedded SmolLM2-135M, offline
$ python prepare_mistral_data.py --model=mistralai/Mistral-7B-v0.1     # from the hub
$ python prepare_mistral_data.py --model=/path/to/hf/folder
"""
import json
import os

import numpy as np
import torch

from soft_tokenizer.configurator import UserError, check, configure, pick_device
from soft_tokenizer.lm import is_tied, load_lm, load_tokenizer, pick_dtype, read_input_embeddings, resolve_model, sample_windows, training_text
from model import PAD
from soft_tokenizer.spelling import encode_bytes, has_target, token_bytes
from soft_tokenizer.untrained import find_untrained
from soft_tokenizer.storage import DATA_FILES, atomic_write, data_dir, model_name, sha256, split_vocabulary, write_text_file

model = "smollm2"  # hub id, local folder, or "smollm2"
block_size = 50  # the prototype's width; grows to fit longer tokens, never truncates
test_fraction = 0.05  # share of the usable vocabulary held out, to measure what the encoder does on tokens it never saw
val_fraction = 0.02  # share held out to choose the checkpoint kept (train.py always_save_checkpoint=False), never the test
split_seed = 1337  # fixes the split
# the LM's own text, sampled: what it reads in general (where the docstrings are one domain), for
# the share of each token that train.py draws by and for windows of train_e2e.py; with 0 windows
# of each, the LM is not loaded (only its tokenizer and input table are read)
sample_windows_train = 128  # windows of sample_length tokens to train on (with the 32 below, about 90 s on SmolLM2 on 2 CPU cores)
sample_windows_selection = 32  # more, never trained on: half of the selection text that chooses the recipe
sample_length = 128
sample_seed = 1337
device = "auto"  # where the LM samples: auto is cuda, else cpu
configure(globals())
for key in ("sample_windows_train", "sample_windows_selection"):
    check(globals(), key, 0)
check(globals(), "sample_length", 2)
check(globals(), "test_fraction", 0.0, 1.0, high_open=True)
check(globals(), "val_fraction", 0.0, 1.0, high_open=True)

folder, revision = resolve_model(model, only_embeddings=True)
print(f"reading the tokenizer and the input embeddings of {model} ({folder})")
tokenizer = load_tokenizer(folder)
table, shard = read_input_embeddings(folder)
tokens, kind = token_bytes(tokenizer)
if len(tokens) > table.shape[0]:
    raise UserError(f"the tokenizer has {len(tokens)} tokens but the table only {table.shape[0]} rows; the tokenizer and the weights in {folder} do not belong together")
# rows past the tokenizer's vocabulary (padding to a multiple of 64) have no spelling
table = table[:len(tokens)]
# by their norm, or, in a tied table, by its geometry and then the LM (untrained.py; this loads the LM)
n_samples = sample_windows_train + sample_windows_selection
if n_samples:
    dev = pick_device(device)
    lm, _ = load_lm(model, dtype=pick_dtype("auto", dev), device=dev)
found = find_untrained(model, tokenizer, table, is_tied(folder), lm if n_samples else None)
untrained = found.untrained.tolist()
norms = table.norm(dim=1).tolist()
input_ids = encode_bytes([b for b, _ in tokens], block_size)

entries = []
for i, ((data, flags), dead, norm) in enumerate(zip(tokens, untrained, norms)):
    if dead:
        flags = flags | {"untrained"}
    entries.append({"id": i, "text": data.decode("utf-8", errors="replace"), "bytes": data.hex(),
                    "norm": round(norm, 5), "flags": sorted(flags)})
train_ids, val_ids, test_ids = split_vocabulary([e["id"] for e in entries if has_target(e["flags"])], test_fraction, val_fraction, split_seed)
if len(train_ids) == 0:
    raise UserError(f"no token of {model} is left to train on (test_fraction={test_fraction}, val_fraction={val_fraction}, "
                    f"{len(test_ids) + len(val_ids)} usable tokens); lower them")
# how often each token occurs in text, for weighting and for scores that count what text uses
text_ids = tokenizer(training_text(), add_special_tokens=False)["input_ids"]
counts = np.bincount(np.asarray(text_ids, dtype=np.int64), minlength=len(tokens))[:len(tokens)]
if n_samples:
    samples, share = sample_windows(lm, tokenizer, n_samples, sample_length, sample_seed)
    del lm
else:
    samples, share = torch.zeros((0, sample_length), dtype=torch.int64), torch.zeros(len(tokens), dtype=torch.float64)
sample_ids, selection_ids = samples[:sample_windows_train].numpy(), samples[sample_windows_train:].numpy()
arrays = dict(zip(DATA_FILES, (input_ids, table.numpy().astype(np.float32), train_ids.numpy(), val_ids.numpy(), test_ids.numpy(), counts,
                               sample_ids, selection_ids, share.numpy())))
meta = {"model": model, "name": model_name(model), "revision": revision, "embedding_shard": os.path.basename(shard),
        "table_sha256": sha256(arrays["embeddings.npy"]), "data_sha256": sha256(*arrays.values()),
        "tokenizer_kind": kind, "vocab_size": len(tokens), "dim": table.shape[1], "block_size": input_ids.shape[1],
        "test_fraction": test_fraction, "val_fraction": val_fraction, "split_seed": split_seed,
        "train_tokens": len(train_ids), "val_tokens": len(val_ids), "test_tokens": len(test_ids),
        "training_text_tokens": len(text_ids), "sample_windows_train": sample_windows_train,
        "sample_windows_selection": sample_windows_selection, "sample_length": sample_length, "sample_seed": sample_seed,
        "counts": {flag: sum(flag in e["flags"] for e in entries) for flag in ("special", "byte_fallback", "duplicate", "untrained")},
        "untrained_by_norm": len(found.by_norm), "untrained_candidates": len(found.candidates), "untrained_verified": len(found.verified),
        "tokens": entries}

out = data_dir(model)
if os.path.exists(os.path.join(out, "meta.json")):
    os.remove(os.path.join(out, "meta.json"))  # until the new one is written, the folder reads as not prepared
for name, array in arrays.items():
    atomic_write(os.path.join(out, name), lambda tmp: np.save(tmp, array))
# meta.json last: load_data takes its presence to mean the folder is complete.
# One token per line keeps a 50k-token file readable with less and grep
header = json.dumps({k: v for k, v in meta.items() if k != "tokens"}, indent=1)[:-2]
body = ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries)
write_text_file(os.path.join(out, "meta.json"), f'{header},\n "tokens": [\n{body}\n]}}\n')
lengths = (input_ids != PAD).sum(1) - 2
print(f"wrote {out}/: {len(tokens)} tokens x {table.shape[1]} dims, {kind} tokenizer, block {input_ids.shape[1]}, "
      f"mean token {lengths.mean():.2f} bytes, longest {lengths.max()}; {len(train_ids)} train / {len(val_ids)} val / "
      f"{len(test_ids)} held-out; " +
      ", ".join(f"{n} {flag}" for flag, n in meta["counts"].items()))
