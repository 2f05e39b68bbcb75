"""
The splice test: does the LM still work when its input-embedding table is replaced by the
byte encoder's prediction (out_dir/new_embeddings.safetensors, from evaluate.py)? Greedy
answers to a chat prompt and perplexity on a text, original table against spliced table.
Only the input table changes; the output head keeps the LM's own weights.

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

from common import DOC_MODULES, UserError, configure, default_text, load_lm, perplexity, pick_device, run_main, write_text_file

model = "mistralai/Mistral-7B-v0.1"  # hub id, local folder, or "smollm2"
out_dir = "out-mistral"  # holds new_embeddings.safetensors from evaluate.py; splice.json goes here
prompt = "What is the capital of France? Answer in one sentence."
max_new_tokens = 48
text_file = ""  # text for perplexity; empty: docstrings of standard library modules (common.default_text)
eval_tokens = 2048  # perplexity over the first this many tokens of the text
context = 512  # the text is scored in independent windows of this many tokens
device = "auto"  # auto: cuda, then mps, then cpu
dtype = "auto"  # auto: bfloat16 on cuda, float32 elsewhere; or float32, bfloat16, float16
configure(globals())


@torch.no_grad()
def answer(lm, tokenizer, inputs):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main():
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
    except SafetensorError:
        raise UserError(f"{path} is not a readable safetensors file; rerun evaluate.py to write it again") from None
    if new is None:
        raise UserError(f"{path} has no tensor named 'embeddings'; rerun evaluate.py to write it again")
    if text_file and not os.path.isfile(text_file):
        raise UserError(f"text_file {text_file} does not exist; pass a UTF-8 text file, or leave it empty for the default text")
    if text_file:
        with open(text_file, encoding="utf-8", errors="replace") as f:
            text, source = f.read(), text_file
    else:
        text, source = default_text(), f"docstrings of {', '.join(DOC_MODULES)}"

    print(f"loading {model} ({torch_dtype}, {dev})")
    lm, tokenizer = load_lm(model, torch_dtype, dev)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    rows, dim = embed.weight.shape
    # the LM's table may have padding rows past the tokenizer's vocabulary; the prediction covers the vocabulary
    if new.shape[1] != dim or not len(tokenizer) <= new.shape[0] <= rows:
        raise UserError(f"{path} is {new.shape[0]}x{new.shape[1]} but {model} has {len(tokenizer)} tokens and a {rows}x{dim} input table; "
                        f"it was made for another model: run evaluate.py with this model's config")

    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:eval_tokens]
    if len(ids) < 2:
        raise UserError(f"the evaluation text ({source}) is shorter than two tokens; pass a longer --text_file")
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(lm.device) for k, v in inputs.items()}

    # a tied model (SmolLM2) reads and writes through one tensor: give the head its own copy
    # first, so splicing the input table leaves the output side as the LM trained it
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        lm.config.tie_word_embeddings = False
    head_before = head.weight.detach().clone()

    results = {}
    for name in ("original", "spliced"):
        if name == "spliced":
            with torch.no_grad():
                embed.weight[:len(new)] = new.to(embed.weight.device, embed.weight.dtype)
        t0 = time.time()
        results[name] = {"answer": answer(lm, tokenizer, inputs), "perplexity": perplexity(lm, ids, context)}
        print(f"{name}: {time.time() - t0:.1f}s")
    if head.weight is embed.weight or not torch.equal(head.weight, head_before):
        raise RuntimeError("the output head changed while splicing the input table; the comparison is void")

    width = 50
    print(f"\nprompt{' (chat template)' if tokenizer.chat_template else ''}: {prompt}\n")
    print(f"{'original table':<{width}} | spliced table")
    print(f"{'-' * width}-+-{'-' * width}")
    columns = [textwrap.wrap(results[name]["answer"], width) for name in ("original", "spliced")]
    for left, right in itertools.zip_longest(*columns, fillvalue=""):
        print(f"{left:<{width}} | {right}")
    ppl_original, ppl_spliced = results["original"]["perplexity"], results["spliced"]["perplexity"]
    print(f"\nperplexity on {len(ids)} tokens of {source} (windows of {context}):\n"
          f"  original {ppl_original:.2f}, spliced {ppl_spliced:.2f} ({ppl_spliced / ppl_original:.2f}x); output head unchanged")

    report = {"model": model, "embeddings": path, "device": dev, "dtype": str(torch_dtype).removeprefix("torch."),
              "prompt": prompt, "chat_template": bool(tokenizer.chat_template), "max_new_tokens": max_new_tokens,
              "text": source, "eval_tokens": len(ids), "context": context,
              "perplexity": {"original": ppl_original, "spliced": ppl_spliced},
              "answer": {"original": results["original"]["answer"], "spliced": results["spliced"]["answer"]},
              "seconds": round(time.time() - started, 1)}
    write_text_file(os.path.join(out_dir, "splice.json"), json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_dir}/splice.json in {report['seconds']:.0f}s")


if __name__ == "__main__":
    run_main(main)
