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


# ---------------------------------------------------------------------------------------------------- images
def time_bin_sums(values: torch.Tensor, t: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) float64 sums of ``values`` (B,) by the bin of their t (B,) in [0, 1], and (K,) counts.

    Bin k holds t in [k/K, (k+1)/K); t = 1 goes to the last bin. ``index_add_`` on the device, no host sync.
    """
    idx = (t.detach() * num_bins).long().clamp_(0, num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64, device=values.device)
    counts = torch.zeros(num_bins, dtype=torch.float64, device=values.device)
    sums.index_add_(0, idx, values.detach().double())
    counts.index_add_(0, idx, torch.ones_like(values, dtype=torch.float64))
    return sums, counts


def pair_cosines(e: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every unordered pair i < j of the rows of ``e`` (B, D), and whether the pair shares a
    label: two (B(B-1)/2,) tensors, float64 and bool."""
    u = F.normalize(e.detach().double(), dim=-1)
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    return (u[i] * u[j]).sum(-1), labels[i] == labels[j]


def pairwise_mse(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of every unordered pair of the K samples x (K, ...): (K(K-1)/2,) float64."""
    flat = x.detach().double().flatten(1)
    i, j = torch.triu_indices(len(flat), len(flat), offset=1, device=x.device)
    return (flat[i] - flat[j]).pow(2).mean(-1)


def attention_entropy_by_head(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H,) float64 sums over batch and queries of the entropy −Σ_k p log p (nats) of each head's rows, and the
    number of rows per head (B·N_q). probs: (B, H, N_q, N_k)."""
    p = probs.double()
    ent = -torch.special.xlogy(p, p).sum(-1)  # (B, H, Nq)
    n = torch.full((p.shape[1],), float(p.shape[0] * p.shape[2]), dtype=torch.float64, device=p.device)
    return ent.sum((0, 2)), n
