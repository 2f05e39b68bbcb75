"""
The byte encoder and its loss. A small bidirectional transformer reads a token's UTF-8 bytes,
[start] bytes [end] [pad]..., and an MLP on the state at [end] predicts the row the LM's
embedding table has for that token. Beside it, the row is also a sum of vectors, one for each
n-gram of the token's symbols that the training tokens have (fastText's bag of n-grams, the
markers counting as symbols); a sum is linear in its vectors, so train.py solves them by least
squares (soft_tokenizer/ngrams.py) and the transformer learns what they leave. A string the
encoder never saw gets the vectors of the n-grams it has. forward(idx, targets) returns the
prediction and, given the true rows, the loss.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from soft_tokenizer.configurator import progress

START, END, PAD = 256, 257, 258  # byte ids are 0..255
BYTE_VOCAB = 259
# an n-gram's code is its symbols as digits s + 1 in base 260 (no digit is 0, so codes of
# different lengths never meet); 260**7 < 2**63, so up to 7 symbols fit an int64 exactly
NGRAM_BASE = BYTE_VOCAB + 1
NGRAM_LIMIT = 7
BIAS_CODE = 0  # the empty n-gram, which every token has: the bias
NO_CODE = -1


@dataclass
class ByteEncoderConfig:
    block_size: int = 50  # longest [start] bytes [end] sequence
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512
    n_out: int = 4096  # the LM's embedding width
    head_hidden: int = 2048  # width of the MLP that projects the end-token state up to n_out
    dropout: float = 0.0
    bias: bool = True
    # the solved part (ngram_codes): vectors in the table's own space for the n-grams of 1 to
    # ngram_max symbols of [start] bytes [end]; 0: none, the transformer alone
    ngram_max: int = 0
    # a token of at most this many bytes also has its whole sequence as a feature: its bytes
    # have too few parts to compose it. No other string ever has that feature
    ngram_whole_max: int = 0
    ngram_count: int = 0  # how many n-grams have a vector: those the training tokens have
    # the table's RMS row norm (train.py measures it): the loss compares rows in units of it,
    # so its settings mean the same on every LM (SmolLM2's rows have norm 3.25, Gemma 3's 1.03).
    # The head still predicts the table's own units: dividing its output instead would change
    # how fast Adam moves it (measured on SmolLM2: 2.06x / 2.43x against 1.50x / 1.72x).
    # 1.0: raw units, as older checkpoints were trained
    row_scale: float = 1.0
    # the encoder also reads FVT's row for the token (the mean of the rows of the pieces it
    # splits into without itself: filling.fvt_rows) beside its bytes, and predicts a correction
    # to it (ZeTT's hypernetwork reads the pieces' rows too): a start no worse than FVT's, from
    # which the bytes need only learn what the pieces miss
    fvt_residual: bool = False


@dataclass
class LossConfig:
    """A weighted sum of L1, MSE and a softmax over table rows (the prototype metric's own loss),
    on rows in units of the table's RMS row norm (ByteEncoderConfig.row_scale)."""
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    softmax_weight: float = 0.0
    softmax_temperature: float = 1.0


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, keep):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # no causal mask: every byte sees the whole token, but nobody attends to padding
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, keep):
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


def embedding_loss(pred, targets, loss, weights=None, ids=None, negatives=None, negative_ids=None, softmax_weights=None):
    """How far predicted rows [B, D] are from the true rows [B, D], as `loss` (a LossConfig)
    weighs it. weights [B]: each token's share of the loss (mean 1 over the vocabulary);
    softmax_weights [B]: each token's share of the softmax term alone.
    The softmax term scores each prediction against the batch's true rows plus the rows
    `negatives` [K, D] and must pick its own. With the token ids of the batch (ids [B]) and of
    the negatives (negative_ids [K]), every candidate row stands once: a negative that is a
    token of the batch, or a second copy of a token in the batch, is left out."""
    pred, targets = pred.float(), targets.float()
    per_token = torch.zeros(len(pred), device=pred.device)
    if loss.l1_weight:
        per_token = per_token + loss.l1_weight * (pred - targets).abs().mean(1)
    if loss.mse_weight:
        per_token = per_token + loss.mse_weight * (pred - targets).pow(2).mean(1)
    if loss.softmax_weight:
        candidates = targets if negatives is None else torch.cat([targets, negatives.float()])
        logits = pred @ candidates.T / loss.softmax_temperature
        labels = torch.arange(len(pred), device=pred.device)
        if ids is not None:
            same = ids[None, :] == ids[:, None]
            # of a token twice in the batch, only the first copy is a candidate, but each copy's own row stays its label
            later_copy = (same & (labels[:, None] < labels[None, :])).any(0)
            repeated = (same | later_copy[None, :]) & (labels[None, :] != labels[:, None])
            in_batch = torch.isin(negative_ids, ids)[None, :].expand(len(ids), -1) if negatives is not None else repeated[:, :0]
            logits = logits.masked_fill(torch.cat([repeated, in_batch], 1), float("-inf"))
        softmax = F.cross_entropy(logits, labels, reduction="none")
        per_token = per_token + loss.softmax_weight * (softmax if softmax_weights is None else softmax * softmax_weights)
    return (per_token * weights).mean() if weights is not None else per_token.mean()


