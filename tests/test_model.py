"""
The encoder's promises, in-process: it does not care how much padding follows a token
(batches are trimmed to their longest token in training but padded to the full block
elsewhere), with or without the solved n-gram vectors of the default recipe; a whole-token
vector never reaches another string; the softmax term's hub negatives are the rows along the mean row.
"""
import pytest
import torch

from model import END, PAD, START, ByteEncoder, ByteEncoderConfig, hub_ids, ngram_codes, softmax_negative_ids, trim_padding
from soft_tokenizer.ngrams import ngram_vocabulary
from soft_tokenizer.spelling import encode_bytes

WORDS = ["A", " the", "é", " Hello", "🤖", "def", "\n", " internationalization", "東京"]


def solved_encoder(spellings, **config):
    """An encoder whose n-gram vectors are random but nonzero, as solved ones are, for the
    n-grams of `spellings`, and whose transformer's head is random too."""
    torch.manual_seed(0)
    keys = ngram_vocabulary(torch.from_numpy(encode_bytes(spellings).astype("int64")), 4, 3)
    encoder = ByteEncoder(ByteEncoderConfig(ngram_max=4, ngram_whole_max=3, ngram_count=len(keys), **config), sparse_ngrams=False).eval()
    with torch.no_grad():
        encoder.ngram_keys.copy_(keys)
        # as large as what the random transformer adds, so that neither hides the other
        encoder.ngram.weight[:-1] = 0.05 * torch.randn(len(keys), config["n_out"])
        for p in encoder.head[-1].parameters():
            p.normal_(0, 0.02)
    return encoder


