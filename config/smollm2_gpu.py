# The SmolLM2-135M table on one GPU (bench.py picks it on CUDA): the prototype's encoder size,
# a softmax over the whole table; none of the CPU recipe's levers yet. Not yet measured on a
# GPU: no GPU was lent when it was written; see README.
model = "smollm2"
out_dir = "out-smollm2-gpu"
n_layer = 4
n_head = 8
n_embd = 512
head_hidden = 2048
ngram_max = 0
batch_size = 1024
gradient_accumulation_steps = 1
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
max_iters = 5000
eval_interval = 500
eval_interval_seconds = 0.0
always_save_checkpoint = True
l1_weight = 0.0
mse_weight = 100.0
softmax_weight = 1.0
softmax_negatives = 0
softmax_temperature = 0.2
sample_power = 0.0
rank_prior_tokens = 0.0
