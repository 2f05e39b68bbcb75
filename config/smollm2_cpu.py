# CPU demo on the embedded SmolLM2-135M (49152 x 576 table, tied input/output): 5 minutes of
# regression (train.py) then 5 minutes end to end through the LM (train_e2e.py), so that
# `make demo` ends within 15 minutes on a 2-core machine. Chosen by the spliced LM's
# perplexity on text training never reads (README, "Making the splice work")
model = "smollm2"
out_dir = "out-smollm2"
n_layer = 1  # one layer and n-grams beat two layers at equal time: ~60% more steps a minute
n_head = 4
n_embd = 256
head_hidden = 1024
# hashed byte n-grams: capacity to memorise rows for little compute, at a high learning rate
# since each n-gram's row is touched only a few times an epoch
ngram_max = 4
ngram_buckets = 2**18
ngram_lr_scale = 30.0
batch_size = 256
gradient_accumulation_steps = 1
# the spliced LM reads the tokens text uses: draw them in proportion to their count in the
# training text (plus one, so that every token still comes now and then)
sample_power = 1.0
# plus pseudo-counts by BPE id (merge order, roughly frequency): tokens common in chat but
# absent from the docstrings (" France", " answer") come up a few times more often
rank_prior_tokens = 1e5
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
max_seconds = 300.0
e2e_seconds = 300.0
max_iters = 1000000000
eval_interval = 1000000000
eval_interval_seconds = 60.0
l1_weight = 0.0
mse_weight = 100.0
softmax_weight = 1.0
softmax_negatives = 4096
softmax_hub_negatives = 256
softmax_temperature = 0.2
# the checkpoint kept is the one best on held-out tokens, the stand-ins for new tokens
always_save_checkpoint = False
