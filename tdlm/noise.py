"""How the masking noise of the NELBO is drawn: the estimators, for training and for evaluation.

Every estimator is unbiased for the same number, the truncated NELBO that training reports and evaluation
scores (``tdlm/diffusion.py``, ``tdlm/likelihood.py``),

    N(x) = E_{t ~ U[t_min, 1]} [ w(t) * sum_{i masked} -log p(x_i | z_t) ],   w = -alpha'/(1 - alpha).

- ``bernoulli``: t per sequence (stratified over the global batch), every valid token masked independently with
  probability m(t) = 1 - alpha(t), weight w(t). Its variance is large at small t: a row with t near t_min masks
  one or two tokens and weighs them up to 1/t_min.
- ``exact-k`` (LLaDA; RADD's k-DCE): k ~ U{1..L} per sequence (stratified over the global batch), exactly k of
  the L valid tokens masked uniformly at random, weight (L / k) c_k with c_k = (I_{m(1)}(k, L-k+1) -
  I_{m(t_min)}(k, L-k+1)) / (1 - t_min) (I: the regularised incomplete beta function). Substituting m = 1 - alpha
  and integrating m^(k-1) (1-m)^(L-k) over [m(t_min), m(1)] for every mask set of size k gives N exactly, so the
  Bernoulli count noise is gone: every row masks as many tokens as its weight expects.
- ``importance``: t drawn from a proposal q(t) ∝ t^(-a) on [t_min, 1] (``diffusion.proposal_power`` a in
  [0, 1)), weight w(t) p(t) / q(t) with p = 1 / (1 - t_min) the uniform density. The Bernoulli estimator's second
  moment given t is about L CE^2 (1 - t) / t + (L CE)^2, and the variance-optimal proposal is proportional to the
  square root of it (Owen, *Monte Carlo theory*, ch. 9): *more* mass near t_min than uniform, not less, so a > 0;
  a = 0.5 is the small-t optimum. a = 0 is the Bernoulli estimator.

Block diffusion (``BlockTrainingNoise``) applies any of them per block of L' tokens: each block is one row.

The draws of a step come from the step's generator for the whole global batch (``tdlm.engine.randomness``); the
tensors are CPU tensors, one row per sequence.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tdlm.diffusion import NoiseSchedule, noise_mask, sample_t

ESTIMATORS = ("bernoulli", "exact-k", "importance")


def stratified_uniform(n: int, stratified: bool, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 in [0, 1): one draw in each of n equal strata, strata randomly assigned to rows (or iid)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.randperm(n, generator=generator).double() + u) / n
    return u


@lru_cache(maxsize=64)
def _exact_k_table(length: int, m_lo: float, m_hi: float, t_min: float) -> torch.Tensor:
    from scipy.special import betainc

    k = torch.arange(1, length + 1, dtype=torch.float64)
    if m_lo == 0.0 and m_hi == 1.0:
        c = torch.ones_like(k)  # exact in floating point: LLaDA's L / k
    else:
        a, b = k.numpy(), (length - k + 1).numpy()
        c = torch.from_numpy(betainc(a, b, m_hi)) - torch.from_numpy(betainc(a, b, m_lo))
    return torch.cat([torch.zeros(1, dtype=torch.float64), length / k * c / (1.0 - t_min)])  # index k


def exact_k_weight(k: torch.Tensor, length: torch.Tensor, schedule: NoiseSchedule, t_min: float) -> torch.Tensor:
    """(L / k) c_k in float64 per row (see the module docstring); 0 for a row without valid tokens."""
    m_lo, m_hi = (float(v) for v in schedule.mask_prob(torch.tensor([t_min, 1.0], dtype=torch.float64)))
    out = torch.zeros(k.shape, dtype=torch.float64)
    for n in length.unique().tolist():
        if n > 0:
            rows = length == n
            out[rows] = _exact_k_table(int(n), m_lo, m_hi, t_min)[k[rows].long()]
    return out


def exact_k_mask(u_k: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k = floor(u_k L_valid) + 1 per row and the mask of the k valid positions with the lowest ``scores``
    (uniforms: a uniformly random k-subset). Returns (masked (B, L) bool, k (B,))."""
    lengths = valid.sum(1)
    k = (u_k * lengths).floor().long().clamp(max=(lengths - 1).clamp_min(0)) + 1
    order = scores.masked_fill(~valid, 2.0).argsort(1)  # pads rank last
    positions = torch.arange(scores.shape[1]).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)  # the inverse permutation: one sort, not two
    return (ranks < k[:, None]) & valid, k


def power_proposal_t(u: torch.Tensor, t_min: float, power: float) -> torch.Tensor:
    """Inverse CDF of q(t) ∝ t^(-a) on [t_min, 1]: t = (t_min^(1-a) + u (1 - t_min^(1-a)))^(1/(1-a))."""
    e = 1.0 - power
    lo = t_min ** e
    return (lo + u * (1.0 - lo)) ** (1.0 / e)