def trim_padding(idx):
    """Rows [start] bytes [end] pad... cut to the longest token among them: the padding after
    it cannot change a prediction (tests/test_model.py) and would only cost compute."""
    return idx[:, :int((idx != PAD).sum(1).max())]


def hub_ids(table, k):
    """The k rows with the largest dot product with the mean row. On a table whose rows share a
    large common direction (tied SmolLM2) these few win the dot product against most predictions,
    so the softmax term keeps them among its negatives at every step."""
    return (table @ table.mean(0)).topk(k).indices


def softmax_negative_ids(table_size, n_sampled, hubs, generator):
    """The rows the softmax term scores a batch against beside its own: the whole table when
    n_sampled is 0, else the hubs and n_sampled ids drawn uniformly from generator."""
    if n_sampled == 0:
        return torch.arange(table_size, device=hubs.device)
    return torch.cat([hubs, torch.randint(0, table_size, (n_sampled,), generator=generator).to(hubs.device)])


def ngram_codes(idx, ngram_max, whole_max):
    """[B, K] the codes of the features each token of idx [B, T] has, once each, NO_CODE in the
    unused places: the bias; every n-gram of 1 to ngram_max symbols of [start] bytes [end] but
    the markers alone and the whole sequence; the whole sequence if the token has at most
    whole_max bytes. is_whole [B, K] marks that last one."""
    B, T = idx.shape
    length = (idx != PAD).sum(1, keepdim=True)  # symbols, markers included
    digits = (idx + 1).masked_fill(idx == PAD, 0)
    codes, wholes = [torch.full((B, 1), BIAS_CODE, dtype=torch.long, device=idx.device)], []
    for n in range(1, min(ngram_max, T) + 1):
        windows = digits.unfold(1, n, 1)  # [B, T - n + 1, n]
        code = (windows * NGRAM_BASE ** torch.arange(n, device=idx.device)).sum(-1)
        first = torch.arange(windows.shape[1], device=idx.device)[None, :]
        inside = first + n <= length
        whole = (first == 0) & (length == n)
        keep = inside & ~whole & ~((n == 1) & (idx[:, :windows.shape[1]] >= START))
        codes.append(code.masked_fill(~keep, NO_CODE))
    if whole_max:
        # the whole sequence, as one more code; only short tokens have it, and all of them fit
        n = min(whole_max + 2, T)
        code = (digits[:, :n] * NGRAM_BASE ** torch.arange(n, device=idx.device)).sum(-1, keepdim=True)
        wholes.append(code.masked_fill(length - 2 > whole_max, NO_CODE))
    codes = torch.cat(codes + wholes, 1)
    is_whole = torch.zeros_like(codes, dtype=torch.bool)
    if wholes:
        is_whole[:, -1] = codes[:, -1] != NO_CODE
    # an n-gram that comes twice in a token counts once: sort, then drop repeats
    codes, order = codes.sort(1)
    is_whole = is_whole.gather(1, order)
    repeat = F.pad(codes[:, 1:] == codes[:, :-1], (1, 0), value=False)
    return codes.masked_fill(repeat, NO_CODE), is_whole & ~repeat


