# CPU demo on the embedded SmolLM2-135M (49152 x 576 table, tied input/output)
model = "smollm2"
out_dir = "out-smollm2"
n_layer = 2
n_head = 4
n_embd = 256
head_hidden = 1024
batch_size = 256
gradient_accumulation_steps = 1
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
max_iters = 2000
eval_interval = 200
l1_weight = 0.0
mse_weight = 1.0
softmax_weight = 1.0
softmax_negatives = 4096
