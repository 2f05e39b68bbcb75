# SmolLM2-135M on one GPU (gpu_check.py; bench.py picks it on CUDA): the CPU recipe, which is the
# defaults of train.py and train_e2e.py (n-grams, frequency sampling with the LM's own share of each token, the e2e
# stage), with batches sized for a GPU and the LM in bfloat16 (dtype=auto). Written without a
# GPU: the batch sizes and the learning rate that goes with the larger batch are guesses, never
# measured (README).
model = "smollm2"
out_dir = "out-smollm2-gpu"
batch_size = 1024
learning_rate = 2e-3
min_lr = 2e-4
# budgets in seconds, as they were measured (the defaults' budgets are iterations)
max_iters = 0
max_seconds = 300.0
e2e_steps = 0
e2e_seconds = 300.0
e2e_windows = 32
compile = False  # a one-layer encoder gains little from it, and compiling would eat the timed budget
