"""
Embed what the LM never learned. Find the rows of its input table that were never trained,
fill them, or add new tokens; each row comes from one of three methods:
  soft  the byte encoder's prediction from the token's bytes (a checkpoint from train.py)
  mean  the mean of the trained rows (Unsloth's fix_untrained_tokens)
  fvt   the mean of the rows of the pieces the tokenizer splits the token into when the
        token itself is not allowed (fast vocabulary transfer); the mean row if there are none
`compare` measures the three on tokens whose true rows are known: the held-out tokens of a
checkpoint, which the encoder never saw.

$ python tokens.py detect --model=mistralai/Mistral-7B-v0.1
$ python tokens.py repair --model=mistralai/Mistral-7B-v0.1 --out_dir=out-mistral --method=soft --save=mistral-repaired
$ python tokens.py add --model=smollm2 --out_dir=out-smollm2 --method=soft --save=smollm2-plus --tokens " zorblax" "<|tool|>"
$ python tokens.py compare --model=smollm2 --out_dir=out-smollm2

The encoder predicts input rows only. An untied model's output rows answer another question
(how likely the token is to come next) in a space of their own, so an input-row prediction
does not belong there: output rows that are themselves untrained, and those of added tokens,
get the mean of the trained output rows. Their logit is then the average logit, which keeps a
new token from being generated out of nowhere before fine-tuning teaches the model when to.
Output rows that look trained are kept: they already say how rarely the token comes. In a
tied model (SmolLM2) one row serves both sides, so the filled row is the output row too; a
row that scores high against typical hidden states then gets generated everywhere, which the
last column of `compare` measures.

An added string is a normal (not special) token matched literally in the raw text, before
any normalizer. Vocabularies spell a word after a space with the space in it ("Ġword" in
byte-level BPE, "▁word" in SentencePiece), so add " word" with its space for that form, the
one the encoder reads as the bytes " word"; "word" alone is the form at the start of a text
or after punctuation, and after a space it leaves the space as a token of its own.
"""
import argparse
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (UserError, atomic_write, default_text, encode_bytes, load_checkpoint, load_data, load_encoder,
                    load_lm, load_tokenizer, norm_scale, perplexity, predict_table, read_input_embeddings,
                    resolve_model, run_main, token_bytes, token_piece, tokenizer_kind, untrained_rows)

METHODS = ("mean", "fvt", "soft")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # the repository's convention for a user's mistake: one sentence, exit 1
        raise UserError(f"{message}; see python {self.prog} --help")


