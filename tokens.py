"""
Embed what the LM never learned. Find the rows of its input table that were never trained,
fill them, add new tokens, or repurpose existing ones, each row made by one of filling.py's
methods (soft, mean, fvt) from the token's own spelling or from a string the user gives it
(rows_from: a JSON file {token: string}, say {"<unused0>": "<python>"} to use Gemma's unused
row 0 as a <python> tag; the tokenizer keeps calling it <unused0>).
`compare` measures the three on tokens whose true rows are known: the held-out tokens of the
prepared data, which the encoder never saw.

$ python tokens.py detect --model=mistralai/Mistral-7B-v0.1
$ python tokens.py repair --model=mistralai/Mistral-7B-v0.1 --out_dir=out-mistral --method=soft --save=mistral-repaired
$ python tokens.py add --model=smollm2 --out_dir=out-smollm2 --method=soft --save=smollm2-plus --tokens " zorblax" "<|tool|>"
$ python tokens.py add --model=smollm2 --out_dir=out-smollm2 --rows_from=descriptions.json --save=smollm2-plus
$ python tokens.py add --model=smollm2 --method=fvt --distill_text=notes.txt --save=smollm2-plus --tokens " zorblax"
$ python tokens.py repurpose --model=gemma3 --out_dir=out-gemma3 --rows_from=tags.json --save=gemma3-tags
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

With --distill_text=FILE, add and repurpose then refine the rows by Token Distillation
(soft_tokenizer/distill.py): the LM reads each string in its own pieces at up to 8 places in FILE,
and the row is fitted so that what the LM computes from the new token on matches what it
computes from the pieces. FILE must use the strings; it costs about 0.2 s a token for SmolLM2 on
2 CPU cores, and lowers the excess bits per byte of new tokens (RESEARCH_LOG, "new tokens, zero-shot").
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from soft_tokenizer.configurator import UserError, check, configure, pick_device, progress
from soft_tokenizer.distill import distill_rows
from soft_tokenizer.filling import METHODS, add_tokens, fill_output_rows, new_rows, read_names, set_rows
from soft_tokenizer.lm import is_tied, load_lm, load_tokenizer, perplexity, read_input_embeddings, read_text_file, resolve_model, scoring_texts, scoring_windows
from soft_tokenizer.splice import read_predicted_table, splice_rows
from soft_tokenizer.spelling import token_bytes, untrained_rows, vocab_id
from soft_tokenizer.storage import check_lm_table, data_dir, data_identity, load_checkpoint, load_data, save_model_folder, untrained_in
from soft_tokenizer.untrained import VERIFIED_BELOW, find_untrained

COMMANDS = ("detect", "repair", "add", "repurpose", "compare")
model = "smollm2"  # hub id, local folder, or "smollm2"
out_dir = "out-smollm2"  # holds the checkpoints (needed by soft) and new_embeddings.safetensors (needed by compare)
checkpoint = "auto"  # soft, compare: regression (train.py's ckpt.pt), e2e (train_e2e.py's e2e.pt), or auto: the last stage that ran
method = "soft"  # repair, add, repurpose: mean, fvt or soft
save = ""  # repair, add, repurpose: a new folder for the model and tokenizer
rows_from = ""  # add, repurpose: a JSON file {token: the string its row is made from}; add's --tokens use their own spelling
distill_text = ""  # add, repurpose: a UTF-8 text that uses the tokens; given, their rows are then refined on it by Token Distillation (soft_tokenizer/distill.py)
text_file = ""  # compare: text for perplexity; empty: the two evaluation texts from Python's documentation
eval_tokens = 2048  # compare: perplexity over the first this many tokens of each text
context = 512  # compare: a text is scored in windows of this many tokens
device = "auto"  # compare: auto: cuda, else cpu (never mps: configurator.pick_device)
show_rows = 40  # rows listed: by detect, of each group of candidates; by repair, add and repurpose, of the rows they fill
# `python tokens.py COMMAND [config.py] [--key=value ...] [--tokens STRING ...]`: everything
# after --tokens is a string to add, spaces and all
if sys.argv[1:2] in (["--help"], ["-h"]):
    configure(globals())
if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    raise UserError(f"the first argument must be a command: {', '.join(COMMANDS)}; e.g. python tokens.py detect --model=smollm2")
command = sys.argv[1]
settings = sys.argv[2:]
new_strings = []
if "--tokens" in settings:
    new_strings = settings[settings.index("--tokens") + 1:]
    settings = settings[:settings.index("--tokens")]
configure(globals(), settings)
if method not in METHODS:
    raise UserError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
if command in ("repair", "add", "repurpose") and not save:
    raise UserError(f"{command} writes a new model folder: pass --save=FOLDER")
if command == "add" and not new_strings and not rows_from:
    raise UserError('add needs the strings to add after --tokens, e.g. --tokens " zorblax" "<|tool|>", or a --rows_from=FILE.json')
if command == "repurpose" and not rows_from:
    raise UserError('repurpose needs --rows_from=FILE.json, e.g. a file holding {"<unused0>": "<python>"}')
if distill_text and command not in ("add", "repurpose"):
    raise UserError("--distill_text is only for the add and repurpose commands")
distilling_on = read_text_file(distill_text) if distill_text else ""  # a missing or binary file is refused before the LM loads
if rows_from and command not in ("add", "repurpose"):
    raise UserError("--rows_from is only for the add and repurpose commands")
if command != "add" and new_strings:
    raise UserError("--tokens is only for the add command")
check(globals(), "eval_tokens", 1)
check(globals(), "context", 2)


# -----------------------------------------------------------------------------
# writing the model

def check_new_folder(save):
    if os.path.exists(save):
        raise UserError(f"{save} already exists; pass a new folder to --save, the model is never written over")


def describe(tokens, tokenizer, token_id):
    """What a row is called in listings: its piece, and its bytes where they read differently."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    text = tokens[token_id][0].decode("utf-8", errors="replace")
    shown = piece if piece.isprintable() and piece == piece.strip() else repr(piece)
    return shown if text == piece else f"{shown} {text!r}"


