"""
What lives on disk: the prepared data in data/<name>/ (written by prepare_mistral_data.py,
read by the others), the checkpoints of the two training stages, and atomic writes, so that
an interrupted run never leaves a half-written file. Every artifact says what it came from:
the data by a hash of its arrays, a checkpoint by an id of its own and its parent's.
"""
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import uuid
import zipfile
from types import SimpleNamespace

import numpy as np
import torch

from soft_tokenizer.configurator import UserError
from model import BYTE_VOCAB, ByteEncoder, ByteEncoderConfig

DATA_FILES = ("input_ids.npy", "embeddings.npy", "train_ids.npy", "val_ids.npy", "test_ids.npy", "text_counts.npy",
              "sample_ids.npy", "selection_ids.npy", "lm_share.npy")
# what each training stage writes in out_dir: train.py the regression, train_e2e.py the end-to-end stage from it
STAGE_FILES = {"regression": "ckpt.pt", "e2e": "e2e.pt"}


def model_name(model):
    """Short name of an LM: its data lives in data/<name>/."""
    return os.path.basename(os.path.normpath(model))


def data_dir(model):
    return os.path.join("data", model_name(model))


def split_vocabulary(usable, test_fraction, val_fraction, seed):
    """(train ids, val ids, test ids): the usable ids split deterministically from the seed.
    Neither the val nor the test ids are ever trained on. The val ids choose the checkpoint
    kept; the test ids (the held-out tokens) stand in for tokens the vocabulary never had,
    and, chosen by nothing, they are the new-token test."""
    usable = torch.as_tensor(usable, dtype=torch.int64)
    order = usable[torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))]
    n_test, n_val = int(round(test_fraction * len(usable))), int(round(val_fraction * len(usable)))
    parts = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return tuple(part.sort().values for part in (parts[2], parts[1], parts[0]))


def sha256(*arrays):
    """A hash of arrays' shapes, dtypes and bytes: what says two files hold the same data."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


def load_data(model):
    """data/<name>/ as a namespace: input_ids [V, block] int64, table [V, D] float32, meta,
    train_ids, val_ids and test_ids (the split), text_counts [V] (each token's count in the
    training text), and the LM's own text (lm.sample_windows): sample_ids [N, L] to train on,
    selection_ids [M, L] to choose on, lm_share [V] float64."""
    folder = data_dir(model)
    if not os.path.isfile(os.path.join(folder, "meta.json")):
        raise UserError(f"no prepared data in {folder}; run: python prepare_mistral_data.py --model={model}")
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        arrays = {name[:-4]: np.load(os.path.join(folder, name), allow_pickle=False) for name in DATA_FILES}
        vocab_size, dim, _ = meta["vocab_size"], meta["dim"], meta["data_sha256"]
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise UserError(f"the prepared data in {folder} is incomplete or corrupt ({type(e).__name__}); run again: python prepare_mistral_data.py --model={model}") from None
    input_ids, table = arrays["input_ids"], arrays["embeddings"]
    if (input_ids.ndim != 2 or input_ids.shape[0] != vocab_size or table.shape != (vocab_size, dim)
            or arrays["text_counts"].shape != (vocab_size,) or arrays["lm_share"].shape != (vocab_size,)
            or any(arrays[name].ndim != 2 or (arrays[name].size and not 0 <= arrays[name].min() <= arrays[name].max() < vocab_size)
                   for name in ("sample_ids", "selection_ids"))
            or input_ids.size == 0 or input_ids.max() >= BYTE_VOCAB):
        raise UserError(f"the prepared data in {folder} does not fit together (shapes or byte ids out of range); run again: python prepare_mistral_data.py --model={model}")
    return SimpleNamespace(input_ids=torch.from_numpy(input_ids.astype(np.int64)), table=torch.from_numpy(table.astype(np.float32)),
                           meta=meta, train_ids=torch.from_numpy(arrays["train_ids"]), val_ids=torch.from_numpy(arrays["val_ids"]),
                           test_ids=torch.from_numpy(arrays["test_ids"]),
                           text_counts=torch.from_numpy(arrays["text_counts"]), sample_ids=torch.from_numpy(arrays["sample_ids"]),
                           selection_ids=torch.from_numpy(arrays["selection_ids"]), lm_share=torch.from_numpy(arrays["lm_share"]), folder=folder)


def data_identity(data):
    """What a checkpoint must match to be used with this data: the table's model and shape, and
    the hash of every array prepare wrote (the table, the bytes, the split, the counts), or
    held-out numbers could include trained tokens."""
    return {"model": data.meta["model"], "vocab_size": data.meta["vocab_size"], "dim": data.meta["dim"],
            "data_sha256": data.meta["data_sha256"]}


def untrained_in(data):
    """The rows prepare's detector flagged untrained, as a [V] bool mask (on a tied table its
    verdict took the LM minutes, so it is read, not made again)."""
    return torch.tensor(["untrained" in t["flags"] for t in data.meta["tokens"]])


def check_lm_table(lm_table, data, model):
    """The LM loaded now must have the input table the data was prepared from (in the dtype it
    was loaded in), or every comparison with it is void."""
    vocab_size = data.meta["vocab_size"]
    if lm_table.shape[0] < vocab_size or lm_table.shape[1] != data.meta["dim"] or not torch.equal(
            lm_table[:vocab_size].detach().cpu(), data.table.to(lm_table.dtype)):
        raise UserError(f"the input table of {model} is not the one {data.folder} was prepared from (the folder or the hub "
                        f"revision changed); run: python prepare_mistral_data.py --model={model}, then train again")


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


def save_model_folder(lm, tokenizer, folder):
    """The model and its tokenizer as one folder stock transformers loads, written whole or not at all."""
    def write(tmp):
        os.remove(tmp)  # atomic_write made a file; the model needs a folder in its place
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    atomic_write(folder, write)


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
    """Write a checkpoint under an id of its own, which everything made from it records."""
    checkpoint["id"] = uuid.uuid4().hex
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return checkpoint["id"]


CHECKPOINT_KEYS = ("model", "model_args", "config", "data", "iter_num", "id", "stage")


def read_checkpoint(path, expect=None):
    """Load a checkpoint without running any code it may carry (weights_only). With expect
    (data_identity of the data, or just model, vocab_size and dim), refuse a checkpoint trained
    on another model's table or on other prepared data."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; run: python train.py (with the same config) first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
            raise UserError(f"checkpoint {path} was trained on other prepared data of {expect['model']} (another split, table or "
                            f"text); prepare the data again with the settings it was trained with, or train again")
    return checkpoint


