"""
Shared fixtures. The "tiny Mistral" is Mistral-7B-v0.1's real tokenizer (shipped in
mistral-common) on a randomly initialised 2-layer MistralForCausalLM, saved as a sharded
safetensors checkpoint the way the hub stores the real one.
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# before anything imports huggingface_hub, which reads it once: scripts run in-process are offline too
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

from helpers import REPO, SHRUNK, SMALL_SAMPLE, TINY_TRAIN, ZEROED, run_script, succeeds

sys.path.insert(0, str(REPO))  # the package soft_tokenizer and model.py live at the repository root

from soft_tokenizer.lm import save_mistral_tokenizer  # noqa: E402  (after the path is set)


def save_tiny_mistral(folder, hidden, seed):
    """A random MistralForCausalLM on the real tokenizer, several safetensors shards, some
    input rows untrained. Returns what the tests compare against."""
    from transformers import MistralConfig, MistralForCausalLM
    tokenizer = save_mistral_tokenizer(folder)
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    lm = MistralForCausalLM(config)
    with torch.no_grad():
        table = lm.get_input_embeddings().weight
        table[ZEROED] = 0.0
        table[SHRUNK] *= 1e-3
    # each table (V x hidden float32) is bigger than a shard, so it gets a shard of its own
    lm.save_pretrained(folder, max_shard_size=f"{hidden * config.vocab_size * 2 // 1000}KB")
    with open(Path(folder) / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    return SimpleNamespace(folder=Path(folder), name=Path(folder).name, embedding=table.detach().numpy().copy(),
                           untrained=sorted(ZEROED + SHRUNK), shards=sorted(set(weight_map.values())),
                           embedding_shard=weight_map["model.embed_tokens.weight"])


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    return save_tiny_mistral(tmp_path_factory.mktemp("models") / "tiny-mistral", hidden=64, seed=0)


@pytest.fixture(scope="session")
def narrow_mistral(tmp_path_factory):
    """Another model on the same tokenizer with a narrower table, to mismatch checkpoints."""
    return save_tiny_mistral(tmp_path_factory.mktemp("models") / "tiny-mistral-narrow", hidden=32, seed=1)


@pytest.fixture(scope="session")
def mistral_tokenizer(tiny_mistral):
    from soft_tokenizer.lm import load_tokenizer
    return load_tokenizer(tiny_mistral.folder)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from soft_tokenizer.lm import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model("smollm2")[0])


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """The folder the scripts run in; data/<model name>/ is created below it."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def prepared_mistral(tiny_mistral, workdir):
    proc = succeeds(run_script("prepare_mistral_data.py", f"--model={tiny_mistral.folder}", *SMALL_SAMPLE, cwd=workdir))
    return SimpleNamespace(proc=proc, data=workdir / "data" / tiny_mistral.name)


@pytest.fixture(scope="session")
def prepared_narrow(narrow_mistral, workdir):
    succeeds(run_script("prepare_mistral_data.py", f"--model={narrow_mistral.folder}", *SMALL_SAMPLE, cwd=workdir))
    return workdir / "data" / narrow_mistral.name


@pytest.fixture(scope="session")
def trained_mistral(tiny_mistral, prepared_mistral, workdir):
    """A checkpoint of a tiny encoder trained for 20 iterations on the tiny Mistral's table."""
    out_dir = workdir / "out-tiny"
    proc = succeeds(run_script("train.py", f"--model={tiny_mistral.folder}", f"--out_dir={out_dir}", *TINY_TRAIN,
                               "--max_iters=20", "--eval_interval=10", cwd=workdir))
    return SimpleNamespace(proc=proc, out_dir=out_dir)


@pytest.fixture(scope="session")
def evaluated_mistral(tiny_mistral, trained_mistral, workdir):
    proc = succeeds(run_script("evaluate.py", f"--model={tiny_mistral.folder}", f"--out_dir={trained_mistral.out_dir}", cwd=workdir))
    return SimpleNamespace(proc=proc, out_dir=trained_mistral.out_dir)