def power_proposal_ratio(t: torch.Tensor, t_min: float, power: float) -> torch.Tensor:
    """p(t) / q(t): the uniform density 1 / (1 - t_min) over q(t) = (1-a) t^(-a) / (1 - t_min^(1-a))."""
    e = 1.0 - power
    return (1.0 - t_min ** e) / (e * (1.0 - t_min)) * t ** power


class TrainingNoise:
    """The estimator of ``diffusion.estimator``: ``draw`` the global batch's uniforms on the host from the step's
    generator, then ``mask`` each micro-batch's rows into (masked, t, weight)."""

    def __init__(self, estimator: str, schedule: NoiseSchedule, t_min: float, stratified: bool = True,
                 proposal_power: float = 0.5):
        if estimator not in ESTIMATORS:
            raise ValueError(f"diffusion.estimator: {estimator!r} is not one of {', '.join(ESTIMATORS)}")
        self.estimator, self.schedule, self.t_min = estimator, schedule, t_min
        self.stratified, self.power = stratified, proposal_power

    def draw(self, generator: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, uniforms (rows, L)): first is t (float32) for ``bernoulli`` (the draws it has always made),
        the stratified uniform (float64) that picks t or k otherwise."""
        if self.estimator == "bernoulli":
            first = sample_t(rows, self.t_min, self.stratified, generator)
        else:
            first = stratified_uniform(rows, self.stratified, generator)
        return first, torch.rand(rows, length, generator=generator)

    def mask(self, first: torch.Tensor, uniforms: torch.Tensor, valid: torch.Tensor | None = None):
        """(masked (B, L) bool, t (B,) float32, weight (B,) float32, ratio (B,) float32) for rows whose valid
        positions are ``valid`` (None: all). t of an ``exact-k`` row is its masked fraction k / L; ``ratio`` is
        p(t) / q(t) (1 but for ``importance``), what a t-average is weighted by to be one under U[t_min, 1]."""
        if self.estimator == "exact-k":
            v = torch.ones_like(uniforms, dtype=torch.bool) if valid is None else valid
            masked, k = exact_k_mask(first, uniforms, v)
            lengths = v.sum(1)
            weight = exact_k_weight(k, lengths, self.schedule, self.t_min).float()
            t = (k / lengths.clamp_min(1)).float()
            return masked, t, weight, torch.ones_like(t)
        if self.estimator == "importance":
            t64 = power_proposal_t(first, self.t_min, self.power)
            t, ratio = t64.float(), power_proposal_ratio(t64, self.t_min, self.power).float()
            return noise_mask(t, uniforms, self.schedule, valid), t, self.schedule.weight(t) * ratio, ratio
        masked = noise_mask(first, uniforms, self.schedule, valid)
        return masked, first, self.schedule.weight(first.float()), torch.ones_like(first)


class BlockTrainingNoise:
    """Block diffusion's noise (BD3-LM): every block of ``block_size`` tokens is a row of the wrapped estimator,
    so each block draws its own t_b (or k_b: exact-k applies per block) stratified over the global batch x
    blocks, and gets its own weight. Returns what ``TrainingNoise`` does with (B, L / L') for t, weight, ratio."""

    def __init__(self, inner: TrainingNoise, block_size: int, t_clip: tuple[float, float] | None = None):
        if t_clip and inner.estimator != "bernoulli":
            raise ValueError(f"diffusion.t_clip: applies to the bernoulli estimator, not {inner.estimator}")
        self.inner, self.block_size, self.t_clip = inner, block_size, tuple(t_clip) if t_clip else None
        self.estimator = inner.estimator

    def draw(self, generator: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first (rows, L / L'), uniforms (rows, L)): rows leading, so the engine slices them per micro-batch.

        ``t_clip`` (lo, hi): BD3-LM's clipped schedule. The stratified t of [t_min, 1] is mapped linearly onto
        [lo, hi] (for the linear schedule the masked fraction is t, so these bound it), the weight stays w(t):
        a training objective with lower gradient variance that is *not* the NELBO (validation and evaluation
        never clip)."""
        blocks = length // self.block_size
        first, uniforms = self.inner.draw(generator, rows * blocks, self.block_size)
        if self.t_clip:
            lo, hi, t_min = *self.t_clip, self.inner.t_min
            first = (lo + (first.double() - t_min) / (1.0 - t_min) * (hi - lo)).float()
        return first.view(rows, blocks), uniforms.view(rows, length)

    def mask(self, first: torch.Tensor, uniforms: torch.Tensor, valid: torch.Tensor | None = None):
        """(masked (B, L), t, weight, ratio (B, L / L')): the wrapped estimator over the block rows."""
        B, L = uniforms.shape
        as_blocks = (lambda x: x.reshape(-1, self.block_size))
        masked, t, weight, ratio = self.inner.mask(first.reshape(-1), as_blocks(uniforms),
                                                   None if valid is None else as_blocks(valid))
        return masked.view(B, L), t.view(B, -1), weight.view(B, -1), ratio.view(B, -1)