def load_checkpoint(out_dir, expect=None, which="auto"):
    """The checkpoint of out_dir that `which` names: "regression" (train.py's ckpt.pt), "e2e"
    (train_e2e.py's e2e.pt), or "auto", the last stage that ran. An e2e.pt made from an earlier
    ckpt.pt than the one there now is refused: it belongs to another run."""
    if which not in ("auto", *STAGE_FILES):
        raise UserError(f"checkpoint={which!r} is not known; use auto, regression or e2e")
    e2e_path = os.path.join(out_dir, STAGE_FILES["e2e"])
    if which == "auto":
        which = "e2e" if os.path.isfile(e2e_path) else "regression"
    regression = read_checkpoint(os.path.join(out_dir, STAGE_FILES["regression"]), expect)
    if which == "regression":
        return regression
    checkpoint = read_checkpoint(e2e_path, expect)
    if checkpoint["e2e"]["parent"] != regression["id"]:
        raise UserError(f"{e2e_path} was trained from an earlier {out_dir}/ckpt.pt than the one there now; run train_e2e.py "
                        f"again (it replaces it) or pass --checkpoint=regression")
    return checkpoint


def checkpoint_source(checkpoint, out_dir):
    """What a predicted table or a report records of the checkpoint it came from."""
    return {"checkpoint": os.path.join(out_dir, STAGE_FILES[checkpoint["stage"]]), "checkpoint_id": checkpoint["id"],
            "stage": checkpoint["stage"], "iter_num": checkpoint["iter_num"], **checkpoint["data"]}


def load_encoder(checkpoint, device="cpu"):
    if "ngram_buckets" in checkpoint["model_args"]:
        raise UserError("this checkpoint's encoder has hashed n-grams, which solved n-gram vectors replaced (RESEARCH_LOG); train it again with train.py")
    try:
        encoder = ByteEncoder(ByteEncoderConfig(**checkpoint["model_args"]))
        encoder.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"the checkpoint's encoder does not match model.py ({str(e).splitlines()[0][:120]}); train again with this version") from None
    return encoder.to(device).eval()
