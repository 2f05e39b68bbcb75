"""
The encoder that reads FVT's row beside the bytes (train.py --fvt_residual=True): before it
has learned anything it predicts FVT's rows exactly, and what it adds depends on them; a vocabulary token's FVT
row never comes from the token itself nor from a row held out of training; and the stages
pass the rows along, from train.py to the rows tokens.py adds.
"""
import torch

from helpers import TINY_TRAIN, run_in_process, succeeds
from model import ByteEncoder, ByteEncoderConfig
from soft_tokenizer.filling import vocabulary_fvt_rows
from soft_tokenizer.spelling import encode_bytes, token_bytes

WORDS = [b" the", b" internationalization", b"A", "東京".encode()]


@torch.no_grad()
def test_an_untrained_correction_predicts_fvts_rows_and_reads_them():
    torch.manual_seed(0)
    encoder = ByteEncoder(ByteEncoderConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, n_out=24, head_hidden=48, fvt_residual=True, row_scale=2.0)).eval()
    tokens = torch.from_numpy(encode_bytes(WORDS).astype("int64"))
    fvt = torch.randn(len(WORDS), 24)
    torch.testing.assert_close(encoder.predict(tokens, batch_size=2, fvt=fvt), fvt, rtol=0, atol=0)
    torch.nn.init.normal_(encoder.head[-1].weight)  # as if trained
    correction = encoder(tokens, fvt=fvt)[0] - fvt
    assert correction.abs().max() > 0
    other = encoder(tokens, fvt=fvt.flip(0))[0] - fvt.flip(0)
    assert (other - correction).abs().max() > 1e-3 * correction.abs().max()  # it depends on FVT's row, not only on the bytes


def test_a_tokens_fvt_row_comes_from_other_tokens_trained_on(smollm2_tokenizer):
    spelled = [data for data, _ in token_bytes(smollm2_tokenizer)[0]]
    vocab_size = len(spelled)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(vocab_size, 8, generator=g)
    held_out = torch.randperm(vocab_size, generator=g)[:vocab_size // 10]
    train_ids = torch.ones(vocab_size, dtype=torch.bool)
    train_ids[held_out] = False
    table[held_out] = 1e6  # a held-out row lent to any token would show
    rows = vocabulary_fvt_rows(smollm2_tokenizer, table, train_ids.nonzero()[:, 0])
    assert rows.abs().max() < 10
    multi_byte = torch.tensor([len(s) > 1 for s in spelled])
    own = (rows - table).abs().max(1).values < 1e-6
    assert not (own & multi_byte).any()
    # split into pieces, not handed the mean row (as a token would be whose pieces are all banned)
    got_mean = (rows - table[train_ids].mean(0)).abs().max(1).values < 1e-6
    assert (got_mean & multi_byte).sum() < 0.01 * multi_byte.sum()


def test_the_stages_pass_fvts_rows_along(tiny_mistral, prepared_mistral, workdir):
    out_dir = workdir / "out-fvt-residual"
    model = f"--model={tiny_mistral.folder}"
    succeeds(run_in_process("train.py", model, f"--out_dir={out_dir}", *TINY_TRAIN, "--max_iters=4", "--eval_interval=4", "--fvt_residual=True", cwd=workdir))
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["model_args"]["fvt_residual"]
    succeeds(run_in_process("train_e2e.py", model, f"--out_dir={out_dir}", "--e2e_context=64", "--e2e_steps=3", "--e2e_chat_share=0", cwd=workdir))
    succeeds(run_in_process("evaluate.py", model, f"--out_dir={out_dir}", cwd=workdir))
    saved = workdir / "fvt-residual-plus"
    succeeds(run_in_process("tokens.py", "add", model, f"--out_dir={out_dir}", "--method=soft", f"--save={saved}", "--tokens", " zorblax", cwd=workdir))
    assert (saved / "config.json").is_file()
