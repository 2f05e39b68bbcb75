# CPU demo on the embedded SmolLM2-135M (49152 x 576 table, tied input/output), sized so
# that `make demo` fits in about 15 minutes on 2 cores. The fast recipe: batches trimmed
# to their longest token and bucketed by length, MSE plus a sampled softmax (bench.py)
model = "smollm2"
out_dir = "out-smollm2"
n_layer = 2
n_head = 4
n_embd = 256
head_hidden = 1024
batch_size = 256
gradient_accumulation_steps = 1
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
max_iters = 3000
eval_interval = 500
# the softmax term decides top-1 on a tied table; MSE keeps rows close enough to splice
l1_weight = 0.0
mse_weight = 100.0
softmax_weight = 1.0
softmax_negatives = 4096
softmax_hub_negatives = 256
softmax_temperature = 0.2
