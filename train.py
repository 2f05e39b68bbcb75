"""
Train the byte encoder to predict an LM's embedding table from its tokens' bytes.

$ python train.py config/smollm2_cpu.py
$ python train.py config/mistral_gpu.py --batch_size=128
$ torchrun --standalone --nproc_per_node=4 train.py config/mistral_gpu.py
"""
import json
import math
import os
import resource
import time
from contextlib import nullcontext

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from soft_tokenizer.configurator import UserError, check, configure, pick_device, progress
from soft_tokenizer.filling import vocabulary_fvt_rows
from soft_tokenizer.lm import load_tokenizer, resolve_model
from soft_tokenizer.metrics import closeness
from soft_tokenizer.ngrams import ngram_vocabulary, solve_ngram_vectors
from model import NGRAM_LIMIT, PAD, ByteEncoder, ByteEncoderConfig, LossConfig, hub_ids, softmax_negative_ids, trim_padding
from soft_tokenizer.schedule import batch_order, budget_used, get_lr
from soft_tokenizer.storage import STAGE_FILES, claim_out_dir, data_identity, load_checkpoint, load_data, save_checkpoint

# -----------------------------------------------------------------------------
# defaults: the CPU demo's recipe on the embedded SmolLM2-135M (`make demo`, README's figures);
# config/*.py files override them (config/mistral_gpu.py: Mistral-7B on a GPU)
model = "smollm2"  # whose table: data/<name>/ from prepare_mistral_data.py
out_dir = "out-smollm2"  # ckpt.pt is written here
init_from = "scratch"  # or "resume" from out_dir/ckpt.pt
# False: save only when the val tokens' val/cosine beats every earlier eval's; they are never
# trained on and are not the test tokens (the held-out ones), which stay the new-token test
always_save_checkpoint = False
eval_interval = 250  # iterations between evals; 0: none by iterations
eval_interval_seconds = 0.0  # training seconds between evals, for a budget in seconds; 0: none by time (there is always one at the end)
eval_sample = 2048  # tokens sampled from each split for the periodic eval
log_file = ""  # if set, each eval appends a JSON line here (bench.py reads it)
seed = 1337
# the solved part (soft_tokenizer/ngrams.py, model.ngram_codes): a vector in the table's space
# for every n-gram of 1 to ngram_max symbols of [start] bytes [end] that the train tokens have,
# solved by ridge least squares before the transformer trains on what they leave; 0: none
ngram_max = 6
ngram_whole_max = 3  # tokens of at most this many bytes also get a vector of their own (too few parts to compose)
ngram_min_tokens = 1  # an n-gram gets a vector if at least this many train tokens have it (whole-token ones always)
ngram_ridge = 0.05  # the ridge penalty on each n-gram vector; it shrinks most the vectors that few tokens share
ngram_whole_ridge = 0.05  # the same for whole-token vectors
ngram_solve_iters = 60  # conjugate-gradient iterations of the solve
ngram_column_block = 0  # solve this many of the table's columns at a time (less memory on a wide table); 0: all
# encoder
n_layer = 1
n_head = 4
n_embd = 256
head_hidden = 1024
dropout = 0.0
bias = True
# the encoder also reads FVT's row for each token (the mean of its pieces' rows) and predicts a
# correction to it (model.py; filling.vocabulary_fvt_rows says which pieces a vocabulary token gets)
fvt_residual = False
# batches
batch_size = 256
gradient_accumulation_steps = 1
trim_batches = True  # cut each batch to its longest token instead of the full block
bucket_by_length = True  # batch tokens of similar length together, so little padding is left
# loss (model.embedding_loss): weighted sum of L1, MSE and a softmax over table rows
l1_weight = 0.0
# the loss compares rows in units of the table's RMS row norm (model.ByteEncoderConfig.row_scale),
# so these settings mean the same on every LM; on SmolLM2 (norm 3.25) they are the earlier
# recipe's mse_weight 100 and temperature 0.2 in its raw units, to 6%
mse_weight = 1000.0  # train_e2e.py's MSE anchor has this weight too
softmax_weight = 1.0
softmax_negatives = 4096  # 0: all V rows; else this many rows sampled per step plus the batch's own
softmax_hub_negatives = 256  # with sampled negatives, also always the rows with the largest dot product with the mean row
softmax_temperature = 0.02
softmax_min_count = 0  # the softmax term only for tokens the training text uses at least this often; the rest get L1/MSE alone
token_weight_power = 0.0  # each token's loss is weighted by (1 + its count in the training text) ** this
# the spliced LM reads the tokens text uses: draw them in proportion to (1 + count) ** this; 0: each once an epoch
sample_power = 1.0
# pseudo-counts added to those counts in proportion to the LM's own share of each token over the
# text it sampled (prepare's lm_share), so that tokens common in general but absent from the
# docstrings (" France") come up too, for any tokenizer
lm_share_tokens = 1e6
# optimizer: AdamW with linear warmup and cosine decay to min_lr over the one budget
learning_rate = 1e-3
# the budget in iterations, so that the same command trains the same encoder on any machine;
# 0: max_seconds is the budget (both 0: the solve alone)
max_iters = 1000
max_seconds = 0.0  # the budget in seconds of training, when max_iters is 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 50
min_lr = 1e-4
# system
device = "auto"  # auto: cuda, else cpu (never mps: configurator.pick_device)
compile = True  # torch.compile on CUDA only; the step that compiles is not counted as training time
# -----------------------------------------------------------------------------
configure(globals())
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# every number is range-checked before any work, each with one sentence naming it
for key in ("batch_size", "gradient_accumulation_steps", "eval_sample", "n_layer", "n_head", "n_embd", "head_hidden", "ngram_min_tokens"):
    check(config, key, 1)
