"""
Llama 3 as its users meet it. The real tokenizer: the tiktoken ranks Meta ships (llama-models'
llama3/tokenizer.model), made into the tokenizer.json folder the hub's Llama 3 repositories
carry, with the 256 special tokens after the 128,000 ranks (lm.save_llama3_tokenizer, which
also gives transfer.py its tokenizer=llama3). Around it a tiny random
LlamaForCausalLM with all 128,256 rows, untied, in safetensors shards. As in the base
Llama-3-8B, the rows of 254 of the 256 special tokens (the chat markers among them) are zero
or near 1e-21 on both sides; only <|begin_of_text|> and <|end_of_text|> were trained. The other
input rows follow the spelling (helpers.spelled_rows), so an encoder can learn them.
Every script runs on it as a user runs them; detect finds exactly the 254 rows and repair fills them.
"""
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from soft_tokenizer import lm as lm_module
from soft_tokenizer.lm import load_tokenizer, save_llama3_tokenizer, tokenizer_folder, training_text
from soft_tokenizer.spelling import token_bytes, untrained_rows
from helpers import SMALL_SAMPLE, SPELLING_ENCODER, assert_own_table_changes_nothing, first_windows, generates, run_in_process, spelled_rows, stock_load, succeeds

VOCAB, RANKS = 128256, 128000
TRAINED_SPECIALS = [128000, 128001]  # <|begin_of_text|>, <|end_of_text|>
UNTRAINED = list(range(128002, VOCAB))
CHAT_MARKERS = {"<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}


@pytest.fixture(scope="module")
def reference():
    """llama-models' own tokenizer (tiktoken): the ranks, the special tokens, the split pattern."""
    if importlib.util.find_spec("llama_models") is None or importlib.util.find_spec("tiktoken") is None:
        pytest.fail("llama-models and tiktoken are not installed; run: make install")
    from llama_models.llama3.tokenizer import Tokenizer
    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def tiny_llama3(reference, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("models") / "tiny-llama3"
    save_llama3_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    tokens, _ = token_bytes(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=reference.bos_id, eos_token_id=reference.eos_id)
    lm = LlamaForCausalLM(config)
    table, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    with torch.no_grad():
        table[:] = spelled_rows([data for data, _ in tokens], config.hidden_size, seed=0)
        for rows in (table, head):
            rows[UNTRAINED] = 1e-21 * torch.randn(len(UNTRAINED), config.hidden_size)
            rows[UNTRAINED[::3]] = 0.0
    # each table (V x 64 float32, 33 MB) gets a shard of its own
    lm.save_pretrained(folder, max_shard_size="40MB")
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 2
    return SimpleNamespace(folder=folder, tokens=tokens, table=table.detach().clone(), head=head.detach().clone())


@pytest.fixture(scope="module")
def pipeline(tiny_llama3, workdir):
    """prepare -> train -> evaluate -> test_mistral, as a user runs them."""
    model, out_dir = f"--model={tiny_llama3.folder}", workdir / "out-llama3"
    # in this process, as a user's runs but without the seconds each new Python spends importing torch
    runs = {"prepare": succeeds(run_in_process("prepare_mistral_data.py", model, *SMALL_SAMPLE, cwd=workdir)),
            "train": succeeds(run_in_process("train.py", model, f"--out_dir={out_dir}", *SPELLING_ENCODER, cwd=workdir)),
            # top-1 on 4,096 rows: on all 128,256 it is a minute of V x V x D work no test reads
            "evaluate": succeeds(run_in_process("evaluate.py", model, f"--out_dir={out_dir}", "--top1_rows=4096", cwd=workdir)),
            "splice": succeeds(run_in_process("test_mistral.py", model, f"--out_dir={out_dir}", "--eval_tokens=256", "--context=128",
                                              "--max_new_tokens=5", cwd=workdir))}
    return SimpleNamespace(runs=runs, out_dir=out_dir, data=workdir / "data" / tiny_llama3.folder.name)


@pytest.fixture(scope="module")
def repaired(tiny_llama3, pipeline, workdir):
    save = workdir / "llama3-repaired"
    proc = succeeds(run_in_process("tokens.py", "repair", f"--model={tiny_llama3.folder}", f"--out_dir={pipeline.out_dir}",
                                   "--method=soft", f"--save={save}", cwd=workdir))
    return SimpleNamespace(folder=save, stdout=proc.stdout)


def test_every_token_has_the_bytes_of_its_rank(reference, tiny_llama3):
    tokens = tiny_llama3.tokens
    assert len(tokens) == VOCAB
    assert all(tokens[i][0] == reference.model.decode_single_token_bytes(i) for i in range(RANKS))
    assert [i for i, (_, flags) in enumerate(tokens) if flags] == list(range(RANKS, VOCAB))
    assert all(tokens[i] == (name.encode(), {"special"}) for name, i in reference.special_tokens.items())


def test_a_real_texts_tokens_concatenate_to_its_bytes(reference, tiny_llama3):
    tokenizer = load_tokenizer(tiny_llama3.folder)
    text = training_text()[:20000] + "\nGrüße aus Köln! naïve café, 東京, Ελληνικά, 🤖🦙\r\n\ttabs  and   spaces 12345678"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # the converted tokenizer splits text as Meta's own does
    assert ids == reference.encode(text, bos=False, eos=False)
    assert b"".join(tiny_llama3.tokens[i][0] for i in ids) == text.encode("utf-8")
    assert tokenizer(text)["input_ids"] == [reference.bos_id] + ids


def test_pipeline_runs_and_flags_the_reserved_rows(tiny_llama3, pipeline):
    meta = json.loads((pipeline.data / "meta.json").read_text())
    assert (meta["vocab_size"], meta["dim"], meta["tokenizer_kind"]) == (VOCAB, 64, "bytelevel")
    assert meta["counts"] == {"special": 256, "byte_fallback": 0, "duplicate": 0, "untrained": 254}
    untrained = [t["id"] for t in meta["tokens"] if "untrained" in t["flags"]]
    assert untrained == UNTRAINED
    assert meta["tokens"][128009]["text"] == "<|eot_id|>"
    evaluation = json.loads((pipeline.out_dir / "eval.json").read_text())
    assert evaluation["vocab_size"] == VOCAB
    splice = json.loads((pipeline.out_dir / "splice.json").read_text())
    # the France prompt went through the chat template, and both evaluation texts were scored
    assert splice["chat_template"] and len(splice["ratio"]) == 2
    assert all(ratio > 0 for ratio in splice["ratio"].values())


def test_its_own_table_changes_nothing(tiny_llama3):
    """The identity splice (tests/test_identity.py) on Llama 3's 128,256-row table."""
    from transformers import AutoModelForCausalLM
    from soft_tokenizer.lm import load_tokenizer
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama3.folder, dtype=torch.float32)
    assert_own_table_changes_nothing(lm, first_windows(load_tokenizer(tiny_llama3.folder)))


def test_detect_lists_exactly_the_untrained_rows(tiny_llama3, workdir):
    proc = succeeds(run_in_process("tokens.py", "detect", f"--model={tiny_llama3.folder}", cwd=workdir))
    listed = [int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+\d+\.\d+\s", proc.stdout, re.M)]
    assert listed == UNTRAINED
    assert f"254 of {VOCAB} input rows untrained" in proc.stdout
    assert re.search(r"^\s+128009\s+0\.000000\s+<\|eot_id\|>\s+special$", proc.stdout, re.M)


def test_repair_fills_both_sides_from_the_spelling(tiny_llama3, repaired):
    shards = sorted(repaired.folder.glob("*.safetensors"))
    weights = {k: v for shard in shards for k, v in load_file(shard).items()}
    table, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    assert table.shape == head.shape == (VOCAB, 64)
    assert not untrained_rows(table).any()
    trained = torch.ones(VOCAB, dtype=torch.bool)
    trained[UNTRAINED] = False
    assert torch.equal(table[trained], tiny_llama3.table[trained]) and torch.equal(head[trained], tiny_llama3.head[trained])
    # output rows: the trained output rows' mean (near zero here, as the head is random: the
    # average logit); input rows: what the bytes say, closer to the spelling's own row than
    # the mean row is (the reserved tokens differ in a digit or two, so the mean row, made of
    # common bytes, is not far either; measured 0.81 against 0.68)
    assert torch.allclose(head[UNTRAINED], tiny_llama3.head[trained].mean(0).expand(len(UNTRAINED), -1), atol=1e-6)
    spelling = spelled_rows([tiny_llama3.tokens[i][0] for i in range(VOCAB)], 64, seed=0, noise=0.0)[UNTRAINED]
    soft = F.cosine_similarity(table[UNTRAINED], spelling, dim=1).mean().item()
    mean = F.cosine_similarity(tiny_llama3.table[trained].mean(0).expand(len(UNTRAINED), -1), spelling, dim=1).mean().item()
    assert soft > 0.75 and soft > mean + 0.1, (soft, mean)
    assert "filled 254 untrained input rows by soft and 254 untrained output rows" in repaired.stdout


def test_repaired_folder_loads_chats_and_keeps_the_markers_single(repaired):
    lm, tokenizer = stock_load(repaired.folder)
    assert lm.get_output_embeddings().weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()
    for marker, token_id in CHAT_MARKERS.items():
        assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [token_id]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
    ids = chat["input_ids"][0].tolist()
    assert tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert [ids.count(i) for i in CHAT_MARKERS.values()] == [2, 2, 1] and ids[0] == 128000
    generates(lm, tokenizer, chat)


def test_the_named_tokenizer_is_made_once_in_the_cache(reference, monkeypatch, tmp_path):
    """transfer.py --tokenizer=llama3: the folder is made in the cache on first use, then reused."""
    monkeypatch.setattr(lm_module, "CACHE_DIR", str(tmp_path))
    folder = tokenizer_folder("llama3")
    made = Path(folder, "tokenizer.json").stat().st_mtime_ns
    text = "def transfer(tokens):\n    return {t: 'é東京' for t in tokens}"
    assert load_tokenizer(folder)(text)["input_ids"] == reference.encode(text, bos=True, eos=False)
    assert tokenizer_folder("llama3") == folder and Path(folder, "tokenizer.json").stat().st_mtime_ns == made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer-llama3"]  # no staging folder left behind