class ByteEncoder(nn.Module):
    def __init__(self, config, sparse_ngrams=True):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(BYTE_VOCAB, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.ngram_max:
            if not 1 <= config.ngram_max <= NGRAM_LIMIT or not 0 <= config.ngram_whole_max <= NGRAM_LIMIT - 2:
                raise ValueError(f"ngram_max must be 1 to {NGRAM_LIMIT} and ngram_whole_max 0 to {NGRAM_LIMIT - 2}: longer codes do not fit an int64")
            # the codes of the n-grams that have a vector, sorted, so a lookup is a binary search;
            # row ngram_count is "no such n-gram": zero, never trained. Sparse gradients, so that an
            # e2e step costs the rows the batch touched (SparseAdam steps them)
            self.register_buffer("ngram_keys", torch.zeros(config.ngram_count, dtype=torch.long))
            self.ngram = nn.EmbeddingBag(config.ngram_count + 1, config.n_out, mode="sum", padding_idx=config.ngram_count, sparse=sparse_ngrams)
        if config.fvt_residual:
            self.fvt_in = nn.Linear(config.n_out, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Sequential(
            nn.Linear(config.n_embd, config.head_hidden, bias=config.bias),
            nn.GELU(),
            nn.Linear(config.head_hidden, config.n_out, bias=config.bias),
        )
        self.apply(self._init_weights)
        # residual projections scaled down with depth, as in GPT-2
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.ngram_max:
            nn.init.zeros_(self.ngram.weight)
        if config.fvt_residual or config.ngram_max:
            # nothing added at the start: the first prediction is FVT's row or the solved one itself, not it plus noise larger than a row
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, loss=None, fvt=None, **loss_inputs):
        """idx: [B, T] byte ids, any T from the longest token up to block_size; fvt: [B, n_out]
        FVT's rows for the tokens, which an fvt_residual encoder needs. Returns the predicted
        rows [B, n_out] and, with targets (the true rows) and a LossConfig, the loss."""
        B, T = idx.shape
        if self.config.fvt_residual and fvt is None:
            raise ValueError("this encoder predicts a correction to FVT's rows: pass them as fvt")
        keep = idx != PAD
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        if self.config.fvt_residual:
            # in the table's RMS units, as the loss reads rows, so its scale is the same on every LM
            fvt = fvt.to(x.dtype)
            x = x + self.fvt_in(fvt / self.config.row_scale)[:, None, :]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, keep)
        # the state at the [end] position sums up the whole token
        end = keep.sum(1) - 1
        pred = self.head(self.ln_f(x[torch.arange(B, device=idx.device), end]))
        if self.config.ngram_max:
            pred = pred + self.ngram(self.ngram_rows(idx)).to(pred.dtype)
        if self.config.fvt_residual:
            pred = pred + fvt
        if targets is None:
            return pred, None
        scale = self.config.row_scale
        if loss_inputs.get("negatives") is not None:
            loss_inputs = {**loss_inputs, "negatives": loss_inputs["negatives"] / scale}
        return pred, embedding_loss(pred / scale, targets / scale, loss, **loss_inputs)

    def ngram_rows(self, idx):
        """[B, K] the row of self.ngram for each feature of each token (ngram_codes): the row of
        its code among ngram_keys, or the zero row for a code no training token had."""
        codes, _ = ngram_codes(idx, self.config.ngram_max, self.config.ngram_whole_max)
        none = self.config.ngram_count
        if none == 0:
            return torch.full_like(codes, none)
        slot = torch.searchsorted(self.ngram_keys, codes).clamp(max=none - 1)
        return slot.masked_fill(self.ngram_keys[slot] != codes, none)

    @torch.no_grad()
    def predict(self, input_ids, batch_size=1024, fvt=None):
        """Every row of input_ids [N, block] (with fvt [N, n_out], FVT's rows, for an fvt_residual
        encoder) through the encoder, in batches of tokens of similar length trimmed to their
        longest, so little padding is computed; rows come back in order."""
        device = next(self.parameters()).device
        order = (input_ids != PAD).sum(1).argsort()
        rows = []
        for start in progress(range(0, len(input_ids), batch_size), desc="predicting", leave=False, disable=len(input_ids) < 16 * batch_size):
            batch = order[start:start + batch_size]
            batch_fvt = None if fvt is None else fvt[batch.to(fvt.device)].to(device)
            rows.append(self(trim_padding(input_ids[batch]).to(device), fvt=batch_fvt)[0].float().cpu())
        predicted = torch.empty(len(input_ids), self.config.n_out)
        predicted[order] = torch.cat(rows)
        return predicted

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW for the transformer's weights. The solved n-gram vectors are not among them:
        train.py trains the transformer on what they leave (train_e2e.py steps them)."""
        ngram = [self.ngram.weight] if self.config.ngram_max else []
        dense = [p for p in self.parameters() if all(p is not q for q in ngram)]
        groups = [{"params": [p for p in dense if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in dense if p.dim() < 2], "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")]
