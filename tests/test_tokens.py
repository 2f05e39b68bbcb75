"""
Token -> bytes on real tokenizers: Mistral-7B-v0.1's (SentencePiece BPE with byte fallback)
and SmolLM2's (GPT-2 byte-level BPE). The bytes of a text's tokens must spell the text.
"""
import pytest
import sentencepiece
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from soft_tokenizer.configurator import UserError
from soft_tokenizer.spelling import encode_bytes, token_bytes, tokenizer_kind
from soft_tokenizer.lm import mistral_tokenizer_model
from helpers import BYTE_A, TOKEN_A

TEXTS = [
    "Hello world",
    "Grüße aus Köln, naïve café: 東京は晴れ。Привет, мир! مرحبا بالعالم नमस्ते",
    "emoji 🤖🎉, a family 👩‍👩‍👧 and a flag 🇫🇷",
    "def f(x):\n    return {'a': x ** 2}  # ok\n\tindented\n",
    "  leading spaces,   runs\t\tof\n\n\nwhitespace   ",
]


@pytest.fixture(scope="module")
def mistral_bytes(mistral_tokenizer):
    return token_bytes(mistral_tokenizer)


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_tokenizer):
    return token_bytes(smollm2_tokenizer)


def spell(tokens, ids):
    return b"".join(tokens[i][0] for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_mistral_tokens_spell_the_text(mistral_tokenizer, mistral_bytes, text):
    tokens, kind = mistral_bytes
    assert kind == "sentencepiece"
    ids = mistral_tokenizer(text, add_special_tokens=False)["input_ids"]
    # SentencePiece's dummy prefix: the first word gets a "▁" as every later word does.
    # transformers' Metaspace(prepend_scheme="first") leaves it out when the text already
    # starts with a space
    expected = text if text.startswith(" ") else " " + text
    assert spell(tokens, ids) == expected.encode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_own_segmentation_spells_the_text(mistral_bytes, text):
    """The ids sentencepiece itself produces from tokenizer.model, always with the dummy prefix."""
    tokens, _ = mistral_bytes
    processor = sentencepiece.SentencePieceProcessor(model_file=mistral_tokenizer_model())
    assert spell(tokens, processor.encode(text)) == b" " + text.encode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_tokens_spell_the_text(smollm2_tokenizer, smollm2_bytes, text):
    tokens, kind = smollm2_bytes
    assert kind == "bytelevel"
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert spell(tokens, ids) == text.encode("utf-8")


def test_mistral_byte_fallback_and_duplicates(mistral_tokenizer, mistral_bytes):
    tokens, _ = mistral_bytes
    assert len(tokens) == 32000
    pieces = mistral_tokenizer.convert_ids_to_tokens(list(range(3, 259)))
    assert pieces == [f"<0x{b:02X}>" for b in range(256)]
    for b in range(256):
        data, flags = tokens[3 + b]
        assert data == bytes([b]) and "byte_fallback" in flags
    assert mistral_tokenizer.convert_ids_to_tokens(BYTE_A) == "<0x41>"
    assert mistral_tokenizer.convert_tokens_to_ids("A") == TOKEN_A
    assert tokens[BYTE_A] == (b"A", {"byte_fallback", "duplicate"})
    assert tokens[TOKEN_A] == (b"A", set())
    assert tokens[mistral_tokenizer.convert_tokens_to_ids("▁Hello")] == (b" Hello", set())
    # no byte of its own: the newline has no normal token, so <0x0A> is what the tokenizer emits
    assert tokens[3 + 0x0A] == (b"\n", {"byte_fallback"})
    assert [(data, flags) for data, flags in tokens[:3]] == [(b"<unk>", {"special"}), (b"<s>", {"special"}), (b"</s>", {"special"})]


@pytest.mark.parametrize("which", ["mistral_bytes", "smollm2_bytes"])
def test_each_spelling_has_one_owner(request, which):
    """Every byte string belongs to exactly one non-duplicate id; a duplicate never outranks
    its owner: the owner is a normal token if there is one, else the lowest id."""
    tokens, _ = request.getfixturevalue(which)
    owner = {}
    for i, (data, flags) in enumerate(tokens):
        if "duplicate" not in flags:
            assert data not in owner, f"ids {owner.get(data)} and {i} both own {data!r}"
            owner[data] = i

    def rank(i):
        return bool(tokens[i][1] - {"duplicate"}), i

    duplicates = [i for i, (_, flags) in enumerate(tokens) if "duplicate" in flags]
    for i in duplicates:
        assert rank(owner[tokens[i][0]]) < rank(i), (i, owner[tokens[i][0]])


def test_smollm2_specials_keep_their_text(smollm2_tokenizer, smollm2_bytes):
    tokens, _ = smollm2_bytes
    im_start = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokens[im_start] == (b"<|im_start|>", {"special"})
    # "Ġ" is GPT-2's printable stand-in for the space byte
    assert tokens[smollm2_tokenizer.convert_tokens_to_ids("Ġthe")] == (b" the", set())


def test_encode_bytes_layout():
    ids = encode_bytes([b"A", "é".encode(), b""], block_size=6)
    assert ids.dtype.name == "uint16" and ids.shape == (3, 6)
    assert ids.tolist() == [[256, 65, 257, 258, 258, 258], [256, 0xC3, 0xA9, 257, 258, 258], [256, 257, 258, 258, 258, 258]]
    # a longer token widens the block instead of being cut
    assert encode_bytes([b"x" * 9], block_size=6).shape == (1, 11)


def build_tokenizer(model, normalizer, pre_tokenizer, decoder, **special):
    backend = Tokenizer(model)
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizer, pre_tokenizer, decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_wordpiece_is_refused():
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    bert = build_tokenizer(models.WordPiece(vocab, unk_token="[UNK]"), normalizers.BertNormalizer(),
                           pre_tokenizers.BertPreTokenizer(), decoders.WordPiece(), unk_token="[UNK]")
    assert bert.tokenize("hello worlds") == ["hello", "world", "##s"]
    with pytest.raises(UserError, match="neither SentencePiece-style"):
        tokenizer_kind(bert)


def test_sentencepiece_without_byte_fallback_is_understood():
    """A Unigram tokenizer with only Metaspace's "▁" (T5-style, no <0xNN> tokens) is still SentencePiece."""
    pieces = [("<unk>", 0.0), ("▁hello", -1.0), ("▁world", -1.5), ("▁", -2.0), ("s", -3.0)]
    unigram = build_tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False), None,
                              pre_tokenizers.Metaspace(), decoders.Metaspace(), unk_token="<unk>")
    tokens, kind = token_bytes(unigram)
    assert kind == "sentencepiece"
    assert tokens[1] == (b" hello", set())
