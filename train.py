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
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import PAD, UserError, configure, load_checkpoint, load_data, pick_device, run_main, save_checkpoint, top1_hits
from model import ByteEncoder, ByteEncoderConfig

# -----------------------------------------------------------------------------
# defaults: the prototype's Mistral-7B recipe; config/*.py files override them
model = "mistralai/Mistral-7B-v0.1"  # whose table: data/<name>/ from prepare_mistral_data.py
out_dir = "out-mistral"
init_from = "scratch"  # or "resume" from out_dir/ckpt.pt
eval_interval = 500
eval_interval_seconds = 0.0  # if > 0, also evaluate each time this much more training time has passed
eval_tokens = 2048  # tokens sampled from each split for the periodic eval
log_file = ""  # if set, each eval appends a JSON line here (bench.py reads it)
seed = 1337
val_fraction = 0.05  # share of the vocabulary never trained on, to measure generalisation
# encoder
n_layer = 4
n_head = 8
n_embd = 512
head_hidden = 2048
dropout = 0.0
bias = True
# batches
batch_size = 64
gradient_accumulation_steps = 40
trim_batches = True  # cut each batch to its longest token instead of the full block
bucket_by_length = True  # batch tokens of similar length together, so little padding is left
# loss: weighted sum of L1, MSE and a softmax over the table (the prototype metric's own loss)
l1_weight = 1.0
mse_weight = 1.0
softmax_weight = 0.0
softmax_negatives = 0  # 0: all V rows; else this many rows sampled per step plus the batch's own
softmax_hub_negatives = 0  # with sampled negatives, also always the rows with the largest dot product with the mean row
softmax_temperature = 1.0
# optimizer: AdamW with linear warmup and cosine decay to min_lr
learning_rate = 6e-4
max_iters = 10000
max_seconds = 0.0  # if > 0, stop after this much training time and decay lr over it instead of max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 100
min_lr = 6e-5
# system
device = "auto"  # auto: cuda, then mps, then cpu
compile = True  # torch.compile on CUDA only
# -----------------------------------------------------------------------------
configure(globals())
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def split_vocabulary(meta, val_fraction, seed):
    """Trainable ids (untrained and duplicate rows have no target of their own) split into
    train and held-out, deterministically from the seed."""
    usable = torch.tensor([t["id"] for t in meta["tokens"] if not {"untrained", "duplicate"} & set(t["flags"])])
    order = usable[torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))]
    n_val = int(round(val_fraction * len(usable)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def batch_order(train_ids, lengths, epoch, batch_size, bucket):
    """The batches of one epoch, the same for every process and every restart."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    ids = train_ids[torch.randperm(len(train_ids), generator=g)]
    if bucket:
        # sort within windows of 64 batches so batches are short yet still varied
        window = 64 * batch_size
        ids = torch.cat([w[lengths[w].argsort(stable=True)] for w in ids.split(window)])
    batches = list(ids.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # equal batches keep DDP shards and the loss scale uniform
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


def get_lr(it, done):
    """Linear warmup over warmup_iters, then cosine decay as `done` (the share of the
    iteration or time budget used) goes from 0 to 1."""
    warmup = min(1.0, (it + 1) / (warmup_iters + 1))
    return warmup * (min_lr + 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0))) * (learning_rate - min_lr))


def main():
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() and device in ("auto", "cuda") else "gloo"
        init_process_group(backend=backend)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
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
    input_ids, table, meta = load_data(model)
    input_ids, table = input_ids.to(dev), table.to(dev)
    lengths = (input_ids != PAD).sum(1)
    data_info = {"model": meta["model"], "vocab_size": meta["vocab_size"], "dim": meta["dim"]}

    if init_from == "resume":
        checkpoint = load_checkpoint(out_dir, meta)
        model_args = checkpoint["model_args"]
        train_ids, val_ids = checkpoint["train_ids"], checkpoint["val_ids"]
    elif init_from == "scratch":
        checkpoint = None
        model_args = dict(block_size=meta["block_size"], n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          n_out=meta["dim"], head_hidden=head_hidden, dropout=dropout, bias=bias)
        train_ids, val_ids = split_vocabulary(meta, val_fraction, seed)
    else:
        raise UserError(f"init_from={init_from!r} is not known; use 'scratch' or 'resume'")
    encoder = ByteEncoder(ByteEncoderConfig(**model_args)).to(dev)
    optimizer = encoder.configure_optimizer(weight_decay, learning_rate, (beta1, beta2), device_type)
    iter_num, epoch, batch_in_epoch, train_seconds = 0, 0, 0, 0.0
    if checkpoint is not None:
        encoder.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, epoch, batch_in_epoch = checkpoint["iter_num"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
        train_seconds = checkpoint["train_seconds"]
    raw_encoder = encoder
    if compile and device_type == "cuda":
        encoder = torch.compile(encoder, dynamic=True)
    if ddp:
        encoder = DDP(encoder, device_ids=[local_rank] if device_type == "cuda" else None)
    if master:
        print(f"{meta['model']}: {len(train_ids)} train / {len(val_ids)} held-out tokens, table {meta['vocab_size']}x{meta['dim']}; "
              f"encoder {raw_encoder.num_params() / 1e6:.2f}M params on {dev}" + (f" x{world}" if ddp else ""))

    # on a table whose rows share a large common direction (tied SmolLM2), a handful of rows
    # that point along it win the dot product against most predictions: keep them in every softmax
    if not 0 <= softmax_hub_negatives <= len(table):
        raise UserError(f"softmax_hub_negatives={softmax_hub_negatives} must be between 0 and the table's {len(table)} rows")
    hubs = (table @ table.mean(0)).topk(softmax_hub_negatives).indices

    # a generator of its own, so evals never shift the training's random stream
    negatives_rng = torch.Generator().manual_seed(seed + 1)
    if checkpoint is not None:
        negatives_rng.set_state(checkpoint["negatives_rng"])

    def loss_fn(pred, targets, ids, rng):
        pred = pred.float()
        loss = l1_weight * F.l1_loss(pred, targets) + mse_weight * F.mse_loss(pred, targets)
        if softmax_weight > 0:
            if softmax_negatives > 0:
                # the batch's own rows plus a shared random sample stand in for the whole table
                sampled = torch.randint(0, len(table), (softmax_negatives,), generator=rng).to(pred.device)
                sampled = torch.cat([hubs, sampled])
                candidates = torch.cat([ids, sampled])
                logits = pred @ table[candidates].T / softmax_temperature
                # a sampled row that is the token itself must not count against it
                logits[:, len(ids):] = logits[:, len(ids):].masked_fill(sampled[None, :] == ids[:, None], float("-inf"))
                labels = torch.arange(len(ids), device=pred.device)
            else:
                logits, labels = pred @ table.T / softmax_temperature, ids
            loss = loss + softmax_weight * F.cross_entropy(logits, labels)
        return loss

    @torch.no_grad()
    def evaluate():
        raw_encoder.eval()
        g, eval_rng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 2)
        out = {}
        for split, ids in (("train", train_ids), ("val", val_ids)):
            if len(ids) == 0:
                continue
            sample = ids[torch.randperm(len(ids), generator=g)[:eval_tokens]].to(dev)
            preds, losses = [], []
            for chunk in sample.split(512):
                x = input_ids[chunk][:, :int(lengths[chunk].max())]
                with autocast:
                    pred = raw_encoder(x).float()
                losses.append(loss_fn(pred, table[chunk], chunk, eval_rng) * len(chunk))
                preds.append(pred)
            pred = torch.cat(preds)
            out[f"{split}/loss"] = (sum(losses) / len(sample)).item()
            out[f"{split}/cosine"] = F.cosine_similarity(pred, table[sample], dim=1).mean().item()
            out[f"{split}/top1"] = top1_hits(pred, table, sample).float().mean().item()
        raw_encoder.train()
        return out

    def checkpoint_state():
        return {"model": raw_encoder.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "config": config, "data": data_info, "train_ids": train_ids, "val_ids": val_ids,
                "iter_num": iter_num, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "train_seconds": train_seconds, "negatives_rng": negatives_rng.get_state()}

    def log_eval(stats):
        tqdm.write(f"iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        if log_file:
            if device_type == "cuda":
                peak_mb = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record = {"iter": iter_num, "seconds": round(train_seconds, 2), "samples": samples_total,
                      "params": raw_encoder.num_params(), "peak_mb": round(peak_mb), **stats}
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def budget_used():
        return train_seconds / max_seconds if max_seconds > 0 else iter_num / max_iters

    bar = tqdm(total=100, initial=round(100 * budget_used()), unit="%", disable=not master, dynamic_ncols=True)
    start_iter = iter_num
    batches = batch_order(train_ids.to(lengths.device), lengths, epoch, batch_size * gradient_accumulation_steps, bucket_by_length)
    samples_seen, samples_total, window_start = 0, 0, time.time()
    next_timed_eval = eval_interval_seconds
    raw_encoder.train()
    while True:
        done = budget_used() >= 1.0 or iter_num >= max_iters
        if ddp and max_seconds > 0:
            # clocks differ between processes: rank 0's decides, or one would wait forever
            flag = torch.tensor([float(done)], device=dev)
            torch.distributed.broadcast(flag, 0)
            done = bool(flag.item())
        timed_eval = eval_interval_seconds > 0 and train_seconds >= next_timed_eval
        if master and (iter_num % eval_interval == 0 or timed_eval or done) and not (iter_num == start_iter and init_from == "resume"):
            while timed_eval and next_timed_eval <= train_seconds:
                next_timed_eval += eval_interval_seconds
            log_eval(evaluate())
            if iter_num > start_iter:
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), checkpoint_state())
        if done:
            break
        step_start = time.time()
        lr = get_lr(iter_num, budget_used())
        for group in optimizer.param_groups:
            group["lr"] = lr
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
            batches = batch_order(train_ids.to(lengths.device), lengths, epoch, batch_size * gradient_accumulation_steps, bucket_by_length)
        big_batch = batches[batch_in_epoch]
        batch_in_epoch += 1
        micro_batches = big_batch.split(batch_size)
        loss_sum = 0.0
        for micro, ids in enumerate(micro_batches):
            ids = ids[rank::world]
            width = int(lengths[ids].max()) if trim_batches else input_ids.shape[1]
            x = input_ids[ids][:, :width]
            sync = encoder.no_sync() if ddp and micro < len(micro_batches) - 1 else nullcontext()
            with sync:
                with autocast:
                    pred = encoder(x)
                loss = loss_fn(pred, table[ids], ids, negatives_rng) / len(micro_batches)
                loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            bar.close()  # or the sentence lands on the bar's line and the bar is drawn again after it
            raise UserError(f"the loss became {loss_sum} at iteration {iter_num}; the last good checkpoint is kept in {out_dir}, lower learning_rate and resume with --init_from=resume")
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_encoder.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        iter_num += 1
        train_seconds += time.time() - step_start
        samples_seen += len(big_batch)
        samples_total += len(big_batch)
        if master:
            bar.update(round(100 * budget_used()) - bar.n)
            if iter_num % 10 == 0:
                rate = samples_seen / (time.time() - window_start)
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.1e}", samples_s=f"{rate:.0f}")
                samples_seen, window_start = 0, time.time()
    bar.close()
    if master:
        if device_type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if ddp:
        destroy_process_group()


if __name__ == "__main__":
    run_main(main)