def show_nearest(rows, table, known, tokens, tokenizer, ids):
    """Where the filling put each token: its nearest known row by cosine and, for a token with
    a twin (a known token of the same bytes, as "A" is for <0x41>), the cosine to the twin. The
    first show_rows tokens: all 6,242 of Gemma's unused rows would be a page of lines and seconds of V x D work."""
    if len(ids) > show_rows:
        print(f"(the first {show_rows} of {len(ids)}; --show_rows for more)")
        rows, ids = rows[:show_rows], ids[:show_rows]
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

def detect():
    # the norm rule reads only the input table, so a 7B model costs one shard; the LM is loaded
    # only to verify the candidates a tied table's geometry gives
    folder, _ = resolve_model(model, only_embeddings=True)
    tokenizer = load_tokenizer(folder)
    table, _ = read_input_embeddings(folder)
    tokens, _ = token_bytes(tokenizer)
    table = table[:len(tokens)]
    norms = table.norm(dim=1)
    started = time.time()
    found = find_untrained(model, tokenizer, table, is_tied(folder))
    ids = found.by_norm
    print(f"{model}: {len(ids)} of {len(tokens)} input rows untrained by their norm "
          f"(at most 0.1 x the median row's {norms.median():.4f})")
    if len(ids):
        print(f"{'id':>8} {'norm':>10}  {'token':<30} flags")
    for token_id in ids.tolist():
        flags = ",".join(sorted(tokens[token_id][1]))
        print(f"{token_id:>8} {norms[token_id]:>10.6f}  {describe(tokens, tokenizer, token_id):<30} {flags}")
    if not found.tied or not len(found.reference):
        why = "the table is untied, so its input norms are the indicator" if not found.tied else "the tokenizer names no row unused or reserved"
        print(f"no geometry check: {why}")
        return
    named = torch.zeros(len(table), dtype=torch.bool)
    named[found.reference] = True
    verified = torch.zeros(len(table), dtype=torch.bool)
    verified[found.verified] = True
    candidates = found.candidates
    print(f"tied table, {len(found.reference)} rows named unused or reserved by the tokenizer; geometry: cosine to the mean of 100 of "
          f"them (mean and first principal component removed), line {found.line:.3f}, above which {found.recall:.1%} of the others lie")
    print(f"candidates: {len(candidates)} ({int(named[candidates].sum())} named unused, {int((~named[candidates]).sum())} others); "
          f"verified by the LM (repeat probability below {VERIFIED_BELOW}): {len(found.verified)} "
          f"({int(named[found.verified].sum())} named unused, {int((~named[found.verified]).sum())} others); {time.time() - started:.0f}s")
    print(f"named unused rows: {int(named[candidates].sum())} of {len(found.reference)} candidates ({named[candidates].sum() / len(found.reference):.1%}), "
          f"{int((named & verified).sum())} verified ({(named & verified).sum() / len(found.reference):.1%})")
    probability = dict(zip(candidates.tolist(), found.probabilities.tolist()))
    for title, group in (("verified, not named unused", candidates[verified[candidates] & ~named[candidates]]),
                         ("unverified candidates (the LM repeats them)", candidates[~verified[candidates]])):
        print(f"\n{title}: {len(group)}" + (f", the first {show_rows} by score" if len(group) > show_rows else ""))
        group = group[found.scores[group].argsort(descending=True)][:show_rows]
        for token_id in group.tolist():
            print(f"{token_id:>8} score {found.scores[token_id]:.3f}  p(repeat) {probability[token_id]:.4f}  {describe(tokens, tokenizer, token_id)}")


