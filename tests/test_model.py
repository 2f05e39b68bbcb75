"""
The encoder must not care how much padding follows a token: batches are trimmed to their
longest token in training but padded to the full block elsewhere.
"""
import pytest
import torch

from model import PAD, ByteEncoder, ByteEncoderConfig
from spelling import encode_bytes

WORDS = ["A", " the", "é", " Hello", "🤖", "def", "\n", " internationalization", "東京"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ByteEncoder(ByteEncoderConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, n_out=48, head_hidden=96)).eval()


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
    altered = ByteEncoder(encoder.config).eval()
    altered.load_state_dict(encoder.state_dict())
    longest = tokens.shape[1]
    altered.wte.weight[PAD] = 100 * torch.randn(encoder.config.n_embd)
    altered.wpe.weight[longest:] = 100 * torch.randn(64 - longest, encoder.config.n_embd)
    torch.testing.assert_close(altered(padded)[0], before, rtol=1e-5, atol=1e-6)
    # the same change to a position real bytes use does reach the output: the check can fail
    altered.wpe.weight[1] = 100 * torch.randn(encoder.config.n_embd)
    assert (altered(padded)[0] - before).abs().max() > 0.1 * before.abs().max()
