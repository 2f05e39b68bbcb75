"""
The predicted table and the splice. evaluate.py predicts every row of a checkpoint and writes
out_dir/new_embeddings.safetensors with what it came from (the checkpoint's id, the data's
hash); test_mistral.py and tokens.py read it back through read_predicted_table, which refuses
a table that another checkpoint or other data made, and put rows into the LM through
splice_rows, the one splice.
"""
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from soft_tokenizer.configurator import UserError
from soft_tokenizer.lm import untie_head
from soft_tokenizer.storage import atomic_write, checkpoint_source

PREDICTED_FILE = "new_embeddings.safetensors"


def write_predicted_table(out_dir, rows, checkpoint):
    source = {k: str(v) for k, v in checkpoint_source(checkpoint, out_dir).items()}
    atomic_write(os.path.join(out_dir, PREDICTED_FILE), lambda tmp: save_file({"embeddings": rows.contiguous()}, tmp, metadata=source))


def read_predicted_table(out_dir, checkpoint):
    """The table evaluate.py predicted from `checkpoint` (the one load_checkpoint gives for this
    data), or one sentence on why the file there is not it."""
    path = os.path.join(out_dir, PREDICTED_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no {path}; run: python evaluate.py (with the same config) first")
    try:
        with safe_open(path, "pt") as f:
            source, rows = f.metadata() or {}, f.get_tensor("embeddings") if "embeddings" in f.keys() else None
    except (SafetensorError, OSError):
        raise UserError(f"{path} is not a readable safetensors file; rerun evaluate.py to write it again") from None
    expected = {k: str(v) for k, v in checkpoint_source(checkpoint, out_dir).items()}
    if rows is None or rows.ndim != 2 or rows.shape != (checkpoint["data"]["vocab_size"], checkpoint["data"]["dim"]):
        raise UserError(f"{path} has no {checkpoint['data']['vocab_size']}x{checkpoint['data']['dim']} tensor named 'embeddings' "
                        f"(it was made for another model, or is damaged); rerun evaluate.py with this model's config")
    if source.get("checkpoint_id") != expected["checkpoint_id"] or source.get("data_sha256") != expected["data_sha256"]:
        made_from = f"{source['checkpoint']} at iteration {source['iter_num']}" if "checkpoint" in source else "an unrecorded checkpoint"
        raise UserError(f"{path} was predicted from {made_from}, not from {expected['checkpoint']} as it is now "
                        f"(iteration {expected['iter_num']}); rerun evaluate.py (with the same config) to predict it again")
    return rows, source


def splice_rows(lm, rows, ids=None):
    """Put rows into the LM's input table: rows [V, D] for its first V ids, or rows [len(ids), D]
    for `ids`. A tied head first gets a copy of its own, so the output side stays as the LM
    trained it. Returns the original input rows that were replaced, to put back."""
    untie_head(lm)
    weight = lm.get_input_embeddings().weight
    where = torch.arange(len(rows), device=weight.device) if ids is None else ids.to(weight.device)
    with torch.no_grad():
        replaced = weight[where].clone()
        weight[where] = rows.to(weight.device, weight.dtype)
    return replaced
