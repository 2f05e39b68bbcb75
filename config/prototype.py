# The prototype's recipe, kept as the baseline bench.py measures against: every token
# padded to the full block and attended in full, MSE loss only, its encoder and optimizer.
model = "smollm2"
out_dir = "out-prototype"
n_layer = 4
n_head = 8
n_embd = 512
head_hidden = 2048
ngram_max = 0
batch_size = 64
gradient_accumulation_steps = 40
trim_batches = False
bucket_by_length = False
l1_weight = 0.0
mse_weight = 1.0
softmax_weight = 0.0
sample_power = 0.0
lm_share_tokens = 0.0
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
max_iters = 10000
eval_interval = 500
eval_interval_seconds = 0.0
always_save_checkpoint = True
