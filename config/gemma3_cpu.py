# CPU run on the embedded Gemma 3 270M (Google's base model, 262144 x 640 table, tied; the
# Gemma terms of use apply): 3 minutes of regression then 3 minutes end to end, so that
# `make demo` ends within about 15 minutes on a 2-core machine (Gemma's prepare, with the
# detector and the sampling of its own text, and its evaluation take most of the rest). The
# recipe is the SmolLM2 demo's: train.py's and train_e2e.py's defaults, in units of each table's
# own row norm; only the budgets differ
model = "gemma3"
out_dir = "out-gemma3"
# budgets in seconds, as they were measured (the defaults' budgets are iterations)
max_iters = 0
max_seconds = 180.0
e2e_steps = 0
e2e_seconds = 180.0
# its text costs 3 times as much a token as SmolLM2's to sample (a 262,144-row head): a quarter as many windows
sample_windows_train = 32
sample_windows_selection = 16
# a base model has no chat template: a completion its original answers
prompt = "Question: What is the capital of France?\nAnswer:"
max_new_tokens = 24
# top-1 over all 262144 rows would be 262144 x 262144 x 640 multiply-adds: a fixed sample of rows
top1_rows = 4096
