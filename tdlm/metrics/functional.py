"""Pure metric maths for the collectors (text and image): tensors in, tensors out, no state, no host sync.

Every reduction returns *sums and counts* so a collector can add them to sum-reduced states; the ratio is
taken once, at ``compute`` time, over the whole window and all processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den in float64, NaN where den == 0: an empty window has no value, which is not the value 0."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


def moments(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(6,) float64 [n, Σx, Σy, Σx², Σy², Σxy]: the sufficient statistics of a Pearson correlation."""
    x, y = x.double(), y.double()
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([n, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])


def pearson_from_moments(m: torch.Tensor) -> torch.Tensor:
    """Pearson r from ``moments`` sums (NaN if n < 2 or either variable is constant).

    r = (nΣxy − ΣxΣy) / sqrt((nΣx² − (Σx)²)(nΣy² − (Σy)²)), in float64. It equals ``scipy.stats.pearsonr``
    up to rounding (tested); the raw-moment form is what makes it exactly mergeable across steps and processes.
    """
    n, sx, sy, sxx, syy, sxy = m.double().unbind()
    cov = n * sxy - sx * sy
    var = (n * sxx - sx * sx).clamp_min(0) * (n * syy - sy * sy).clamp_min(0)
    return ratio(cov, var.sqrt())


def std_from_moments(n: torch.Tensor, s: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
    """Population standard deviation from the count, sum and sum of squares."""
    mean = ratio(s, n)
    return (ratio(ss, n) - mean * mean).clamp_min(0).sqrt()


def bucketize_ratio(r: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    """Bucket index of each ratio: edges (0.3, 0.7) give [0, .3) -> 0, [.3, .7) -> 1, [.7, 1] -> 2."""
    return torch.bucketize(r, torch.tensor(edges, dtype=r.dtype, device=r.device), right=True)


def masked_positions(masked: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) flat indices of the True entries of a (B, L) mask, row-major, i.e. the order of ``x[masked]``.

    ``count`` (the number of True entries) is known on the host from a tensor already indexed by the mask
    (the (M, V) logits), so a stable sort finds the positions without the device-to-host sync that boolean
    indexing costs on a GPU.
    """
    return torch.argsort((~masked).flatten().to(torch.uint8), stable=True)[:count]


def mask_ratio_buckets(masked: torch.Tensor, valid: torch.Tensor,
                       edges: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) bucket of each sequence by its realised mask ratio (masked / valid), and (B,) has-valid-tokens."""
    n_valid = valid.sum(1)
    return bucketize_ratio(masked.sum(1).double() / n_valid.clamp_min(1), edges), n_valid > 0


def prediction_stats(logits: torch.Tensor, target: torch.Tensor,
                     ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) argmax == target, and (M,) float64 difficulty 1 − max_v p(v), from logits (M, V) and their CE (M,).

    p_max = exp(max logit − logsumexp), and the logsumexp is free from the CE already computed:
    CE = lse − logit[target]. Only the max over V is a new pass over the logits.
    """
    logits = logits.detach().float()
    top, pred = logits.max(-1)
    lse = ce.detach().double() + logits.gather(1, target[:, None])[:, 0].double()
    return pred == target, 1.0 - torch.exp(top.double() - lse)


def attention_entropy_sums(probs: torch.Tensor, key_valid: torch.Tensor | None,
                           query_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of the attention entropy over valid queries and all heads, and the number of (query, head) pairs.

    probs: (B, H, Lq, Lk) softmax probabilities. Entropy of one query's row: −Σ_{j valid key} p_j log p_j in
    nats (0 log 0 = 0), so uniform attention over n valid keys gives log n. Padded queries are skipped.
    """
    p = probs.double()
    if key_valid is not None:
        p = p * key_valid[:, None, None, :]
    ent = -torch.special.xlogy(p, p).sum(-1)  # (B, H, Lq)
    if query_valid is None:
        return ent.sum(), torch.tensor(float(ent.numel()), dtype=torch.float64, device=ent.device)
    q = query_valid[:, None, :].double()  # (B, 1, Lq)
    return (ent * q).sum(), q.sum() * ent.shape[1]


def vector_norm_sums(h: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of the L2 norm of each valid position's vector, and the number of valid positions. h: (B, L, D)."""
    norms = torch.linalg.vector_norm(h.double(), dim=-1)  # (B, L)
    if valid is None:
        return norms.sum(), torch.tensor(float(norms.numel()), dtype=torch.float64, device=h.device)
    v = valid.double()
    return (norms * v).sum(), v.sum()


def sequence_diversity_sums(h: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over sequences of 1 − (mean cosine similarity over pairs of distinct valid positions), and the count.

    With unit vectors u_i and n valid positions, Σ_{i≠j} cos(u_i, u_j) = ‖Σ u_i‖² − n, so the mean pairwise
    cosine costs O(nD) instead of O(n²D). 0 = every position has the same direction (collapse), 1 = orthogonal
    on average. Sequences with fewer than 2 valid positions are skipped.
    """
    u = F.normalize(h.double(), dim=-1)  # (B, L, D)
    v = torch.ones(h.shape[:2], dtype=torch.float64, device=h.device) if valid is None else valid.double()
    n = v.sum(1)  # (B,)
    s = (u * v[..., None]).sum(1)  # (B, D)
    mean_cos = (s.pow(2).sum(-1) - n) / (n * (n - 1)).clamp_min(1)
    ok = (n >= 2).double()
    return ((1 - mean_cos) * ok).sum(), ok.sum()