check(config, "ngram_max", 0, NGRAM_LIMIT)
check(config, "ngram_whole_max", 0, NGRAM_LIMIT - 2)
for key in ("max_iters", "eval_interval", "ngram_solve_iters", "ngram_column_block", "ngram_ridge", "ngram_whole_ridge", "warmup_iters", "softmax_negatives", "softmax_hub_negatives", "softmax_min_count",
            "l1_weight", "mse_weight", "softmax_weight", "token_weight_power", "sample_power", "lm_share_tokens", "weight_decay",
            "grad_clip", "max_seconds", "eval_interval_seconds", "min_lr"):
    check(config, key, 0)
for key in ("learning_rate", "softmax_temperature"):
    check(config, key, 0, low_open=True)
for key in ("beta1", "beta2", "dropout"):
    check(config, key, 0, 1, high_open=True)
if max_iters == 0 and max_seconds == 0 and not ngram_max:
    raise UserError("max_iters=0 and max_seconds=0 leave the run without a budget (with ngram_max=0 there is no solve either); set one of them")
if n_embd % n_head:
    raise UserError(f"n_head={n_head} does not divide n_embd={n_embd}; pick n_embd a multiple of n_head")
if init_from not in ("scratch", "resume"):
    raise UserError(f"init_from={init_from!r} is not known; use 'scratch' or 'resume'")

# -----------------------------------------------------------------------------
# set-up: processes, device, data, encoder, optimizer
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    init_process_group(backend="nccl" if torch.cuda.is_available() and device in ("auto", "cuda") else "gloo")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
else:
    rank, world, local_rank = 0, 1, 0
master = rank == 0
dev = pick_device(device, local_rank)
device_type = dev.split(":")[0]
if device_type == "cuda":
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = True
torch.manual_seed(seed)
if batch_size % world:
    raise UserError(f"batch_size={batch_size} does not split evenly over {world} processes; pick a multiple of {world}")
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

# the whole dataset is a few hundred MB at most: keep it on the device
data = load_data(model)
input_ids, table = data.input_ids.to(dev), data.table.to(dev)
train_ids = data.train_ids.to(dev)
lengths = (input_ids != PAD).sum(1)

if init_from == "resume":
    checkpoint = load_checkpoint(out_dir, data_identity(data), "regression")
    model_args = checkpoint["model_args"]
else:
    checkpoint = None
    ngram_keys = ngram_vocabulary(data.input_ids[data.train_ids], ngram_max, ngram_whole_max, ngram_min_tokens) if ngram_max else torch.zeros(0, dtype=torch.long)
    model_args = dict(block_size=data.meta["block_size"], n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      n_out=data.meta["dim"], head_hidden=head_hidden, dropout=dropout, bias=bias,
                      ngram_max=ngram_max, ngram_whole_max=ngram_whole_max, ngram_count=len(ngram_keys), fvt_residual=fvt_residual,
                      row_scale=data.table[data.train_ids].norm(dim=1).pow(2).mean().sqrt().item())
