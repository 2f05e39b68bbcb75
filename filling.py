"""
Three ways to make an input row for a token, from what is known about it:
  soft  the byte encoder's prediction from the token's bytes (a checkpoint from train.py)
  mean  the mean of the trained rows (Unsloth's fix_untrained_tokens)
  fvt   the mean of the rows of the pieces the tokenizer splits the token into when the
        token itself is not allowed (fast vocabulary transfer); the mean row if there are none
"""
import json
import re

import numpy as np
import torch
from tqdm import tqdm

from configurator import UserError
from spelling import encode_bytes, token_piece, tokenizer_kind
from storage import load_encoder

METHODS = ("mean", "fvt", "soft")


def bpe_without(tokenizer, banned):
    """The tokenizer's BPE model, unable to produce the `banned` ids: the merges that make them
    are gone, so their spelling falls apart into the pieces a vocabulary without them has."""
    from tokenizers import Tokenizer
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise UserError(f"fvt needs a BPE tokenizer but this one is {model['type']}; use --method=mean or soft")
    names = set(tokenizer.convert_ids_to_tokens(banned.tolist()))
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    model["merges"] = [m for m in merges if not {m[0], m[1], m[0] + m[1]} & names]
    model["ignore_merges"] = False  # it would hand back a whole word found in the vocabulary, merges or not
    if model.get("byte_fallback"):
        # a single character is in the vocabulary without a merge; gone from it, it falls back
        # to its bytes, so the <0xNN> tokens must stay (unknown ones are dropped later).
        # Byte-level BPE has no fallback: its 256 characters must all stay
        gone = {n for n in names if not re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", n)}
        model["vocab"] = {piece: i for piece, i in model["vocab"].items() if piece not in gone}
    return Tokenizer.from_str(json.dumps(spec)).model


def fvt_rows(byte_strings, table, known, tokenizer):
    kind = tokenizer_kind(tokenizer)
    bpe = bpe_without(tokenizer, (~known).nonzero()[:, 0])
    mean = table[known].mean(0)
    rows, alone = [], 0
    for data in tqdm(byte_strings, desc="fvt", leave=False, disable=len(byte_strings) < 1000):
        piece = token_piece(data, kind)
        # byte fallback can still hand back a banned or untrained row; only known rows count
        pieces = [t.id for t in bpe.tokenize(piece) if known[t.id]] if piece else []
        rows.append(table[pieces].mean(0) if pieces else mean)
        alone += not pieces
    if alone:
        print(f"fvt: {alone} of {len(byte_strings)} tokens split into no known pieces and got the mean row")
    return torch.stack(rows)


def soft_rows(byte_strings, checkpoint):
    """The encoder's predictions, as evaluate.py writes them for the splice."""
    block_size = checkpoint["model_args"]["block_size"]
    longest = max(byte_strings, key=len)
    if len(longest) + 2 > block_size:
        raise UserError(f"{longest.decode('utf-8', errors='replace')!r} is {len(longest)} bytes but the encoder reads at most {block_size - 2}; "
                        f"use a shorter string or --method=fvt")
    return load_encoder(checkpoint).predict(torch.from_numpy(encode_bytes(byte_strings, block_size).astype(np.int64)))


def new_rows(method, byte_strings, table, known, tokenizer, checkpoint):
    """Input rows for the tokens spelled `byte_strings`; only the rows of `table` marked `known`
    are read, the rest are being filled or were never trained."""
    if method == "mean":
        return table[known].mean(0).expand(len(byte_strings), -1).clone()
    if method == "fvt":
        return fvt_rows(byte_strings, table, known, tokenizer)
    return soft_rows(byte_strings, checkpoint)
