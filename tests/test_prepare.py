"""
prepare_mistral_data.py on the tiny Mistral (sharded checkpoint, real tokenizer) and on
the embedded SmolLM2, run as a user runs it.
"""
import json
import shutil

import numpy as np
import sentencepiece
from safetensors import safe_open

from soft_tokenizer.lm import mistral_tokenizer_model, resolve_model
from model import END, PAD, START
from helpers import BYTE_A, SMALL_SAMPLE, TOKEN_A, fails_with, files_under, run_in_process, run_script, succeeds


def load_prepared(folder):
    with open(folder / "meta.json") as f:
        meta = json.load(f)
    return np.load(folder / "input_ids.npy"), np.load(folder / "embeddings.npy"), meta


def test_table_is_the_checkpoints_embedding(tiny_mistral, prepared_mistral):
    _, table, meta = load_prepared(prepared_mistral.data)
    assert len(tiny_mistral.shards) >= 3
    assert meta["embedding_shard"] == tiny_mistral.embedding_shard
    assert table.dtype == np.float32 and table.shape == (32000, 64)
    assert np.array_equal(table, tiny_mistral.embedding)


def test_input_ids_spell_each_sentencepiece_piece(prepared_mistral):
    """Checked against the pieces of tokenizer.model itself, not against spelling.token_bytes."""
    input_ids, _, meta = load_prepared(prepared_mistral.data)
    processor = sentencepiece.SentencePieceProcessor(model_file=mistral_tokenizer_model())
    assert processor.get_piece_size() == 32000
    assert input_ids.dtype == np.uint16 and input_ids.shape == (32000, 50) and meta["block_size"] == 50
    longest = 0
    for i in range(32000):
        piece = processor.id_to_piece(i)
        if processor.is_byte(i):
            data = bytes([int(piece[3:5], 16)])
        elif processor.is_control(i) or processor.is_unknown(i):
            data = piece.encode()
        else:
            data = piece.replace("\u2581", " ").encode()
        row = input_ids[i]
        assert row[0] == START and row[len(data) + 1] == END, i
        assert bytes(row[1:len(data) + 1].astype(np.uint8)) == data and (row[1:len(data) + 1] < 256).all(), i
        assert (row[len(data) + 2:] == PAD).all(), i
        assert bytes.fromhex(meta["tokens"][i]["bytes"]) == data
        longest = max(longest, len(data))
    # the longest Mistral token is 25 bytes, so the block stays at the prototype's 50
    assert longest == 25


def test_meta_flags(tiny_mistral, prepared_mistral):
    _, table, meta = load_prepared(prepared_mistral.data)
    tokens = meta["tokens"]
    flagged = {flag: [t["id"] for t in tokens if flag in t["flags"]] for flag in ("special", "byte_fallback", "duplicate", "untrained")}
    assert meta["tokenizer_kind"] == "sentencepiece"
    assert (meta["vocab_size"], meta["dim"], meta["name"]) == (32000, 64, tiny_mistral.name)
    assert flagged["special"] == [0, 1, 2]
    assert flagged["byte_fallback"] == list(range(3, 259))
    # untrained is found from the table alone: exactly the rows the fixture zeroed or shrank
    assert flagged["untrained"] == tiny_mistral.untrained
    assert BYTE_A in flagged["duplicate"] and TOKEN_A not in flagged["duplicate"]
    assert meta["counts"] == {flag: len(ids) for flag, ids in flagged.items()}
    assert [t["id"] for t in tokens] == list(range(32000))
    assert tokens[TOKEN_A]["text"] == "A" and tokens[BYTE_A]["text"] == "A"
    np.testing.assert_allclose([t["norm"] for t in tokens], np.linalg.norm(table, axis=1), atol=1e-5)


def test_only_the_embedding_shard_is_read(tiny_mistral, tmp_path):
    """With every other shard gone (the index still names them), prepare without the LM's own
    text (which needs the whole LM) still works."""
    folder = tmp_path / "only-embedding-shard"
    shutil.copytree(tiny_mistral.folder, folder)
    for shard in tiny_mistral.shards:
        if shard != tiny_mistral.embedding_shard:
            (folder / shard).unlink()
    succeeds(run_script("prepare_mistral_data.py", f"--model={folder}", "--sample_windows_train=0", "--sample_windows_selection=0", cwd=tmp_path))
    _, table, meta = load_prepared(tmp_path / "data" / folder.name)
    assert np.array_equal(table, tiny_mistral.embedding)
    assert meta["embedding_shard"] == tiny_mistral.embedding_shard


