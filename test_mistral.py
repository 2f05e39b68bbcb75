"""
The splice test: does the LM still work when its input-embedding table is replaced by the
byte encoder's prediction (out_dir/new_embeddings.safetensors, from evaluate.py, which must
come from the checkpoint out_dir holds now and the LM's table the data was made from)? Greedy
answers to a chat prompt, and perplexity on two texts that no part of training reads
(lm.evaluation_texts), original table against spliced table. Only the input table changes;
the output head keeps the LM's own weights.

$ python test_mistral.py config/smollm2_cpu.py
$ python test_mistral.py config/mistral_gpu.py --text_file=notes.txt
"""
import itertools
import json
import os
import textwrap
import time

import torch

from soft_tokenizer.configurator import UserError, check, configure, pick_device
from soft_tokenizer.lm import bos_id, load_lm, perplexity, pick_dtype, resolve_model, scoring_texts, scoring_windows
from soft_tokenizer.splice import read_predicted_table, splice_rows
from soft_tokenizer.storage import check_lm_table, check_writable, data_identity, load_checkpoint, load_data, write_text_file

model = "smollm2"  # hub id, local folder, or "smollm2"
out_dir = "out-smollm2"  # holds new_embeddings.safetensors from evaluate.py; splice.json goes here
checkpoint = "auto"  # the checkpoint the predictions must come from: regression, e2e, or auto (the last stage that ran)
prompt = "What is the capital of France? Answer in one sentence."
max_new_tokens = 48
text_file = ""  # text for perplexity; empty: the two evaluation texts from Python's documentation
# True: score on the selection text instead (lm.SELECTION_MODULES), the one a recipe is chosen on,
# into splice-selection.json; the evaluation texts only report
selection = False
eval_tokens = 2048  # perplexity over the first this many tokens of each text
context = 512  # a text is scored in independent windows of this many tokens, each led by the LM's BOS if it has one
# whose rows are spliced: all; in_text, the tokens the training text uses; not_in_text, the others;
# held_out, the held-out tokens, which no stage trained on: what a token the encoder never saw gets.
# The rest keep the LM's own rows, which says where a splice's loss comes from (splice-in_text.json, ...)
splice_tokens = "all"
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
dtype = "auto"  # auto: bfloat16 on cuda, float32 elsewhere; or float32, bfloat16, float16
configure(globals())
for key in ("max_new_tokens", "eval_tokens"):
    check(globals(), key, 1)
check(globals(), "context", 2)
if text_file and selection:
    raise UserError("text_file and selection=True both name the text to score; pass one of them")
if splice_tokens not in ("all", "in_text", "not_in_text", "held_out"):
    raise UserError(f"splice_tokens={splice_tokens!r} is not known; use all, in_text, not_in_text or held_out")
report_file = "splice" + ("" if splice_tokens == "all" else f"-{splice_tokens}") + ("-selection" if selection else "") + ".json"
started = time.time()
dev = pick_device(device)
torch_dtype = pick_dtype(dtype, dev)

# check the cheap inputs before loading the LM
resolve_model(model)
data = load_data(model)
new, source = read_predicted_table(out_dir, load_checkpoint(out_dir, data_identity(data), checkpoint))
texts = scoring_texts(text_file, selection)
check_writable(out_dir)
spliced_ids = {"all": None, "held_out": data.test_ids}.get(splice_tokens)
if splice_tokens in ("in_text", "not_in_text"):
    spliced_ids = ((data.text_counts > 0) == (splice_tokens == "in_text")).nonzero()[:, 0]

print(f"loading {model} ({torch_dtype}, {dev})")
lm, tokenizer = load_lm(model, torch_dtype, dev)
check_lm_table(lm.get_input_embeddings().weight, data, model)
scored = scoring_windows(tokenizer, texts, eval_tokens, context)
if selection and len(data.selection_ids):  # and the LM's own text (prepare's selection_ids), since the docstrings are one domain
    scored[f"selection: {len(data.selection_ids)} windows of the LM's own text"] = data.selection_ids
if tokenizer.chat_template:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
else:
    inputs = tokenizer(prompt, return_tensors="pt")
inputs = {k: v.to(lm.device) for k, v in inputs.items()}
head_before = lm.get_output_embeddings().weight.detach().clone()


@torch.no_grad()
def answer():
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


results = {}
for table_name in ("original", "spliced"):
    if table_name == "spliced":
        splice_rows(lm, new if spliced_ids is None else new[spliced_ids], spliced_ids)
    t0 = time.time()
    results[table_name] = {"answer": answer(), "perplexity": {name: perplexity(lm, windows) for name, windows in scored.items()}}
    print(f"{table_name}: {time.time() - t0:.1f}s")
head = lm.get_output_embeddings().weight
if head is lm.get_input_embeddings().weight or not torch.equal(head, head_before):
    raise RuntimeError("the output head changed while splicing the input table; the comparison is void")

width = 50
print(f"\nprompt{' (chat template)' if tokenizer.chat_template else ''}: {prompt}\n")
print(f"{'original table':<{width}} | spliced table")
print(f"{'-' * width}-+-{'-' * width}")
columns = [textwrap.wrap(results[name]["answer"], width) or [""] for name in ("original", "spliced")]
for left, right in itertools.zip_longest(*columns, fillvalue=""):
    print(f"{left:<{width}} | {right}")
ratios = {}
print(f"\nperplexity, windows of {context} tokens; output head unchanged:")
for name, windows in scored.items():
    original, spliced = results["original"]["perplexity"][name], results["spliced"]["perplexity"][name]
    ratios[name] = spliced / original
    print(f"  {name} ({windows.numel()} tokens): original {original:.2f}, spliced {spliced:.2f} ({ratios[name]:.2f}x)")

report = {**source, "embeddings": os.path.join(out_dir, "new_embeddings.safetensors"), "lm": model, "revision": data.meta["revision"],
          "table_sha256": data.meta["table_sha256"], "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
          "prompt": prompt, "chat_template": bool(tokenizer.chat_template), "max_new_tokens": max_new_tokens,
          "splice_tokens": splice_tokens, "texts": {name: windows.numel() for name, windows in scored.items()}, "bos": bos_id(tokenizer) is not None, "context": context,
          "perplexity": {"original": results["original"]["perplexity"], "spliced": results["spliced"]["perplexity"]},
          "ratio": ratios, "answer": {"original": results["original"]["answer"], "spliced": results["spliced"]["answer"]},
          "seconds": round(time.time() - started, 1)}
write_text_file(os.path.join(out_dir, report_file), json.dumps(report, indent=1) + "\n")
print(f"wrote {out_dir}/{report_file} in {report['seconds']:.0f}s")
