"""
The splice test: does the LM still work when its input-embedding table is replaced by the
byte encoder's prediction (out_dir/new_embeddings.safetensors, from evaluate.py)? Greedy
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
from safetensors import SafetensorError
from safetensors.torch import load_file

from configurator import UserError, check, configure, pick_device
from lm import load_lm, perplexity, scoring_texts, untie_head
from storage import check_writable, write_text_file

model = "mistralai/Mistral-7B-v0.1"  # hub id, local folder, or "smollm2"
out_dir = "out-mistral"  # holds new_embeddings.safetensors from evaluate.py; splice.json goes here
prompt = "What is the capital of France? Answer in one sentence."
max_new_tokens = 48
text_file = ""  # text for perplexity; empty: the two evaluation texts from Python's documentation
eval_tokens = 2048  # perplexity over the first this many tokens of each text
context = 512  # a text is scored in independent windows of this many tokens
device = "auto"  # auto: cuda, then mps, then cpu
dtype = "auto"  # auto: bfloat16 on cuda, float32 elsewhere; or float32, bfloat16, float16
configure(globals())
for key in ("max_new_tokens", "eval_tokens", "context"):
    check(globals(), key, 1)
started = time.time()
dev = pick_device(device)
dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
if dtype not in dtypes and dtype != "auto":
    raise UserError(f"dtype={dtype!r} is not known; use auto, {', '.join(dtypes)}")
torch_dtype = dtypes[dtype] if dtype != "auto" else torch.bfloat16 if dev.startswith("cuda") else torch.float32

# check the cheap inputs before loading the LM
path = os.path.join(out_dir, "new_embeddings.safetensors")
if not os.path.isfile(path):
    raise UserError(f"no {path}; run: python evaluate.py (with the same config) first")
try:
    new = load_file(path).get("embeddings")
except (SafetensorError, OSError):
    raise UserError(f"{path} is not a readable safetensors file; rerun evaluate.py to write it again") from None
if new is None or new.ndim != 2:
    raise UserError(f"{path} has no 2-D tensor named 'embeddings'; rerun evaluate.py to write it again")
texts = scoring_texts(text_file)
check_writable(out_dir)

print(f"loading {model} ({torch_dtype}, {dev})")
lm, tokenizer = load_lm(model, torch_dtype, dev)
embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
rows, dim = embed.weight.shape
# the LM's table may have padding rows past the tokenizer's vocabulary; the prediction covers the vocabulary
if new.shape[1] != dim or not len(tokenizer) <= new.shape[0] <= rows:
    raise UserError(f"{path} is {new.shape[0]}x{new.shape[1]} but {model} has {len(tokenizer)} tokens and a {rows}x{dim} input table; "
                    f"it was made for another model: run evaluate.py with this model's config")
text_ids = {name: tokenizer(text, return_tensors="pt")["input_ids"][0][:eval_tokens] for name, text in texts.items()}
for name, ids in text_ids.items():
    if len(ids) < 2:
        raise UserError(f"the evaluation text ({name}) is shorter than two tokens; pass a longer --text_file")
if tokenizer.chat_template:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
else:
    inputs = tokenizer(prompt, return_tensors="pt")
inputs = {k: v.to(lm.device) for k, v in inputs.items()}
untie_head(lm)
head_before = head.weight.detach().clone()


@torch.no_grad()
def answer():
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


results = {}
for table_name in ("original", "spliced"):
    if table_name == "spliced":
        with torch.no_grad():
            embed.weight[:len(new)] = new.to(embed.weight.device, embed.weight.dtype)
    t0 = time.time()
    results[table_name] = {"answer": answer(), "perplexity": {name: perplexity(lm, ids, context) for name, ids in text_ids.items()}}
    print(f"{table_name}: {time.time() - t0:.1f}s")
if lm.get_output_embeddings().weight is embed.weight or not torch.equal(head.weight, head_before):
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
for name, ids in text_ids.items():
    original, spliced = results["original"]["perplexity"][name], results["spliced"]["perplexity"][name]
    ratios[name] = spliced / original
    print(f"  {name} ({len(ids)} tokens): original {original:.2f}, spliced {spliced:.2f} ({ratios[name]:.2f}x)")

report = {"model": model, "embeddings": path, "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
          "prompt": prompt, "chat_template": bool(tokenizer.chat_template), "max_new_tokens": max_new_tokens,
          "texts": {name: len(ids) for name, ids in text_ids.items()}, "context": context,
          "perplexity": {"original": results["original"]["perplexity"], "spliced": results["spliced"]["perplexity"]},
          "ratio": ratios, "answer": {"original": results["original"]["answer"], "spliced": results["spliced"]["answer"]},
          "seconds": round(time.time() - started, 1)}
write_text_file(os.path.join(out_dir, "splice.json"), json.dumps(report, indent=1) + "\n")
print(f"wrote {out_dir}/splice.json in {report['seconds']:.0f}s")