def test_missing_embedding_shard_is_one_sentence(tiny_mistral, tmp_path):
    """The control for the test above: without the embedding's own shard it must fail."""
    folder = tmp_path / "no-embedding-shard"
    shutil.copytree(tiny_mistral.folder, folder)
    (folder / tiny_mistral.embedding_shard).unlink()
    proc = run_in_process("prepare_mistral_data.py", f"--model={folder}", cwd=tmp_path)
    fails_with(proc, tiny_mistral.embedding_shard)
    assert files_under(tmp_path / "data") == {}


def test_block_grows_for_longer_tokens(tmp_path):
    """SmolLM2's longest token is 81 bytes: the block becomes 83, nothing is cut."""
    succeeds(run_script("prepare_mistral_data.py", "--model=smollm2", *SMALL_SAMPLE, cwd=tmp_path))
    input_ids, table, meta = load_prepared(tmp_path / "data" / "smollm2")
    lengths = (input_ids != PAD).sum(1) - 2
    assert lengths.max() == 81 and input_ids.shape == (49152, 83) and meta["block_size"] == 83
    assert meta["tokenizer_kind"] == "bytelevel" and table.shape == (49152, 576)
    longest = int(lengths.argmax())
    assert input_ids[longest, 82] == END and bytes(input_ids[longest, 1:82].astype(np.uint8)) == bytes.fromhex(meta["tokens"][longest]["bytes"])
    folder, _ = resolve_model("smollm2")
    with safe_open(str(folder) + "/model.safetensors", "np") as f:
        assert np.array_equal(table, f.get_tensor("model.embed_tokens.weight").astype(np.float32))


def test_prepare_writes_the_split_and_text_counts(tiny_mistral, prepared_mistral, mistral_tokenizer):
    """The split is a property of the data: disjoint, every usable id in exactly one part,
    untrained and duplicate rows in none; the counts are the training text's own."""
    from soft_tokenizer.lm import training_text
    data = prepared_mistral.data
    train_ids, val_ids, test_ids = (set(np.load(data / f"{part}_ids.npy").tolist()) for part in ("train", "val", "test"))
    _, _, meta = load_prepared(data)
    usable = {t["id"] for t in meta["tokens"] if not {"untrained", "duplicate"} & set(t["flags"])}
    assert not train_ids & test_ids and not train_ids & val_ids and not val_ids & test_ids
    assert train_ids | val_ids | test_ids == usable
    assert len(test_ids) == round(0.05 * len(usable)) and len(val_ids) == round(0.02 * len(usable))
    assert (meta["train_tokens"], meta["val_tokens"], meta["test_tokens"]) == (len(train_ids), len(val_ids), len(test_ids))
    assert not (set(tiny_mistral.untrained) | {BYTE_A}) & usable and TOKEN_A in usable
    counts = np.load(data / "text_counts.npy")
    ids = mistral_tokenizer(training_text(), add_special_tokens=False)["input_ids"]
    assert counts.shape == (32000,) and counts.sum() == len(ids) == meta["training_text_tokens"]
    assert counts[mistral_tokenizer.convert_tokens_to_ids("▁the")] == ids.count(mistral_tokenizer.convert_tokens_to_ids("▁the")) > 100


def test_the_lms_own_text_is_what_it_samples(tiny_mistral, prepared_mistral):
    """sample_windows with its KV cache computes what one full forward pass over the windows
    does: its share is the mean next-token distribution at every position that was sampled
    from, the same seed gives the same text, and prepare stores training and selection windows
    of it, BOS-led like every window the LM reads."""
    import torch
    from soft_tokenizer.lm import load_lm, sample_windows
    lm, tokenizer = load_lm(tiny_mistral.folder)
    windows, share = sample_windows(lm, tokenizer, 5, 12, seed=3, batch=2)
    assert windows.shape == (5, 12) and (windows[:, 0] == tokenizer.bos_token_id).all()
    with torch.no_grad():
        expected = lm(windows).logits[:, :-1, :len(tokenizer)].double().softmax(-1).mean((0, 1))
    torch.testing.assert_close(share, expected / expected.sum(), rtol=1e-4, atol=1e-12)
    assert torch.equal(sample_windows(lm, tokenizer, 5, 12, seed=3, batch=2)[0], windows)
    assert not torch.equal(sample_windows(lm, tokenizer, 5, 12, seed=4)[0], windows)
    data, meta = prepared_mistral.data, load_prepared(prepared_mistral.data)[2]
    sample_ids, selection_ids, lm_share = (np.load(data / f"{name}.npy") for name in ("sample_ids", "selection_ids", "lm_share"))
    assert sample_ids.shape == (meta["sample_windows_train"], meta["sample_length"]) == (4, 64)
    assert selection_ids.shape == (2, 64) and (sample_ids[:, 0] == 1).all() and (selection_ids[:, 0] == 1).all()
    assert lm_share.shape == (32000,) and abs(lm_share.sum() - 1) < 1e-9 and (lm_share > 0).all()
