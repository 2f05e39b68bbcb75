"""
How a token is spelled: the bytes behind every id of a tokenizer, the [start] bytes [end]
rows the encoder reads, and which rows of a table have a target of their own.
"""
import json
import re

import numpy as np
import torch

from soft_tokenizer.configurator import UserError
from model import END, PAD, START


def _bytelevel_decoder():
    """GPT-2's table: every byte is shown as a printable unicode character."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTELEVEL_BYTE = _bytelevel_decoder()  # character -> byte
BYTELEVEL_CHAR = {b: c for c, b in BYTELEVEL_BYTE.items()}  # byte -> character


def tokenizer_kind(tokenizer):
    """'sentencepiece' (▁ for space, <0xNN> byte fallback) or 'bytelevel' (GPT-2 style)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; only SentencePiece-style and byte-level BPE tokenizers are understood")
    spec = json.loads(backend.to_str())
    # ensure_ascii=False keeps "▁" a character: escaped, it would never match below
    text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    if '"ByteLevel"' in text:
        return "bytelevel"
    if "\u2581" in text or '"ByteFallback"' in text or spec["model"].get("byte_fallback"):
        return "sentencepiece"
    raise UserError("the tokenizer is neither SentencePiece-style (▁, <0xNN>) nor byte-level BPE, which are the kinds prepare_mistral_data.py understands")


def token_bytes(tokenizer):
    """For every id: (bytes, flags). Flags: special (added/special token, its literal text),
    byte_fallback (SentencePiece <0xNN>), duplicate (same bytes as a lower, preferred id)."""
    kind = tokenizer_kind(tokenizer)
    vocab_size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    added = {i for i in tokenizer.added_tokens_decoder} | set(tokenizer.all_special_ids)
    out = []
    for i, piece in enumerate(pieces):
        flags = set()
        if i in added:
            data, flags = piece.encode("utf-8"), {"special"}
        elif kind == "sentencepiece" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            data, flags = bytes([int(piece[3:5], 16)]), {"byte_fallback"}
        elif kind == "sentencepiece":
            data = piece.replace("\u2581", " ").encode("utf-8")
        else:
            try:
                data = bytes(BYTELEVEL_BYTE[c] for c in piece)
            except KeyError:
                raise UserError(f"token {i} ({piece!r}) has a character outside the byte-level table; the tokenizer is not plain byte-level BPE") from None
        out.append((data, flags))
    # the preferred owner of shared bytes is the one the tokenizer produces: a normal token
    # over a byte-fallback or special one, then the lowest id
    owner = {}
    for i in sorted(range(vocab_size), key=lambda i: (bool(out[i][1]), i)):
        owner.setdefault(out[i][0], i)
    for i, (data, flags) in enumerate(out):
        if owner[data] != i:
            flags.add("duplicate")
    return out, kind


def byte_lengths(tokenizer):
    """float64 [len(tokenizer)]: how many bytes of text each id stands for (an added token: its
    literal text), the denominator of lm.bits_per_byte."""
    return torch.tensor([len(data) for data, _ in token_bytes(tokenizer)[0]], dtype=torch.float64)


def token_piece(data, kind):
    """The other way round for a normal token: the string a BPE model of this kind works on for
    these bytes (GPT-2 characters, or ▁ for space); None if SentencePiece bytes are not text."""
    if kind == "bytelevel":
        return "".join(BYTELEVEL_CHAR[b] for b in data)
    try:
        return data.decode("utf-8").replace(" ", "\u2581")
    except UnicodeDecodeError:
        return None


def vocab_id(vocab, kind, s):
    """The id of the token spelled `s`, as written or in the vocabulary's own piece form
    (" word" is "Ġword" in byte-level BPE, "▁word" in SentencePiece), or None."""
    piece = token_piece(s.encode("utf-8"), kind)
    return vocab.get(s, vocab.get(piece) if piece is not None else None)


def encode_bytes(byte_strings, block_size=None):
    """[start] bytes [end] then pad, as a uint16 array [N, block]; the block grows to fit."""
    longest = max(len(b) for b in byte_strings) + 2
    block_size = max(block_size or 0, longest)
    ids = np.full((len(byte_strings), block_size), PAD, dtype=np.uint16)
    for row, data in enumerate(byte_strings):
        ids[row, 0] = START
        ids[row, 1:len(data) + 1] = np.frombuffer(data, dtype=np.uint8)
        ids[row, len(data) + 1] = END
    return ids


def untrained_rows(table, ratio=0.1):
    """Rows the LM never trained: zero, or with a norm far below the median row's."""
    norms = table.norm(dim=1)
    return norms <= ratio * norms.median()


def has_target(flags):
    """Untrained rows are noise and a duplicate's row is its owner's: neither is a target of its own."""
    return not {"untrained", "duplicate"} & set(flags)
