# CPU demo on the embedded SmolLM2-135M (49152 x 576 table, tied input/output): the recipe is
# the defaults at the top of train.py and train_e2e.py, whose budgets are iterations and steps,
# so the same command trains the same encoder on any machine; this file names the model
model = "smollm2"
out_dir = "out-smollm2"
