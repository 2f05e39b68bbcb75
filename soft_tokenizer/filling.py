"""
Three ways to make an input row for a token from a string (its own spelling, or a name or
description a user gives it):
  soft  the byte encoder's prediction from the string's bytes (a checkpoint from train.py)
  mean  the mean of the trained rows (Unsloth's fix_untrained_tokens)
  fvt   the mean of the rows of the pieces the tokenizer splits the string into when the
        token itself is not allowed (fast vocabulary transfer); the mean row if there are none
and the steps around them that tokens.py and finetune.py share: adding tokens to a model,
putting their rows in, and reading a file of names.
"""
import json
import os
import re

import numpy as np
import torch

from soft_tokenizer.configurator import UserError, progress
from soft_tokenizer.spelling import encode_bytes, token_bytes, token_piece, tokenizer_kind, untrained_rows
from soft_tokenizer.storage import load_encoder

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
    for data in progress(byte_strings, desc="fvt", leave=False, disable=len(byte_strings) < 1000):
        piece = token_piece(data, kind)
        # byte fallback can still hand back a banned or untrained row; only known rows count
        pieces = [t.id for t in bpe.tokenize(piece) if known[t.id]] if piece else []
        rows.append(table[pieces].mean(0) if pieces else mean)
        alone += not pieces
    if alone:
        print(f"fvt: {alone} of {len(byte_strings)} tokens split into no known pieces and got the mean row")
    return torch.stack(rows)


def vocabulary_fvt_rows(tokenizer, table, train_ids, seed=0):
    """[V, D] FVT's row for every token of the vocabulary, which an fvt_residual encoder reads
    beside the bytes (train.py, train_e2e.py and evaluate.py make the same ones). A token must
    not be its own piece, and a token trained on must not lend its row to one held out: the
    tokens never trained on are split with the training tokens alone, as a new token is, and the
    training tokens in two halves drawn by `seed`, each split with the other half and the
    single characters (which no split can do without; one is its own only piece, so it gets the
    mean row). Without half the vocabulary a token falls into more pieces than it would with
    all of it, as the long new words people add do."""
    spelled = [data for data, _ in token_bytes(tokenizer)[0]]
    trained = torch.zeros(len(table), dtype=torch.bool)
    trained[train_ids] = True
    character = torch.tensor([len(data.decode("utf-8", errors="replace")) == 1 for data in spelled])
    alphabet = trained & character
    half = torch.rand(len(table), generator=torch.Generator().manual_seed(seed)) < 0.5
    rows = table[trained].mean(0).expand(len(table), -1).clone()
    for group, pieces_from in ((~trained, trained), (trained & ~character & half, alphabet | (trained & ~half)),
                               (trained & ~character & ~half, alphabet | (trained & half))):
        ids = group.nonzero()[:, 0]
        if len(ids):
            rows[ids] = fvt_rows([spelled[i] for i in ids.tolist()], table, pieces_from, tokenizer)
    return rows


def soft_rows(byte_strings, checkpoint, fvt=None):
    """The encoder's predictions, as evaluate.py writes them for the splice (fvt: FVT's rows for
    the strings, which an fvt_residual encoder reads)."""
    block_size = checkpoint["model_args"]["block_size"]
    longest = max(byte_strings, key=len)
    if len(longest) + 2 > block_size:
        raise UserError(f"{longest.decode('utf-8', errors='replace')!r} is {len(longest)} bytes but the encoder reads at most {block_size - 2}; "
                        f"use a shorter string or --method=fvt")
    return load_encoder(checkpoint).predict(torch.from_numpy(encode_bytes(byte_strings, block_size).astype(np.int64)), fvt=fvt)


def new_rows(method, byte_strings, table, known, tokenizer, checkpoint):
    """Input rows for the tokens spelled `byte_strings`; only the rows of `table` marked `known`
    are read, the rest are being filled or were never trained."""
    if method == "mean":
        return table[known].mean(0).expand(len(byte_strings), -1).clone()
    if method == "fvt":
        return fvt_rows(byte_strings, table, known, tokenizer)
    reads_fvt = checkpoint["model_args"].get("fvt_residual", False)
    return soft_rows(byte_strings, checkpoint, fvt_rows(byte_strings, table, known, tokenizer) if reads_fvt else None)


def read_names(path):
    """A JSON file {token: the string its row is made from}, or one sentence on what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"rows_from {path} does not exist; pass a JSON file such as {{\"<unused0>\": \"<python>\"}}")
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"rows_from {path} is not a JSON file ({e}); write it as {{\"token\": \"the string its row is made from\"}}") from None
    if not isinstance(names, dict) or not names or not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in names.items()):
        raise UserError(f"rows_from {path} must hold one JSON object of non-empty strings, {{\"token\": \"the string its row is made from\"}}")
    return names


def add_tokens(lm, tokenizer, strings, mean_resizing=False):
    """Add `strings` as normal (not special) tokens matched literally in the raw text, before any
    normalizer, and grow the LM's tables; the new rows are what transformers gives them (random,
    or with mean_resizing its samples around the old rows' mean) until set_rows overwrites them.
    Returns their ids."""
    from tokenizers import AddedToken
    tokenizer.add_tokens([AddedToken(s, normalized=False, special=False) for s in strings])
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(strings))
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    for s, token_id in zip(strings, ids.tolist()):
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
        if encoded != [token_id]:
            raise UserError(f"after adding {s!r} as token {token_id} the tokenizer still encodes it as {encoded}; nothing was written")
    return ids


def fill_output_rows(lm, vocab_size, ids):
    """An untied model's output rows `ids` get the mean of its trained output rows (tokens.py
    says why); in a tied model the one row serves both sides and is left as it is."""
    head = lm.get_output_embeddings().weight
    if head is lm.get_input_embeddings().weight or len(ids) == 0:
        return
    with torch.no_grad():
        trained = ~untrained_rows(head[:vocab_size])
        head[ids] = head[:vocab_size][trained].float().mean(0).to(head.dtype)


def set_rows(lm, ids, rows, vocab_size, added):
    """Input rows `rows` for tokens `ids`. The output rows of added tokens, and of repurposed ones
    that were never trained, are made by fill_output_rows; a repurposed token's trained output
    row keeps what it knows."""
    embed = lm.get_input_embeddings().weight
    with torch.no_grad():
        embed[ids] = rows.to(embed.dtype)
    head = lm.get_output_embeddings().weight
    fill_output_rows(lm, vocab_size, ids if added else ids[untrained_rows(head.detach()[:vocab_size])[ids].to(ids.device)])
