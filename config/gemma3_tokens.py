# The encoder for new tokens on Gemma 3 (tokens.py add / repurpose, finetune.py, transfer.py):
# gemma3_cpu.py's recipe and budgets, but the encoder also reads FVT's row and predicts a
# correction to it (train.py's fvt_residual), as config/smollm2_tokens.py does on SmolLM2 (where
# it was chosen; RESEARCH_LOG, "an encoder that reads FVT's row"). The same prepared data as
# gemma3_cpu.py, so prepare with either
model = "gemma3"
out_dir = "out-gemma3-tokens"
# budgets in seconds, as they were measured (the defaults' budgets are iterations)
max_iters = 0
max_seconds = 180.0
e2e_steps = 0
e2e_seconds = 180.0
fvt_residual = True
sample_windows_train = 32  # as gemma3_cpu.py: the same data/gemma3/
sample_windows_selection = 16