encoder = ByteEncoder(ByteEncoderConfig(**model_args)).to(dev)
fvt = (vocabulary_fvt_rows(load_tokenizer(resolve_model(model, only_embeddings=True)[0]), data.table, data.train_ids).to(dev)
       if encoder.config.fvt_residual else None)
solve_seconds = 0.0
solved_here = checkpoint is None and ngram_max > 0
if solved_here:
    # the vectors first, on the train tokens alone (an fvt_residual encoder's: what FVT's rows miss);
    # every process solves the same problem, and rank 0's answer is the one all keep
    started = time.time()
    targets = data.table[data.train_ids] - (0 if fvt is None else fvt[data.train_ids.to(dev)].cpu())
    vectors = solve_ngram_vectors(data.input_ids[data.train_ids], targets, ngram_keys, ngram_max, ngram_whole_max,
                                  ngram_ridge, ngram_whole_ridge, ngram_solve_iters, ngram_column_block)
    with torch.no_grad():
        encoder.ngram_keys.copy_(ngram_keys)
        encoder.ngram.weight[:-1] = vectors.to(dev)
    if ddp:
        torch.distributed.broadcast(encoder.ngram.weight.data, 0)
    solve_seconds = time.time() - started
    del vectors, targets
if ngram_max:
    encoder.ngram.weight.requires_grad_(False)  # the transformer trains on what the solved vectors leave