def untrained_verdict(tokenizer, table, tied, lm):
    """[V] bool, the untrained rows: prepare's verdict where data/<model>/ was prepared from this
    very table (on a tied table the detector takes the LM minutes: Gemma 3's 141 s), else the detector's now."""
    if os.path.isfile(os.path.join(data_dir(model), "meta.json")):
        data = load_data(model)
        if data.table.shape == table.shape and torch.equal(data.table, table):
            print(f"untrained rows: prepare's verdict in {data.folder}")
            return untrained_in(data)
    return find_untrained(model, tokenizer, table, tied, lm).untrained


def load_for_rows():
    """The LM (in the checkpoint's dtype, so a 7B model in bfloat16 stays 14 GB), its tokenizer,
    its tokens' bytes, its table, the rows the detector trusts, and the encoder where soft needs it."""
    lm, tokenizer = load_lm(model, dtype="auto")
    tokens, kind = token_bytes(tokenizer)
    embed = lm.get_input_embeddings().weight
    table = embed.detach()[:len(tokens)].float().clone()
    known = ~untrained_verdict(tokenizer, table, embed is lm.get_output_embeddings().weight, lm)
    trained = None
    if method == "soft":
        trained = load_checkpoint(out_dir, {"model": model, "vocab_size": len(tokens), "dim": table.shape[1]}, checkpoint)
    return lm, tokenizer, tokens, kind, table, known, trained


def refined(lm, tokenizer, strings, rows):
    """With a distill_text, the rows refined on it by Token Distillation; the LM and its tokenizer
    must still be as shipped, before any token is added."""
    if not distill_text:
        return rows
    rows, seconds, losses = distill_rows(lm, tokenizer, strings, rows, distilling_on)
    print(f"refined by Token Distillation on {distill_text} in {seconds:.0f} s: the hidden states' error {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last")
    return rows


def repair():
    check_new_folder(save)
    lm, tokenizer, tokens, _, table, known, trained = load_for_rows()
    vocab_size = len(tokens)
    ids = (~known).nonzero()[:, 0]
    if len(ids) == 0:
        raise UserError(f"the detector finds no untrained input rows in {model} (python tokens.py detect says why); there is nothing to repair")
    rows = new_rows(method, [tokens[i][0] for i in ids], table, known, tokenizer, trained)
    embed = lm.get_input_embeddings().weight
    with torch.no_grad():
        embed[ids] = rows.to(embed.dtype)
    # an untied head may have untrained rows of its own (Llama 3's reserved tokens are zero on both sides)
    head = lm.get_output_embeddings().weight
    dead_out = untrained_rows(head.detach()[:vocab_size]).nonzero()[:, 0]
    fill_output_rows(lm, vocab_size, dead_out)
    print(f"filled {len(ids)} untrained input rows by {method}" +
          ("" if head is embed else f" and {len(dead_out)} untrained output rows by the trained output rows' mean"))
    show_nearest(rows, table, known, tokens, tokenizer, ids)
    save_model_folder(lm, tokenizer, save)
    print(f"wrote {save}")


def add():
    check_new_folder(save)
    names = {s: s for s in new_strings} | (read_names(rows_from) if rows_from else {})
    strings = list(names)
    if any(not s for s in new_strings) or len(set(new_strings)) != len(new_strings):
        raise UserError("--tokens must be distinct, non-empty strings")
    lm, tokenizer, tokens, kind, table, known, trained = load_for_rows()
    vocab_size = len(tokens)
    vocab = tokenizer.get_vocab()
    for s in strings:
        if vocab_id(vocab, kind, s) is not None:
            raise UserError(f"{s!r} is already token {vocab_id(vocab, kind, s)} of {model}; add only strings that are not tokens yet "
                            f"(tokens.py repurpose gives an existing token a row from a new name)")
    rows = refined(lm, tokenizer, [names[s] for s in strings], new_rows(method, [names[s].encode("utf-8") for s in strings], table, known, tokenizer, trained))
    # mean_resizing would spend time on a covariance for rows that are overwritten next
    ids = add_tokens(lm, tokenizer, strings, mean_resizing=False)
    set_rows(lm, ids, rows, vocab_size, added=True)
    print(f"added {len(strings)} tokens to {model} ({vocab_size} -> {len(tokenizer)}), input rows by {method}" + (" and Token Distillation" if distill_text else ""))
    tokens += [(s.encode("utf-8"), {"special"}) for s in strings]
    show_nearest(rows, table, known, tokens, tokenizer, ids)
    save_model_folder(lm, tokenizer, save)
    print(f"wrote {save}")