def parse_args():
    parser = Parser(prog="tokens.py", description="Find untrained rows, fill them, add tokens, compare the fillings.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="list the untrained rows of the input table")
    repair = commands.add_parser("repair", help="write a copy of the model with its untrained rows filled")
    add = commands.add_parser("add", help="write a copy of the model with new tokens")
    compare = commands.add_parser("compare", help="fill the held-out tokens' rows by each method and score them")
    for command in (detect, repair, add, compare):
        command.add_argument("--model", default="smollm2", help="hub id, local folder, or smollm2 (default)")
    for command in (repair, add, compare):
        command.add_argument("--out_dir", default="out-smollm2", help="holds ckpt.pt from train.py (needed by soft and compare)")
    for command in (repair, add):
        command.add_argument("--method", choices=METHODS, default="soft")
        command.add_argument("--save", required=True, help="new folder for the model and tokenizer")
    add.add_argument("--tokens", nargs="+", required=True, help='strings to add, e.g. " zorblax" "<|tool|>"')
    compare.add_argument("--text_file", default="", help="text for perplexity; empty: docstrings of standard library modules")
    compare.add_argument("--eval_tokens", type=int, default=2048, help="perplexity over the first this many tokens")
    compare.add_argument("--context", type=int, default=512, help="the text is scored in windows of this many tokens")
    compare.add_argument("--device", default="auto", help="auto: cuda if there is one, else cpu")
    return parser.parse_args()


# -----------------------------------------------------------------------------
# the three ways to make a row

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
    """The encoder's predictions as they are, without evaluate.py's global norm scale: that
    factor also stretches the component all rows share, and in a tied model, where the row is
    an output row too, it lifts the new tokens above every other (see `compare`)."""
    block_size = checkpoint["model_args"]["block_size"]
    longest = max(byte_strings, key=len)
    if len(longest) + 2 > block_size:
        raise UserError(f"{longest.decode('utf-8', errors='replace')!r} is {len(longest)} bytes but the encoder reads at most {block_size - 2}; "
                        f"use a shorter string or --method=fvt")
    return predict_table(load_encoder(checkpoint), torch.from_numpy(encode_bytes(byte_strings, block_size).astype(np.int64)))


def new_rows(method, byte_strings, table, known, tokenizer, checkpoint):
    """Input rows for the tokens spelled `byte_strings`; only the rows of `table` marked `known`
    are read, the rest are being filled or were never trained."""
    if method == "mean":
        return table[known].mean(0).expand(len(byte_strings), -1).clone()
    if method == "fvt":
        return fvt_rows(byte_strings, table, known, tokenizer)
    return soft_rows(byte_strings, checkpoint)


# -----------------------------------------------------------------------------
# writing the model

def fill_output_rows(lm, vocab_size, ids):
    """An untied model's output rows `ids` get the mean of its trained output rows (see the top)."""
    head = lm.get_output_embeddings().weight
    if head is lm.get_input_embeddings().weight or len(ids) == 0:
        return
    with torch.no_grad():
        trained = ~untrained_rows(head[:vocab_size])
        head[ids] = head[:vocab_size][trained].float().mean(0).to(head.dtype)


def check_new_folder(save):
    if os.path.exists(save):
        raise UserError(f"{save} already exists; pass a new folder to --save, the model is never written over")


def save_folder(lm, tokenizer, save):
    def write(tmp):
        os.remove(tmp)  # atomic_write made a file; the model needs a folder in its place
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    atomic_write(save, write)


def describe(tokens, tokenizer, token_id):
    """What a row is called in listings: its piece, and its bytes where they read differently."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    text = tokens[token_id][0].decode("utf-8", errors="replace")
    shown = piece if piece.isprintable() and piece == piece.strip() else repr(piece)
    return shown if text == piece else f"{shown} {text!r}"


def show_nearest(rows, table, known, tokens, tokenizer, ids):
    """Where the filling put each token: its nearest known row by cosine and, for a token with
    a twin (a known token of the same bytes, as "A" is for <0x41>), the cosine to the twin."""
    candidates = known.nonzero()[:, 0]
    cosine = F.normalize(rows, dim=1) @ F.normalize(table[candidates], dim=1).T
    best, where = cosine.max(1)
    twins = {}
    for i in candidates.tolist():
        twins.setdefault(tokens[i][0], i)
    for k, token_id in enumerate(ids.tolist()):
        line = (f"{token_id:>8} {describe(tokens, tokenizer, token_id):<24} norm {rows[k].norm():7.4f}   nearest "
                f"{describe(tokens, tokenizer, int(candidates[where[k]])):<20} cosine {best[k]:.3f}")
        twin = twins.get(tokens[token_id][0])
        if twin is not None:
            line += f"   twin {describe(tokens, tokenizer, twin)} cosine {F.cosine_similarity(rows[k], table[twin], dim=0):.3f}"
        print(line)


# -----------------------------------------------------------------------------
# the subcommands

def detect(args):
    # only the input table is read, so a 7B model costs one shard, not the whole checkpoint
    folder, _ = resolve_model(args.model, only_embeddings=True)
    tokenizer = load_tokenizer(folder)
    table, _ = read_input_embeddings(folder)
    tokens, _ = token_bytes(tokenizer)
    table = table[:len(tokens)]
    norms = table.norm(dim=1)
    ids = untrained_rows(table).nonzero()[:, 0]
    print(f"{args.model}: {len(ids)} of {len(tokens)} input rows untrained "
          f"(norm at most 0.1 x the median row's {norms.median():.4f})")
    if len(ids):
        print(f"{'id':>8} {'norm':>10}  {'token':<30} flags")
    for token_id in ids.tolist():
        flags = ",".join(sorted(tokens[token_id][1]))
        print(f"{token_id:>8} {norms[token_id]:>10.6f}  {describe(tokens, tokenizer, token_id):<30} {flags}")


def repair(args):
    check_new_folder(args.save)
    # the copy keeps the checkpoint's dtype: a 7B model in bfloat16 stays 14 GB, not 28
    lm, tokenizer = load_lm(args.model, dtype="auto")
    tokens, _ = token_bytes(tokenizer)
    vocab_size = len(tokens)
    embed = lm.get_input_embeddings().weight
    table = embed.detach()[:vocab_size].float().clone()
    dead = untrained_rows(table)
    ids = dead.nonzero()[:, 0]
    if len(ids) == 0:
        raise UserError(f"{args.model} has no untrained input rows (none has a norm below 0.1 x the median); there is nothing to repair")
    checkpoint = None
    if args.method == "soft":
        checkpoint = load_checkpoint(args.out_dir, {"model": args.model, "vocab_size": vocab_size, "dim": table.shape[1]})
    rows = new_rows(args.method, [tokens[i][0] for i in ids], table, ~dead, tokenizer, checkpoint)
    with torch.no_grad():
        embed[ids] = rows.to(embed.dtype)
    # an untied head may have untrained rows of its own (Llama 3's reserved tokens are zero on both sides)
    head = lm.get_output_embeddings().weight
    dead_out = untrained_rows(head.detach()[:vocab_size]).nonzero()[:, 0]
    fill_output_rows(lm, vocab_size, dead_out)
    print(f"filled {len(ids)} untrained input rows by {args.method}" +
          ("" if head is embed else f" and {len(dead_out)} untrained output rows by the trained output rows' mean"))
    show_nearest(rows, table, ~dead, tokens, tokenizer, ids)
    save_folder(lm, tokenizer, args.save)
    print(f"wrote {args.save}")


def add(args):
    from tokenizers import AddedToken
    check_new_folder(args.save)
    strings = args.tokens
    if any(not s for s in strings) or len(set(strings)) != len(strings):
        raise UserError("--tokens must be distinct, non-empty strings")
    lm, tokenizer = load_lm(args.model, dtype="auto")  # keeps the checkpoint's dtype, as repair does
    tokens, kind = token_bytes(tokenizer)
    vocab_size = len(tokens)
    vocab = tokenizer.get_vocab()
    for s in strings:
        existing = vocab.get(s, vocab.get(token_piece(s.encode("utf-8"), kind)))
        if existing is not None:
            raise UserError(f"{s!r} is already token {existing} of {args.model}; add only strings that are not tokens yet")
    embed = lm.get_input_embeddings().weight
    table = embed.detach()[:vocab_size].float().clone()
    known = ~untrained_rows(table)
    checkpoint = None
    if args.method == "soft":
        checkpoint = load_checkpoint(args.out_dir, {"model": args.model, "vocab_size": vocab_size, "dim": table.shape[1]})
    rows = new_rows(args.method, [s.encode("utf-8") for s in strings], table, known, tokenizer, checkpoint)

    # matched on the raw text, before any normalizer, so the string is found exactly as given
    tokenizer.add_tokens([AddedToken(s, normalized=False, special=False) for s in strings])
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(strings))
    if len(tokenizer) > embed.shape[0]:
        # mean_resizing would spend time on a covariance for rows that are overwritten next
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embed = lm.get_input_embeddings().weight  # a new, longer tensor
    with torch.no_grad():
        embed[ids] = rows.to(embed.dtype)
    fill_output_rows(lm, vocab_size, ids)
    for s, token_id in zip(strings, ids.tolist()):
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
        if encoded != [token_id]:
            raise UserError(f"after adding {s!r} as token {token_id} the tokenizer still encodes it as {encoded}; nothing was written")
    print(f"added {len(strings)} tokens to {args.model} ({vocab_size} -> {len(tokenizer)}), input rows by {args.method}")
    tokens += [(s.encode("utf-8"), {"special"}) for s in strings]
    show_nearest(rows, table, known, tokens, tokenizer, ids)
    save_folder(lm, tokenizer, args.save)
    print(f"wrote {args.save}")


@torch.no_grad()
def true_ranks(rows, table, ids, chunk=1024):
    """Where `table` puts each token when it scores the token's filled row: 1 + the number of
    rows that score higher than the token's own. For a tied LM's table, the LM head's ranking."""
    ranks = []
    for start in range(0, len(ids), chunk):
        scores = rows[start:start + chunk] @ table.T
        own = scores.gather(1, ids[start:start + chunk, None])
        ranks.append((scores > own).sum(1) + 1)
    return torch.cat(ranks)


def compare(args):
    _, table, meta = load_data(args.model)
    checkpoint = load_checkpoint(args.out_dir, meta)
    held = checkpoint["val_ids"]
    if len(held) == 0:
        raise UserError(f"the checkpoint in {args.out_dir} has no held-out tokens; train with val_fraction above 0")
    if args.text_file and not os.path.isfile(args.text_file):
        raise UserError(f"--text_file {args.text_file} does not exist; pass a UTF-8 text file, or leave it out for the default text")
    if args.text_file:
        with open(args.text_file, encoding="utf-8", errors="replace") as f:
            text, source = f.read(), args.text_file
    else:
        text, source = default_text(), "standard library docstrings"
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    lm, tokenizer = load_lm(args.model, device=device)
    tokens, _ = token_bytes(tokenizer)
    vocab_size = len(tokens)
    untrained = torch.tensor(["untrained" in t["flags"] for t in meta["tokens"]])
    known = ~untrained
    known[held] = False
    held_bytes = [tokens[i][0] for i in held]
    rows = {"true": table[held]}
    rows.update({method: new_rows(method, held_bytes, table, known, tokenizer, checkpoint) for method in METHODS})
    train_ids = checkpoint["train_ids"]
    scale = norm_scale(soft_rows([tokens[i][0] for i in train_ids], checkpoint), table[train_ids])
    rows["soft_scaled"] = rows["soft"] * scale

    scores = {}
    for name, filled in rows.items():
        ranks = true_ranks(filled, table, held)
        scores[name] = {"cosine": F.cosine_similarity(filled, table[held], dim=1).mean().item(),
                        "median_rank": ranks.float().median().item(), "mean_rank": ranks.float().mean().item(),
                        "hit1": (ranks == 1).float().mean().item()}

    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:args.eval_tokens]
    if len(ids) < 2:
        raise UserError(f"the evaluation text ({source}) is shorter than two tokens; pass a longer --text_file")
    occurrences = int(torch.isin(ids, held).sum())
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head.weight is embed.weight
    # a tied model gets a head of its own, so filling the input rows leaves the output side as
    # trained; the tied column then fills the head's rows too, as a tied model would after add
    if tied:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    true_in, true_out = embed.weight[held].clone(), head.weight[held].clone()
    for name in tqdm(rows, desc="perplexity", leave=False):
        with torch.no_grad():
            embed.weight[held] = rows[name].to(embed.weight)
            scores[name]["ppl_input"] = perplexity(lm, ids, args.context)
            if tied and name == "true":
                scores[name]["ppl_tied"] = scores[name]["ppl_input"]
            elif tied:
                head.weight[held] = rows[name].to(head.weight)
                scores[name]["ppl_tied"] = perplexity(lm, ids, args.context)
            embed.weight[held], head.weight[held] = true_in, true_out

    labels = {"true": "true rows (the LM's own)", "mean": "mean of trained rows", "fvt": "fvt (mean of the pieces' rows)",
              "soft": "soft (byte encoder)", "soft_scaled": f"soft x evaluate.py's norm scale {scale:.2f} (not written)"}
    print(f"\n{meta['model']}: the {len(held)} held-out tokens of {args.out_dir}/ckpt.pt (iteration {checkpoint['iter_num']}) "
          f"as new tokens; perplexity on {len(ids)} tokens of {source}, {occurrences} of them held-out\n")
    columns = ["rows of the held-out tokens", "cosine to true row", "rank of true token (median)", "rank (mean)", "hit@1",
               "perplexity, input rows filled"] + (["perplexity, input and output rows filled"] if tied else [])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for name, s in scores.items():
        cells = [labels[name], f"{s['cosine']:.3f}", f"{s['median_rank']:.0f}", f"{s['mean_rank']:.0f}", f"{s['hit1']:.1%}",
                 f"{s['ppl_input']:.3f}"] + ([f"{s['ppl_tied']:.3f}"] if tied else [])
        print("| " + " | ".join(cells) + " |")
    print(f"\nranks: of the true token when the filled row is scored against all {vocab_size} true input rows" +
          (", which in this tied LM are the LM head; in the last column the filled row is the token's output row too" if tied else ""))


def main():
    args = parse_args()
    {"detect": detect, "repair": repair, "add": add, "compare": compare}[args.command](args)


if __name__ == "__main__":
    run_main(main)
