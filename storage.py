"""
What lives on disk: the prepared data in data/<name>/ (written by prepare_mistral_data.py,
read by the others), checkpoints, and atomic writes, so that an interrupted run never leaves
a half-written file.
"""
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from types import SimpleNamespace

import numpy as np
import torch

from configurator import UserError
from model import BYTE_VOCAB, ByteEncoder, ByteEncoderConfig

DATA_FILES = ("input_ids.npy", "embeddings.npy", "train_ids.npy", "val_ids.npy", "text_counts.npy")


def model_name(model):
    """Short name of an LM: its data lives in data/<name>/."""
    return os.path.basename(os.path.normpath(model))


def data_dir(model):
    return os.path.join("data", model_name(model))


def split_vocabulary(usable, val_fraction, seed):
    """(train ids, held-out ids): the usable ids split deterministically from the seed. The
    held-out ids are never trained on; they stand in for tokens the vocabulary never had."""
    usable = torch.as_tensor(usable, dtype=torch.int64)
    order = usable[torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))]
    n_val = int(round(val_fraction * len(usable)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def load_data(model):
    """data/<name>/ as a namespace: input_ids [V, block] int64, table [V, D] float32, meta,
    train_ids and val_ids (the split), text_counts [V] (each token's count in the training text),
    fisher [D, D] or None."""
    folder = data_dir(model)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise UserError(f"no prepared data in {folder}; run: python prepare_mistral_data.py --model={model}")
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        arrays = {name[:-4]: np.load(os.path.join(folder, name), allow_pickle=False) for name in DATA_FILES}
        vocab_size, dim = meta["vocab_size"], meta["dim"]
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise UserError(f"the prepared data in {folder} is incomplete or corrupt ({type(e).__name__}); run again: python prepare_mistral_data.py --model={model}") from None
    input_ids, table = arrays["input_ids"], arrays["embeddings"]
    if (input_ids.ndim != 2 or input_ids.shape[0] != vocab_size or table.shape != (vocab_size, dim)
            or arrays["text_counts"].shape != (vocab_size,) or input_ids.size == 0 or input_ids.max() >= BYTE_VOCAB):
        raise UserError(f"the prepared data in {folder} does not fit together (shapes or byte ids out of range); run again: python prepare_mistral_data.py --model={model}")
    fisher_file = os.path.join(folder, "fisher.npy")
    fisher = torch.from_numpy(np.load(fisher_file, allow_pickle=False)) if os.path.isfile(fisher_file) else None
    if fisher is not None and fisher.shape != (dim, dim):
        raise UserError(f"{fisher_file} is not {dim}x{dim}; run again: python prepare_mistral_data.py --model={model} --fisher_tokens=N")
    return SimpleNamespace(input_ids=torch.from_numpy(input_ids.astype(np.int64)), table=torch.from_numpy(table.astype(np.float32)), fisher=fisher,
                           meta=meta, train_ids=torch.from_numpy(arrays["train_ids"]), val_ids=torch.from_numpy(arrays["val_ids"]),
                           text_counts=torch.from_numpy(arrays["text_counts"]), folder=folder)


def data_identity(data):
    """What a checkpoint must match to be used with this data: the table's model and shape,
    and the split (or held-out numbers would include trained tokens)."""
    return {"model": data.meta["model"], "vocab_size": data.meta["vocab_size"], "dim": data.meta["dim"],
            "val_ids_sum": int(data.val_ids.sum()), "n_val": len(data.val_ids)}


def atomic_write(path, write):
    """write(tmp_path) then rename, so an interrupted run never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_file(path, text):
    """Atomically write a text file, closed (and so flushed) before it is renamed into place."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def check_writable(folder):
    """Fail before the work, not after it, when results could not be saved."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); pass a writable --out_dir") from None


def claim_out_dir(out_dir):
    """One training run per out_dir: an exclusive lock held until the process ends, so a second
    run on the same folder stops at once instead of racing the first for ckpt.pt. Temporary
    files a killed run left behind are removed, as nobody else can be writing them now."""
    import fcntl
    check_writable(out_dir)
    lock = open(os.path.join(out_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"another run is training in {out_dir}; wait for it or pass another --out_dir") from None
    for name in os.listdir(out_dir):
        if name.startswith("tmp-"):
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return lock


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


CHECKPOINT_KEYS = ("model", "model_args", "config", "data", "iter_num")


def load_checkpoint(out_dir, expect=None):
    """Load out_dir/ckpt.pt without running any code it may carry (weights_only). With expect
    (data_identity of the data, or just model, vocab_size and dim), refuse a checkpoint trained
    on another model's table or on another train / held-out split."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; run: python train.py (with the same config) first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a checkpoint this repo can read ({type(e).__name__}); it may be truncated, "
                        f"corrupt, or carry code, which is never run: train again or use another --out_dir") from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} lacks what train.py writes ({', '.join(CHECKPOINT_KEYS)}); train again or use another --out_dir")
    if expect is not None:
        trained = checkpoint["data"]
        if any(trained.get(k) != expect[k] for k in ("model", "vocab_size", "dim")):
            raise UserError(f"checkpoint {path} was trained on {trained.get('model')} ({trained.get('vocab_size')}x{trained.get('dim')}) but this is "
                            f"{expect['model']} ({expect['vocab_size']}x{expect['dim']}); pass the matching --model or --out_dir")
        if any(trained.get(k) != v for k, v in expect.items()):
            raise UserError(f"checkpoint {path} was trained on another train / held-out split of {expect['model']}; "
                            f"prepare the data again with the val_fraction and seed it was trained with, or train again")
    return checkpoint


def load_encoder(checkpoint, device="cpu"):
    try:
        encoder = ByteEncoder(ByteEncoderConfig(**checkpoint["model_args"]))
        encoder.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"the checkpoint's encoder does not match model.py ({str(e).splitlines()[0][:120]}); train again with this version") from None
    return encoder.to(device).eval()