@pytest.fixture(scope="module", params=[0, 4], ids=["no-ngrams", "ngrams-4"])
def encoder(request):
    config = dict(block_size=64, n_layer=2, n_head=4, n_embd=64, n_out=48, head_hidden=96)
    if request.param:
        return solved_encoder([w.encode() for w in WORDS], **config)
    torch.manual_seed(0)
    return ByteEncoder(ByteEncoderConfig(**config)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.from_numpy(encode_bytes([w.encode() for w in WORDS]).astype("int64"))


@torch.no_grad()
def test_padding_width_does_not_change_the_output(encoder, tokens):
    tight = encoder(tokens)[0]
    for width in (tokens.shape[1] + 1, 50, 64):
        padded = torch.full((len(tokens), width), PAD)
        padded[:, :tokens.shape[1]] = tokens
        torch.testing.assert_close(encoder(padded)[0], tight, rtol=1e-5, atol=1e-6)
    # one token alone, trimmed to its own length, as in a batch of tokens as long as it
    for row, word in enumerate(WORDS):
        alone = tokens[row:row + 1, :len(word.encode()) + 2]
        torch.testing.assert_close(encoder(alone)[0], tight[row:row + 1], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_what_pad_positions_carry_cannot_reach_the_output(encoder, tokens):
    """Pad positions still get a byte vector and a position vector; no token may read them."""
    padded = torch.full((len(tokens), 64), PAD)
    padded[:, :tokens.shape[1]] = tokens
    before = encoder(padded)[0]
    altered = ByteEncoder(encoder.config, sparse_ngrams=False).eval()
    altered.load_state_dict(encoder.state_dict())
    longest = tokens.shape[1]
    altered.wte.weight[PAD] = 100 * torch.randn(encoder.config.n_embd)
    altered.wpe.weight[longest:] = 100 * torch.randn(64 - longest, encoder.config.n_embd)
    torch.testing.assert_close(altered(padded)[0], before, rtol=1e-5, atol=1e-6)
    # the same change to a position real bytes use does reach the output: the check can fail
    altered.wpe.weight[1] = 100 * torch.randn(encoder.config.n_embd)
    transformer_part = before - (encoder.ngram(encoder.ngram_rows(padded)) if encoder.config.ngram_max else 0)
    assert (altered(padded)[0] - before).abs().max() > 0.1 * transformer_part.abs().max()


def test_trim_padding_cuts_to_the_longest_token(tokens):
    padded = torch.full((len(tokens), 64), PAD)
    padded[:, :tokens.shape[1]] = tokens
    assert torch.equal(trim_padding(padded), tokens)
    assert trim_padding(padded[:1]).shape == (1, len(WORDS[0].encode()) + 2)


@torch.no_grad()
def test_a_whole_token_vector_never_reaches_another_string():
    """The honesty claim of the encoder: a token of at most ngram_whole_max bytes has a vector of
    its own, which no other string can have, so a string never trained on is read from its
    parts. Make the whole-token vectors huge: "abcd" and "xabc" must not move; "abc" must."""
    encoder = solved_encoder([b"abc", b"ab", b"bcd"], block_size=16, n_layer=1, n_head=2, n_embd=32, n_out=16, head_hidden=32)
    strings = torch.from_numpy(encode_bytes([b"abcd", b"xabc", b"abc"], 16).astype("int64"))
    before = encoder(strings)[0]
    trained = torch.from_numpy(encode_bytes([b"abc", b"ab"], 16).astype("int64"))
    whole = encoder.ngram_rows(trained)[ngram_codes(trained, 4, 3)[1]]
    assert len(whole) == 2
    encoder.ngram.weight[whole] = 1000 * torch.randn(2, 16)
    after = encoder(strings)[0]
    torch.testing.assert_close(after[:2], before[:2])
    assert (after[2] - before[2]).abs().max() > 100


def test_hub_negatives_are_the_rows_along_the_mean_row_and_always_among_the_negatives():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 16, generator=g)
    table[[7, 500, 901]] += 5 * torch.randn(16, generator=g).abs()  # three long rows along a shared direction
    table[:, :] += 0.5
    hubs = hub_ids(table, 3)
    assert set(hubs.tolist()) == {7, 500, 901}
    negatives = softmax_negative_ids(len(table), 64, hubs, torch.Generator().manual_seed(1))
    assert len(negatives) == 67 and set(negatives[:3].tolist()) == {7, 500, 901}
    again = softmax_negative_ids(len(table), 64, hubs, torch.Generator().manual_seed(1))
    assert torch.equal(negatives, again) and not torch.equal(negatives, softmax_negative_ids(len(table), 64, hubs, g))
    assert torch.equal(softmax_negative_ids(len(table), 0, hubs, g), torch.arange(1000))


def test_the_loss_is_the_same_in_any_units_of_the_table():
    """row_scale: the same rows and table in units s times as long give the same loss (L1, MSE
    and the softmax with its negatives), so one recipe's weights and temperature serve every LM."""
    from model import LossConfig
    torch.manual_seed(0)
    config = ByteEncoderConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, n_out=24, head_hidden=48)
    unit = ByteEncoder(config)
    scaled = ByteEncoder(ByteEncoderConfig(**{**config.__dict__, "row_scale": 3.25}))
    scaled.load_state_dict(unit.state_dict())
    with torch.no_grad():  # the same encoder, its rows 3.25 times as long
        scaled.head[-1].weight.mul_(3.25)
        scaled.head[-1].bias.copy_(torch.randn(24))
        unit.head[-1].bias.copy_(scaled.head[-1].bias / 3.25)
    idx = torch.from_numpy(encode_bytes([w.encode() for w in WORDS]).astype("int64"))
    targets, negatives = torch.randn(len(WORDS), 24), torch.randn(16, 24)
    loss = LossConfig(l1_weight=1.0, mse_weight=10.0, softmax_weight=1.0, softmax_temperature=0.5)
    rows, unit_loss = unit(idx, targets, loss, negatives=negatives)
    scaled_rows, scaled_loss = scaled(idx, 3.25 * targets, loss, negatives=3.25 * negatives)
    assert torch.allclose(scaled_rows, 3.25 * rows, atol=1e-5)
    assert scaled_loss.item() == pytest.approx(unit_loss.item(), rel=1e-5)
    # in raw units the loss would differ: the scale is what makes it the same
    plain = ByteEncoder(config)
    plain.load_state_dict(scaled.state_dict())
    assert plain(idx, 3.25 * targets, loss, negatives=3.25 * negatives)[1].item() != pytest.approx(unit_loss.item(), rel=1e-2)
