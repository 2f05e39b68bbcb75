"""
How close a predicted table is to the LM's own. Top-1 is the prototype's metric; cosine and
explained variance say how close the rows are, which is what the spliced LM needs, and
weighted by how often each token occurs in text they say it for the rows text actually uses.
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def top1_hits(predicted, table, ids, chunk=2048):
    """The prototype's metric, chunked so no V x V matrix is ever built: does
    argmax(predicted . table^T) equal the token's own id?"""
    hits = []
    for start in range(0, len(ids), chunk):
        scores = predicted[start:start + chunk] @ table.T
        hits.append(scores.argmax(1) == ids[start:start + chunk])
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def closeness(predicted, true, mean_row, weights=None):
    """Cosine and explained variance (1 - |pred - true|^2 / |true - mean row|^2, so 0 is what the
    mean row gives and 1 is exact) over these rows, each row counted `weights` times."""
    weights = torch.ones(len(true), device=true.device) if weights is None else weights.to(true.device, torch.float32)
    weights = weights / weights.sum()
    error = (predicted.float() - true).pow(2).sum(1)
    spread = (true - mean_row).pow(2).sum(1)
    return {"cosine": (weights * F.cosine_similarity(predicted.float(), true, dim=1)).sum().item(),
            "explained": 1.0 - ((weights * error).sum() / (weights * spread).sum()).item()}

