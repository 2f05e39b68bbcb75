# Mistral-7B-v0.1's table (32000 x 4096) on one GPU, at the prototype's encoder size, with this
# repo's batching and a softmax over the whole table; none of the CPU recipe's n-grams,
# frequency sampling or e2e stage, and not yet run on a GPU (README). The loss weights are
# train.py's, which are in units of the table's RMS row norm and so carry over from SmolLM2
model = "mistralai/Mistral-7B-v0.1"
out_dir = "out-mistral"
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
max_iters = 10000
eval_interval = 500
eval_interval_seconds = 0.0
always_save_checkpoint = True
l1_weight = 0.0
softmax_weight = 1.0
softmax_negatives = 0
sample_power = 0.0