optimizers = encoder.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
loss_config = LossConfig(l1_weight, mse_weight, softmax_weight, softmax_temperature)
# the mean weight over the trained tokens is 1, so the loss keeps its scale
counts = data.text_counts.double() + lm_share_tokens * data.lm_share
token_weights = (1.0 + counts) ** token_weight_power
token_weights = (token_weights / token_weights[data.train_ids].mean()).float().to(dev)
sample_weights = ((1.0 + counts) ** sample_power).to(dev)
softmax_weights = (data.text_counts >= softmax_min_count).float().to(dev)
iter_num, epoch, batch_in_epoch, train_seconds, samples_total = 0, 0, 0, 0.0, 0
best_val = -math.inf
# a generator of its own, so evals never shift the training's random stream
negatives_rng = torch.Generator().manual_seed(seed + 1)
if checkpoint is not None:
    encoder.load_state_dict(checkpoint["model"])
    for optimizer, state in zip(optimizers, checkpoint["optimizer"]):
        optimizer.load_state_dict(state)
    iter_num, epoch, batch_in_epoch = checkpoint["iter_num"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
    train_seconds, samples_total = checkpoint["train_seconds"], checkpoint.get("samples_total", 0)
    best_val = checkpoint.get("best_val", -math.inf)
    solve_seconds = checkpoint.get("solve_seconds", 0.0)
    negatives_rng.set_state(checkpoint["negatives_rng"])
raw_encoder = encoder
compiled = compile and device_type == "cuda"
if compiled:
    encoder = torch.compile(encoder, dynamic=True)
if ddp:
    # the frozen n-gram vectors need no gradient, so DDP leaves them out
    encoder = DDP(encoder, device_ids=[local_rank] if device_type == "cuda" else None)
if master:
    table_numbers = data.meta["vocab_size"] * data.meta["dim"]
    ngram_numbers = raw_encoder.ngram.weight.numel() if ngram_max else 0
    print(f"{data.meta['model']}: {len(train_ids)} train / {len(data.val_ids)} val / {len(data.test_ids)} test (held-out) tokens, table {data.meta['vocab_size']}x{data.meta['dim']}; "
          f"encoder {raw_encoder.num_params() / 1e6:.2f}M params ({raw_encoder.num_params() / table_numbers:.2f}x the table's), "
          f"{ngram_numbers / 1e6:.2f}M of them the vectors of {raw_encoder.config.ngram_count} n-grams"
          + (f" solved in {solve_seconds:.0f}s" if solve_seconds else "") + f", on {dev}" + (f" x{world}" if ddp else ""))

# on a table whose rows share a large common direction (tied SmolLM2), a handful of rows
# that point along it win the dot product against most predictions: keep them in every softmax
if softmax_hub_negatives > len(table):
    raise UserError(f"softmax_hub_negatives={softmax_hub_negatives} must be between 0 and the table's {len(table)} rows")
hubs = hub_ids(table, softmax_hub_negatives)


def loss_inputs(ids, rng):
    """What the loss needs beside the true rows: token weights and the softmax term's negatives
    (model.softmax_negative_ids)."""
    inputs = {"weights": token_weights[ids] if token_weight_power else None}
    if not softmax_weight:
        return inputs
    others = softmax_negative_ids(len(table), softmax_negatives, hubs, rng)
    return {**inputs, "ids": ids, "negatives": table[others], "negative_ids": others,
            "softmax_weights": softmax_weights[ids] if softmax_min_count else None}


# periodic eval: a fixed sample of each split, and the rows the training text uses most,
# weighted by how often it uses them: that last number tracks the spliced LM. No top-1: against
# the whole table it is seconds of V x D work per token (half a minute a split on Gemma's 262,144
# rows) and chooses nothing; evaluate.py reports it
eval_rng = torch.Generator().manual_seed(seed)
eval_sets = {split: (ids[torch.randperm(len(ids), generator=eval_rng)[:eval_sample]].to(dev), None)
             for split, ids in (("train", data.train_ids), ("val", data.val_ids), ("test", data.test_ids))}
text_top = data.text_counts.argsort(descending=True)[:eval_sample]
text_top = text_top[data.text_counts[text_top] > 0]
eval_sets["text"] = (text_top.to(dev), data.text_counts[text_top].to(dev))
mean_row = table[train_ids].mean(0)


@torch.no_grad()
def evaluate():
    raw_encoder.eval()
    stats = {}
    for split, (ids, weights) in eval_sets.items():
        if len(ids) == 0:
            continue
        pred = raw_encoder.predict(input_ids[ids], batch_size=512, fvt=None if fvt is None else fvt[ids]).to(dev)
        for name, value in closeness(pred, table[ids], mean_row, weights).items():
            stats[f"{split}/{name}"] = value
    raw_encoder.train()
    return stats


def log_eval(stats):
    tqdm.write(f"iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    if log_file:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {"iter": iter_num, "seconds": round(train_seconds, 2), "samples": samples_total,
                  "params": raw_encoder.num_params(), "peak_mb": round(peak_mb), **stats}
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def diverged(what):
    return UserError(f"training diverged at iteration {iter_num} ({what}); the last good checkpoint is kept in {out_dir}, "
                     f"lower learning_rate and resume with --init_from=resume")


def save(stats):
    """Never save a run that has diverged: the last good checkpoint must survive a blow-up."""
    if not all(math.isfinite(v) for v in stats.values()):
        raise diverged("its eval numbers are not finite")
    if not all(torch.isfinite(p).all() for p in raw_encoder.parameters()):
        raise diverged("its weights are not finite")
    save_checkpoint(os.path.join(out_dir, STAGE_FILES["regression"]), {
        "stage": "regression", "model": raw_encoder.state_dict(), "optimizer": [o.state_dict() for o in optimizers], "model_args": model_args, "config": config,
        "data": data_identity(data), "iter_num": iter_num, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "train_seconds": train_seconds, "samples_total": samples_total, "negatives_rng": negatives_rng.get_state(),
        "best_val": best_val, "solve_seconds": solve_seconds})


def epoch_batches():
    return batch_order(train_ids, lengths, epoch, batch_size * gradient_accumulation_steps, bucket_by_length, seed,
                       sample_weights[train_ids] if sample_power else None)


# -----------------------------------------------------------------------------
# the loop
if master:
    # now, not at the first save after minutes of work; held until the run ends
    out_dir_lock = claim_out_dir(out_dir)
    if init_from == "scratch" and os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        print(f"note: {out_dir}/ckpt.pt is from an earlier run; this run starts from scratch and its first save replaces it "
              f"(Ctrl-C now and use --init_from=resume or another --out_dir to keep it)")
bar = progress(total=100, initial=round(100 * budget_used(iter_num, train_seconds, max_iters, max_seconds)), unit="%", disable=not master, dynamic_ncols=True)
start_iter = iter_num
batches = epoch_batches()
samples_in_window, window_start = 0, time.time()
next_timed_eval = eval_interval_seconds * (1 + int(train_seconds // eval_interval_seconds)) if eval_interval_seconds > 0 else 0.0
raw_encoder.train()
try:
    while True:
        out_of_budget = budget_used(iter_num, train_seconds, max_iters, max_seconds) >= 1.0
        if ddp and max_iters == 0:
            # clocks differ between processes: rank 0's decides, or one would wait forever
            flag = torch.tensor([float(out_of_budget)], device=dev)
            torch.distributed.broadcast(flag, 0)
            out_of_budget = bool(flag.item())

        # every so often: evaluate, log, save
        timed_eval = eval_interval_seconds > 0 and train_seconds >= next_timed_eval
        resumed_here = init_from == "resume" and iter_num == start_iter  # that eval is in the log already
        counted_eval = eval_interval > 0 and iter_num % eval_interval == 0
        if master and (iter_num == 0 or counted_eval or timed_eval or out_of_budget) and not resumed_here:
            while timed_eval and next_timed_eval <= train_seconds:
                next_timed_eval += eval_interval_seconds
            stats = evaluate()
            log_eval(stats)
            selection = stats.get("val/cosine")  # None: no val tokens, nothing to choose by
            # a NaN is not skipped: save() sees it and stops the run
            # a run that solved saves its first eval: the solved vectors are minutes of work to keep
            if (iter_num > start_iter or solved_here) and (always_save_checkpoint or selection is None or not selection <= best_val):
                best_val = best_val if selection is None else max(best_val, selection)
                save(stats)
            elif iter_num > start_iter:
                tqdm.write(f"not saved: val/cosine {selection:.4f} is not above the best so far, {best_val:.4f}")
        if out_of_budget:
            break

        step_start = time.time()
        lr = get_lr(iter_num, budget_used(iter_num, train_seconds, max_iters, max_seconds), warmup_iters, learning_rate, min_lr)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
            batches = epoch_batches()
        big_batch = batches[batch_in_epoch]
        batch_in_epoch += 1
        micro_batches = big_batch.split(batch_size)
        loss_sum = 0.0
        for micro, ids in enumerate(micro_batches):
            ids = ids[rank::world]
            # gradients are averaged over processes once, after the last micro-batch
            no_sync = encoder.no_sync() if ddp and micro < len(micro_batches) - 1 else nullcontext()
            with no_sync, autocast:
                _, loss = encoder(trim_padding(input_ids[ids]) if trim_batches else input_ids[ids], table[ids], loss_config,
                                  fvt=None if fvt is None else fvt[ids], **loss_inputs(ids, negatives_rng))
                loss = loss / len(micro_batches)
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise diverged(f"the loss became {loss_sum}")
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(optimizers[0].param_groups[0]["params"] + optimizers[0].param_groups[1]["params"], grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        # the first step of a compiled encoder is mostly compiling: a one-off cost, not training
        # time, or a short budget would be spent compiling and recipes compiled or not would not compare
        if not (compiled and iter_num == start_iter):
            train_seconds += time.time() - step_start
        iter_num += 1
        samples_in_window += len(big_batch)
        samples_total += len(big_batch)
        if master:
            bar.update(round(100 * budget_used(iter_num, train_seconds, max_iters, max_seconds)) - bar.n)
            if iter_num % 10 == 0:
                rate = samples_in_window / (time.time() - window_start)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.1e}", samples_s=f"{rate:.0f}", refresh=False)
                samples_in_window, window_start = 0, time.time()
except KeyboardInterrupt:
    bar.close()
    saved = os.path.join(out_dir, "ckpt.pt")
    where = f"the last checkpoint is {saved}; continue with --init_from=resume" if os.path.isfile(saved) else "no checkpoint was written yet"
    raise UserError(f"interrupted at iteration {iter_num}; {where}") from None
finally:
    bar.close()  # or a message lands on the bar's line and the bar is drawn again after it
if master and device_type == "cuda":
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
if ddp:
    # rank 0 may still be evaluating and saving; a gloo process that tears down its group while
    # its peer is busy can abort ("terminate called without an active exception")
    torch.distributed.barrier()
    destroy_process_group()
