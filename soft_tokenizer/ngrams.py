"""
The solved part of the encoder: which n-grams get a vector, and the vectors themselves. A row
the encoder predicts is the transformer's part plus the sum of the vectors of the token's
n-grams (model.ngram_codes), so for fixed n-grams the best vectors for a table are a ridge
least-squares problem, solved here by conjugate gradients instead of descended to by
stochastic gradients: a few CPU-minutes reach every token of the long tail, which minutes of
sampled batches visit a few times each.

  keys = ngram_vocabulary(input_ids[train], ngram_max, whole_max)
  vectors = solve_ngram_vectors(input_ids[train], targets, keys, ...)  # [len(keys), D]
"""
import warnings

import numpy as np
import torch

from model import NO_CODE, ngram_codes
from soft_tokenizer.configurator import progress

# torch's CSR products are what this needs, and they work; their beta notice would print at every solve
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
CHUNK = 16384  # tokens whose codes are computed at once: [CHUNK, K] int64 stays small


def token_features(input_ids, ngram_max, whole_max):
    """(rows, codes, is_whole): every feature of every token of input_ids [N, block], flat."""
    rows, codes, wholes = [], [], []
    for start in range(0, len(input_ids), CHUNK):
        chunk, whole = ngram_codes(input_ids[start:start + CHUNK], ngram_max, whole_max)
        used = chunk != NO_CODE
        rows.append(used.nonzero()[:, 0] + start)
        codes.append(chunk[used])
        wholes.append(whole[used])
    return torch.cat(rows), torch.cat(codes), torch.cat(wholes)


def ngram_vocabulary(input_ids, ngram_max, whole_max, min_tokens=1):
    """The sorted codes of the n-grams that get a vector: those at least min_tokens of the
    tokens input_ids [N, block] have (a whole-token feature and the bias always)."""
    _, codes, is_whole = token_features(input_ids, ngram_max, whole_max)
    keys, counts = codes.unique(return_counts=True)
    whole = torch.zeros_like(keys, dtype=torch.bool)
    whole[torch.searchsorted(keys, codes[is_whole])] = True
    return keys[(counts >= min_tokens) | whole | (keys == 0)]


def feature_matrix(input_ids, keys, ngram_max, whole_max):
    """The tokens' features as a sparse CSR matrix [N, len(keys)] of ones, and which columns are
    whole-token features. A code not among keys is no column."""
    rows, codes, is_whole = token_features(input_ids, ngram_max, whole_max)
    slot = torch.searchsorted(keys, codes).clamp(max=len(keys) - 1)
    known = keys[slot] == codes
    rows, cols = rows[known], slot[known]
    whole_columns = torch.zeros(len(keys), dtype=torch.bool)
    whole_columns[cols[is_whole[known]]] = True
    # each (row, column) pair comes once (ngram_codes drops repeats), so the CSR holds ones
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(len(rows)), (len(input_ids), len(keys)),
                                     check_invariants=False).coalesce()
    return matrix.to_sparse_csr(), whole_columns


def solve_ngram_vectors(input_ids, targets, keys, ngram_max, whole_max, ridge, whole_ridge, iters, column_block=0):
    """The vectors [len(keys), D] that minimise |X W - targets|^2 + sum_f ridge_f |W_f|^2 over
    the tokens input_ids [N, block] with rows targets [N, D] (X: feature_matrix), ridge_f being
    whole_ridge for a whole-token feature and ridge for the rest. The targets are centred first
    and their mean goes to the bias, which every token has. Conjugate gradients on the normal
    equations with a diagonal preconditioner, `iters` iterations from zero for each block of
    column_block columns (0: all at once; fewer columns need less memory), each column its own
    CG. The bias is keys' first code (0). The tokens are taken in the order of their bytes, so
    the sums of the products come out the same however they were ordered."""
    order = torch.from_numpy(np.lexsort(input_ids.cpu().numpy().T[::-1]))
    input_ids, targets = input_ids[order], targets[order]
    X, whole_columns = feature_matrix(input_ids, keys, ngram_max, whole_max)
    Xt = X.to_sparse_coo().t().coalesce().to_sparse_csr()
    targets = targets.float().cpu()
    mean = targets.mean(0)
    lam = torch.where(whole_columns, whole_ridge, ridge).float()
    inverse_diagonal = 1.0 / (torch.zeros(len(keys)).index_add_(0, X.col_indices(), torch.ones(X._nnz())) + lam)
    lam, inverse_diagonal = lam[:, None], inverse_diagonal[:, None]
    width = column_block or targets.shape[1]
    vectors = torch.empty(len(keys), targets.shape[1])
    blocks = range(0, targets.shape[1], width)
    bar = progress(total=iters * len(blocks), desc="solving n-gram vectors", unit="it")
    for first in blocks:
        columns = slice(first, first + width)
        vectors[:, columns] = conjugate_gradients(X, Xt, lam, inverse_diagonal, Xt @ (targets[:, columns] - mean[columns]), iters, bar)
    bar.close()
    vectors[0] += mean
    return vectors


def conjugate_gradients(X, Xt, lam, inverse_diagonal, rhs, iters, bar):
    """(X'X + diag(lam)) W = rhs for each column of rhs [F, C], from W = 0, preconditioned by the
    inverse diagonal. Buffers are updated in place: on a large vocabulary each is GBs."""
    solution = torch.zeros_like(rhs)
    residual = rhs
    direction = inverse_diagonal * residual
    rz = (residual * direction).sum(0)
    rhs_norm = residual.norm().clamp_min(1e-30)
    for _ in range(iters):
        product = Xt @ (X @ direction)
        product.addcmul_(lam, direction)
        step = rz / (direction * product).sum(0).clamp_min(1e-30)
        solution.addcmul_(step, direction)
        residual.addcmul_(step, product, value=-1)
        preconditioned = product.copy_(residual).mul_(inverse_diagonal)  # the product is spent: reuse it
        rz_next = (residual * preconditioned).sum(0)
        direction.mul_(rz_next / rz.clamp_min(1e-30)).add_(preconditioned)
        rz = rz_next
        bar.update()
        bar.set_postfix(residual=f"{(residual.norm() / rhs_norm).item():.4f}", refresh=False)
    return solution