def repurpose():
    check_new_folder(save)
    names = read_names(rows_from)
    lm, tokenizer, tokens, kind, table, known, trained = load_for_rows()
    vocab = tokenizer.get_vocab()
    missing = [s for s in names if vocab_id(vocab, kind, s) is None]
    if missing:
        raise UserError(f"{missing[0]!r} is not a token of {model}; repurpose gives existing tokens new rows (tokens.py add makes new tokens)")
    ids = torch.tensor([vocab_id(vocab, kind, s) for s in names])
    known[ids] = False  # a row being replaced is no evidence about the others
    rows = refined(lm, tokenizer, list(names.values()), new_rows(method, [name.encode("utf-8") for name in names.values()], table, known, tokenizer, trained))
    set_rows(lm, ids, rows, len(tokens), added=False)
    print(f"gave {len(ids)} tokens of {model} input rows by {method}" + (" and Token Distillation" if distill_text else "") + " from their new names")
    show_nearest(rows, table, known, tokens, tokenizer, ids)
    save_model_folder(lm, tokenizer, save)
    print(f"wrote {save}")


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


def compare():
    data = load_data(model)
    source = load_checkpoint(out_dir, data_identity(data), checkpoint)
    table, held = data.table, data.test_ids
    if len(held) == 0:
        raise UserError(f"the data in {data.folder} has no held-out tokens; prepare it with test_fraction above 0")
    # the soft rows are the very rows test_mistral.py splices: evaluate.py's prediction of this checkpoint
    predicted, made_from = read_predicted_table(out_dir, source)
    texts = scoring_texts(text_file)
    lm, tokenizer = load_lm(model, device=pick_device(device))
    check_lm_table(lm.get_input_embeddings().weight, data, model)
    known = ~untrained_in(data)
    known[held] = False
    spelled = [bytes.fromhex(data.meta["tokens"][i]["bytes"]) for i in held.tolist()]
    rows = {"true": table[held], **{name: new_rows(name, spelled, table, known, tokenizer, None) for name in ("mean", "fvt")},
            "soft": predicted[held]}

    scores = {}
    for name, filled in rows.items():
        ranks = true_ranks(filled, table, held)
        scores[name] = {"cosine": F.cosine_similarity(filled, table[held], dim=1).mean().item(),
                        "median_rank": ranks.float().median().item(), "mean_rank": ranks.float().mean().item(),
                        "hit1": (ranks == 1).float().mean().item(), "ppl_input": {}, "ppl_tied": {}}

    scored = scoring_windows(tokenizer, texts, eval_tokens, context)
    # splice_rows gives a tied model a head of its own, so filling the input rows leaves the output
    # side as trained; the "tied" columns then fill the head's rows too, as a tied model would after add
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    for name in progress(rows, desc="perplexity", leave=False):
        true_in = splice_rows(lm, rows[name], held)
        head = lm.get_output_embeddings().weight
        true_out = head[held].clone()
        with torch.no_grad():
            for text, windows in scored.items():
                scores[name]["ppl_input"][text] = perplexity(lm, windows)
                if tied:
                    head[held] = rows[name].to(head)
                    scores[name]["ppl_tied"][text] = perplexity(lm, windows)
                    head[held] = true_out
        splice_rows(lm, true_in, held)

    labels = {"true": "true rows (the LM's own)", "mean": "mean of trained rows", "fvt": "fvt (mean of the pieces' rows)",
              "soft": "soft (byte encoder)"}
    print(f"\n{data.meta['model']}: the {len(held)} held-out tokens of {data.folder} as new tokens, soft rows predicted from "
          f"{made_from['checkpoint']} (iteration {made_from['iter_num']}); perplexity on " +
          "; ".join(f"{ids.numel()} tokens of {text} ({int(torch.isin(ids, held).sum())} held-out)" for text, ids in scored.items()) + "\n")
    columns = ["rows of the held-out tokens", "cosine to true row", "rank of true token (median)", "rank (mean)", "hit@1"]
    columns += [f"perplexity on {text}, input rows filled" for text in scored]
    columns += [f"perplexity on {text}, input and output rows filled" for text in scored] if tied else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for name, score in scores.items():
        cells = [labels[name], f"{score['cosine']:.3f}", f"{score['median_rank']:.0f}", f"{score['mean_rank']:.0f}", f"{score['hit1']:.1%}"]
        cells += [f"{score['ppl_input'][text]:.3f}" for text in scored]
        cells += [f"{score['ppl_tied'][text]:.3f}" for text in scored] if tied else []
        print("| " + " | ".join(cells) + " |")
    print(f"\nranks: of the true token when the filled row is scored against all {len(table)} true input rows" +
          (", which in this tied LM are the LM head; in the last columns the filled row is the token's output row too" if tied else ""))


{"detect": detect, "repair": repair, "add": add, "repurpose": repurpose, "compare": compare}[command]()
