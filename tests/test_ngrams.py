"""
The solved part of the encoder, in-process, on SmolLM2's real vocabulary: each token's
features are the n-grams of its spelling and nothing else; a table that is exactly a sum of
n-gram vectors is recovered by the solve; a string the encoder never trained on gets the sum
of the vectors of the n-grams it has; the solve does not depend on the order of the tokens.
"""
import pytest
import torch

from model import END, NGRAM_BASE, NO_CODE, START, ByteEncoder, ByteEncoderConfig, ngram_codes
from soft_tokenizer.ngrams import feature_matrix, ngram_vocabulary, solve_ngram_vectors
from soft_tokenizer.spelling import encode_bytes, token_bytes

NGRAM_MAX, WHOLE_MAX = 6, 3


def spelled_features(data):
    """The features of a token of bytes `data`, enumerated as the docstring of
    model.ngram_codes says, one by one: a set of codes."""
    sequence = (START, *data, END)
    features = {0}  # the bias
    for n in range(1, min(NGRAM_MAX, len(sequence)) + 1):
        for first in range(len(sequence) - n + 1):
            gram = sequence[first:first + n]
            if n == len(sequence) or (n == 1 and gram[0] >= START):
                continue
            features.add(code(gram))
    if len(data) <= WHOLE_MAX:
        features.add(code(sequence))
    return features


def code(symbols):
    return sum((s + 1) * NGRAM_BASE ** k for k, s in enumerate(symbols))


@pytest.fixture(scope="module")
def vocabulary(smollm2_tokenizer):
    """4,000 of SmolLM2's tokens (bytes, ids [N, block]), every length among them."""
    spellings = [data for data, _ in token_bytes(smollm2_tokenizer)[0] if data]
    g = torch.Generator().manual_seed(0)
    chosen = [spellings[i] for i in torch.randperm(len(spellings), generator=g)[:4000].tolist()]
    return chosen, torch.from_numpy(encode_bytes(chosen).astype("int64"))


def test_each_token_has_the_ngrams_of_its_spelling_once(vocabulary):
    spellings, input_ids = vocabulary
    codes, is_whole = ngram_codes(input_ids, NGRAM_MAX, WHOLE_MAX)
    for data, row, whole in zip(spellings, codes, is_whole):
        used = row[row != NO_CODE]
        assert sorted(used.tolist()) == sorted(spelled_features(data)), data
        assert row[whole].tolist() == ([code((START, *data, END))] if len(data) <= WHOLE_MAX else [])


def vectors_for(keys, dim, seed):
    return torch.randn(len(keys), dim, generator=torch.Generator().manual_seed(seed))


def test_a_table_that_is_a_sum_of_ngram_vectors_is_recovered(vocabulary):
    """With n-grams of up to 2 symbols there are fewer features (1,372) than tokens (4,000), so
    a table is a sum of n-gram vectors only if it was made as one, and then the solve finds it."""
    _, input_ids = vocabulary
    keys = ngram_vocabulary(input_ids, 2, 0)
    X, _ = feature_matrix(input_ids, keys, 2, 0)
    assert X.shape[1] < len(input_ids) / 2
    table = X @ vectors_for(keys, 8, 1)
    solved = solve_ngram_vectors(input_ids, table, keys, 2, 0, ridge=1e-4, whole_ridge=1e-4, iters=300)
    assert (X @ solved - table).norm() < 1e-3 * table.norm()
    # the check can fail: a table that is no such sum is not recovered
    other = torch.randn(table.shape, generator=torch.Generator().manual_seed(2)) * table.std()
    assert (X @ solve_ngram_vectors(input_ids, other, keys, 2, 0, 1e-4, 1e-4, 300) - other).norm() > 0.3 * other.norm()


def test_an_unseen_string_gets_the_vectors_of_the_ngrams_it_has(vocabulary):
    spellings, input_ids = vocabulary
    keys = ngram_vocabulary(input_ids, NGRAM_MAX, WHOLE_MAX)
    config = ByteEncoderConfig(block_size=input_ids.shape[1] + 8, n_layer=1, n_head=2, n_embd=16, n_out=8, head_hidden=16,
                               ngram_max=NGRAM_MAX, ngram_whole_max=WHOLE_MAX, ngram_count=len(keys))
    encoder = ByteEncoder(config).eval()
    vectors = vectors_for(keys, 8, 3)
    with torch.no_grad():
        encoder.ngram_keys.copy_(keys)
        encoder.ngram.weight[:-1] = vectors
    known = {c: i for i, c in enumerate(keys.tolist())}
    # strings that are not tokens here: a short one whose whole sequence no token has, and longer ones
    unseen = [s for s in (b"zqx", b" tokenizerless", b" soft-tokenizers", "ünïcode".encode()) if s not in set(spellings)]
    assert len(unseen) == 4
    predicted = encoder.predict(torch.from_numpy(encode_bytes(unseen, config.block_size).astype("int64")))
    for data, row in zip(unseen, predicted):
        has = [known[c] for c in spelled_features(data) if c in known]
        assert code((START, *data, END)) not in known  # no whole-token vector of a trained token
        assert len(has) > 1
        torch.testing.assert_close(row, vectors[has].sum(0), rtol=1e-5, atol=1e-5)
    # a token it was solved on gets its own whole-token vector too
    short = next(i for i, s in enumerate(spellings) if len(s) == 2)
    own = [known[c] for c in spelled_features(spellings[short])]
    torch.testing.assert_close(encoder.predict(input_ids[short:short + 1])[0], vectors[own].sum(0), rtol=1e-5, atol=1e-5)


def test_the_solve_does_not_depend_on_the_order_of_the_tokens(vocabulary):
    _, input_ids = vocabulary
    table = torch.randn(len(input_ids), 6, generator=torch.Generator().manual_seed(4))
    keys = ngram_vocabulary(input_ids, NGRAM_MAX, WHOLE_MAX)
    order = torch.randperm(len(input_ids), generator=torch.Generator().manual_seed(5))
    assert torch.equal(ngram_vocabulary(input_ids[order], NGRAM_MAX, WHOLE_MAX), keys)
    solved = solve_ngram_vectors(input_ids, table, keys, NGRAM_MAX, WHOLE_MAX, 0.05, 0.05, 40)
    assert torch.equal(solve_ngram_vectors(input_ids[order], table[order], keys, NGRAM_MAX, WHOLE_MAX, 0.05, 0.05, 40), solved)
    # column blocks solve each column alone: the same rows, to float32's rounding
    X, _ = feature_matrix(input_ids, keys, NGRAM_MAX, WHOLE_MAX)
    blocks = solve_ngram_vectors(input_ids, table, keys, NGRAM_MAX, WHOLE_MAX, 0.05, 0.05, 40, column_block=4)
    assert (X @ blocks - X @ solved).norm() < 1e-4 * (X @ solved).norm()
