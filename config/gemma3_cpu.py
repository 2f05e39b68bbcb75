# CPU run on the embedded Gemma 3 270M (Google's base model, 262144 x 640 table, tied; the
# Gemma terms of use apply): 3.5 minutes of regression then 3.5 minutes end to end, so that
# `make demo` ends within about 15 minutes on a 2-core machine (Gemma's prepare, with the
# detector, and its evaluation take most of the rest). The recipe is the SmolLM2 demo's
# (train.py's defaults, in units of each table's own row norm) but for the rank prior, which
# assumes a BPE vocabulary numbered in merge order
model = "gemma3"
out_dir = "out-gemma3"
max_seconds = 210.0
e2e_seconds = 210.0
rank_prior_tokens = 0.0
# a base model has no chat template: a completion its original answers
prompt = "Question: What is the capital of France?\nAnswer:"
max_new_tokens = 24
# top-1 over all 262144 rows would be 262144 x 262144 x 640 multiply-adds: a fixed sample of rows
top1_rows = 4096
