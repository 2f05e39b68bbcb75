"""
Turn an LM's vocabulary into training data for the byte encoder:
  data/<name>/input_ids.npy   uint16 [V, block]  [start] bytes [end] pad...
  data/<name>/embeddings.npy  float32 [V, D]     the LM's input-embedding rows
  data/<name>/meta.json       model, revision, sizes, and per token: text, bytes, flags
Only the input-embedding tensor is read, never the whole model.

$ python prepare_mistral_data.py                     # Mistral-7B-v0.1 from the hub
$ python prepare_mistral_data.py --model=smollm2     # the embedded SmolLM2-135M, offline
$ python prepare_mistral_data.py --model=/path/to/hf/folder
"""
import json
import os

import numpy as np

from common import (PAD, UserError, atomic_write, configure, data_dir, encode_bytes, load_tokenizer,
                    model_name, read_input_embeddings, resolve_model, run_main, token_bytes, untrained_rows, write_text_file)

model = "mistralai/Mistral-7B-v0.1"  # hub id, local folder, or "smollm2"
block_size = 50  # the prototype's width; grows to fit longer tokens, never truncates
configure(globals())


def main():
    folder, revision = resolve_model(model, only_embeddings=True)
    print(f"reading the tokenizer and the input embeddings of {model} ({folder})")
    tokenizer = load_tokenizer(folder)
    table, shard = read_input_embeddings(folder)
    tokens, kind = token_bytes(tokenizer)
    if len(tokens) > table.shape[0]:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the table only {table.shape[0]} rows; the tokenizer and the weights in {folder} do not belong together")
    # rows past the tokenizer's vocabulary (padding to a multiple of 64) have no spelling
    table = table[:len(tokens)]
    untrained = untrained_rows(table).tolist()
    norms = table.norm(dim=1).tolist()
    input_ids = encode_bytes([b for b, _ in tokens], block_size)

    entries = []
    for i, ((data, flags), dead, norm) in enumerate(zip(tokens, untrained, norms)):
        if dead:
            flags = flags | {"untrained"}
        entries.append({"id": i, "text": data.decode("utf-8", errors="replace"), "bytes": data.hex(),
                        "norm": round(norm, 5), "flags": sorted(flags)})
    meta = {"model": model, "name": model_name(model), "revision": revision, "embedding_shard": os.path.basename(shard),
            "tokenizer_kind": kind, "vocab_size": len(tokens), "dim": table.shape[1], "block_size": input_ids.shape[1],
            "counts": {flag: sum(flag in e["flags"] for e in entries) for flag in ("special", "byte_fallback", "duplicate", "untrained")},
            "tokens": entries}

    out = data_dir(model)
    atomic_write(os.path.join(out, "input_ids.npy"), lambda tmp: np.save(tmp, input_ids))
    atomic_write(os.path.join(out, "embeddings.npy"), lambda tmp: np.save(tmp, table.numpy().astype(np.float32)))
    # one token per line keeps a 50k-token file readable with less and grep
    header = json.dumps({k: v for k, v in meta.items() if k != "tokens"}, indent=1)[:-2]
    body = ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries)
    write_text_file(os.path.join(out, "meta.json"), f'{header},\n "tokens": [\n{body}\n]}}\n')
    lengths = (input_ids != PAD).sum(1) - 2
    print(f"wrote {out}/: {len(tokens)} tokens x {table.shape[1]} dims, {kind} tokenizer, block {input_ids.shape[1]}, "
          f"mean token {lengths.mean():.2f} bytes, longest {lengths.max()}; " +
          ", ".join(f"{n} {flag}" for flag, n in meta["counts"].items()))


if __name__ == "__main__":
    run_main(main)
