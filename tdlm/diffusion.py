"""Masked (absorbing-state) diffusion: noise schedules, forward masking and the continuous-time NELBO.

Forward process (Austin et al. 2021, D3PM; Sahoo et al. 2024, MDLM; Shi et al. 2024): a sequence x at time t
keeps each token with probability alpha(t) and replaces it by [MASK] otherwise, independently. The NELBO is

    NELBO(x) = integral_0^1  w(t) * E_{z_t}[ sum_{i masked} -log p_theta(x_i | z_t) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t))          (exactly 1/t for the linear schedule alpha = 1 - t).

We estimate it with t ~ U[t_min, 1] per sequence (stratified over the global batch) and report
NELBO / number of valid tokens, so exp() of it is a perplexity *upper bound* comparable to an AR model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F


class NoiseSchedule:
    """alpha(t): probability that a token is still clean at time t; alpha(0)=1, alpha(1)~0."""

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The NELBO weight -alpha'(t)/(1-alpha(t)); never clipped here."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))


class LinearSchedule(NoiseSchedule):
    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def weight(self, t):
        return 1.0 / t  # the closed form, exact in floating point


class CosineSchedule(NoiseSchedule):
    """alpha(t) = cos(pi t / 2): fewer masked tokens early in t (Shi et al. 2024)."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class LogLinearSchedule(NoiseSchedule):
    """MDLM's log-linear noise: sigma(t) = -log(1 - (1-eps) t), so alpha = 1 - (1-eps) t; weight is 1/t."""

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.eps))


def make_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    table = {"linear": LinearSchedule, "cosine": CosineSchedule, "loglinear": lambda: LogLinearSchedule(eps)}
    if name not in table:
        raise ValueError(f"diffusion.schedule: unknown schedule {name!r}; valid: {', '.join(table)}")
    return table[name]()


def sample_t(n: int, t_min: float, stratified: bool, generator: torch.Generator) -> torch.Tensor:
    """n times in [t_min, 1]. Stratified: one draw in each of n equal strata, strata randomly assigned to rows.

    Drawn over the *global* batch of an optimizer step and then sliced, so every process and micro-step sees
    its share of the strata (DUO does this; MDLM only per local batch).
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if stratified:
        u = (torch.randperm(n, generator=generator).double() + u) / n
    return (t_min + (1.0 - t_min) * u).float()


@dataclass
class NoisedBatch:
    noisy_ids: torch.Tensor   # (B, L) with [MASK] at masked positions
    masked: torch.Tensor      # (B, L) bool, never True on pads
    t: torch.Tensor           # (B,)
    weight: torch.Tensor      # (B,) w(t), float32


def noise_mask(t: torch.Tensor, uniforms: torch.Tensor, schedule: NoiseSchedule,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: token i of row b is masked when its uniform is below 1 - alpha(t_b), pads (``~valid``) never.
    Needs no token ids, so it runs wherever the noise is (the trainer draws it on the host)."""
    masked = uniforms < schedule.mask_prob(t)[:, None]
    return masked if valid is None else masked & valid


def apply_noise(input_ids: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, uniforms: torch.Tensor,
                schedule: NoiseSchedule, mask_token_id: int) -> NoisedBatch:
    """Mask each valid token independently with probability 1 - alpha(t); vectorised over the batch."""
    masked = noise_mask(t, uniforms, schedule, valid)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return NoisedBatch(noisy, masked, t, schedule.weight(t.float()))


def diffusion_token_losses(logits_masked: torch.Tensor, targets_masked: torch.Tensor) -> torch.Tensor:
    """Per masked token cross-entropy in float32 (logits of masked positions only: (M, V))."""
    return F.cross_entropy(logits_masked.float(), targets_masked, reduction="none")


def ar_token_losses(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor):
    """Next-token NLL: position i predicts i+1. Returns (per-target NLL (B, L-1), target validity (B, L-1))."""
    tgt_valid = valid[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll * tgt_valid, tgt_valid


def exact_nelbo(logprob_fn, x: torch.Tensor, mask_token_id: int, t_min: float = 0.0,
                positions: list[int] | None = None) -> float:
    """Exact continuous-time NELBO (linear schedule) of one short sequence by enumerating every mask set M.

    With t ~ U[0,1], P(M) = t^|M| (1-t)^(L-|M|) and w = 1/t, so the integral gives the Beta function
    B(|M|, L-|M|+1) = (|M|-1)! (L-|M|)! / L!. For t_min > 0 the integral runs over [t_min, 1] only and is
    divided by (1 - t_min), i.e. exactly what E_{t ~ U[t_min,1]} of the Monte-Carlo estimator targets.
    ``logprob_fn(z) -> (L, V)`` log-probabilities for the partially masked sequence z. ``positions``: only these
    are ever masked (the others, an SFT prompt, stay clean): the conditional NELBO, L = len(positions).
    """
    from scipy.special import beta, betainc

    maskable = list(range(x.numel())) if positions is None else list(positions)
    L = len(maskable)
    total = 0.0
    for k in range(1, L + 1):
        coef = beta(k, L - k + 1)
        if t_min > 0:
            coef = coef * (1.0 - betainc(k, L - k + 1, t_min)) / (1.0 - t_min)
        for M in combinations(maskable, k):
            z = x.clone()
            idx = torch.tensor(M)
            z[idx] = mask_token_id
            lp = logprob_fn(z)
            total += coef * float(-lp[idx, x[idx]].double().sum())
    return total


def exact_block_nelbo(block_logprob_fn, x: torch.Tensor, block_size: int, mask_token_id: int,
                      t_min: float = 0.0) -> float:
    """Exact block-diffusion NELBO (BD3-LM, linear schedule) of one short sequence: the sum over blocks b of
    ``exact_nelbo`` of block b given the clean blocks before it, each block with its own t.
    ``block_logprob_fn(b, z) -> (L', V)`` log-probabilities of block b's positions when block b reads z."""
    return sum(exact_nelbo(lambda z, b=b: block_logprob_fn(b, z), x[b * block_size:(b + 1) * block_size],
                           mask_token_id, t_min) for b in range(x.numel() // block_size))
