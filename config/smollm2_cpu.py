# CPU demo on the embedded SmolLM2-135M (49152 x 576 table, tied input/output): 5 minutes of
# regression (train.py) then 5 minutes end to end through the LM (train_e2e.py), so that
# `make demo` ends within 15 minutes on a 2-core machine. The recipe itself is the defaults at
# the top of train.py and train_e2e.py, chosen by the spliced LM's perplexity: the latest levers
# on the selection text, earlier ones on the evaluation texts (RESEARCH_LOG.md); this file names the model and the budgets
model = "smollm2"
out_dir = "out-smollm2"
max_seconds = 300.0
e2e_seconds = 300.0
