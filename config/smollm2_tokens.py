# The encoder for new tokens on SmolLM2 (tokens.py add / repurpose, finetune.py, transfer.py):
# smollm2_cpu.py's recipe and budgets, but the encoder also reads FVT's row and predicts a
# correction to it (train.py's fvt_residual). Chosen on the selection text's new words, where its
# tied rows beat FVT's (excess bits per byte 0.018 against 0.024; the splice recipe's encoder:
# 0.034); it splices worse than the demo's encoder (2.08x against 1.54x on the selection text),
# so the demo keeps the other one (RESEARCH_LOG, "an encoder that reads FVT's row")
model = "smollm2"
out_dir = "out-smollm2-tokens"
# budgets in seconds, as they were measured (the defaults' budgets are iterations)
max_iters = 0
max_seconds = 300.0
e2e_steps = 0
e2e_seconds = 300.0
fvt_residual = True
