"""Flow matching for FSDiT: the linear noise-to-data path, the velocity loss, CFG, Euler/Heun samplers and EMA.

Convention (SiT ``ICPlan``, torchcfm, ``flow_matching.CondOTProbPath``): t=0 is pure noise, t=1 is data,

    x_t = (1 - t) * eps + t * x,        target velocity v* = d x_t / dt = x - eps.

minRF uses the opposite direction; do not mix the two. The loss is the per-sample MSE averaged over C, H, W, with
t ~ U(0, 1) by default. Unlike the original code, t is never clipped for x_t alone: the model sees the t that made x_t.

Guidance is v = v_u + s * (v_c - v_u) on every channel (s = 1 is the plain conditional model; DiT/SiT guide only
the first 3 channels, DiT #41). Samplers integrate dx/dt = v from t=0 to t=1 on a uniform grid and are
deterministic given a ``torch.Generator`` (it only draws the starting noise).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn as nn

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (B, C, H, W), t (B,)) -> velocity (B, C, H, W)."""


# ----------------------------------------------------------------------------------------------------------------
# Path and loss


def _draw(fn, shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Draw on the generator's own device, then move: a CPU generator then gives the same numbers on any device
    (torch.randn refuses a CPU generator with device='cuda')."""
    src = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=src, dtype=dtype).to(device)


def sample_t(
    n: int,
    dist: Literal["uniform", "logit_normal"] = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    stratified: bool = False,
) -> torch.Tensor:
    """Training times, (n,) float32 in [0, 1). logit_normal = sigmoid(N(0, 1)), SD3's choice and the original code's.

    ``stratified``: one uniform u per stratum [i/n, (i+1)/n), randomly permuted, then mapped through the
    distribution's inverse CDF (identity; sigmoid(Φ⁻¹(u))). Each t still has the chosen marginal, but every
    1/n of probability mass is hit exactly once per call: lower variance, and with n >= 10 every t-bin is filled.
    """
    if dist not in ("uniform", "logit_normal"):
        raise ValueError(f"fsdit.flow.t_dist must be 'uniform' or 'logit_normal', got {dist!r}")
    if stratified:
        u = (torch.arange(n, dtype=torch.float64) + _draw(torch.rand, (n,), generator, "cpu", torch.float64)) / n
        perm = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
        u = u[perm.cpu()]
        t = u if dist == "uniform" else torch.sigmoid(torch.special.ndtri(u))
        return t.float().to(device)
    if dist == "uniform":
        return _draw(torch.rand, (n,), generator, device)
    return torch.sigmoid(_draw(torch.randn, (n,), generator, device))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) * noise + t * x, with t (B,) broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - t) * noise + t * x


def target_velocity(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v* = x - noise: the velocity of the straight path, independent of t."""
    return x - noise


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) x 2 -> (B,): mean squared error over everything but the batch dimension, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def flow_loss(
    model: nn.Module,
    x: torch.Tensor,
    cond: torch.Tensor | None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    aux: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity-matching loss per sample.

    Draws t ~ U(0, 1) and eps ~ N(0, I) unless given (pass both to evaluate on a fixed validation set).
    ``drop`` is forwarded to the model (None: the model's own per-sample CFG dropout in training mode).
    ``aux``, when given, receives the detached ``x_t``, ``noise``, ``v_pred`` and ``v_target`` (B, C, H, W), and
    whatever the model records there (t_emb, y_emb, c), for the metric collectors.

    Returns:
        (loss (B,) fp32, t (B,)); the caller takes ``loss.mean()`` and bins ``t`` with ``t_bin_index``.
    """
    B = x.shape[0]
    if t is None:
        t = sample_t(B, generator=generator, device=x.device)
    if noise is None:
        noise = _draw(torch.randn, x.shape, generator, x.device, x.dtype)
    x_t = interpolate(x, noise, t)  # (B, C, H, W)
    pred = model(x_t, t, cond, drop=drop) if aux is None else model(x_t, t, cond, drop=drop, aux=aux)
    target = target_velocity(x, noise)  # (B, C, H, W)
    if aux is not None:
        aux.update(x_t=x_t.detach(), noise=noise.detach(), v_pred=pred.detach(), v_target=target.detach())
    return per_sample_mse(pred, target), t


def t_bin_index(t: torch.Tensor, num_bins: int = 10) -> torch.Tensor:
    """Bin k holds t in [k/K, (k+1)/K); t = 1 goes to the last bin. (B,) long, for ``index_add_``/``bincount``."""
    return (t * num_bins).long().clamp_(0, num_bins - 1)


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_u + s * (v_c - v_u) on all channels: s = 0 unconditional, s = 1 conditional, s > 1 guided."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float = 1.0
) -> torch.Tensor:
    """The CFG velocity of ``model`` at (x, t). One forward for s = 1 (or cond None), otherwise one batched forward
    over [x, x] with the second half dropped to the null vector."""
    B = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    t = t.expand(B) if t.dim() == 0 else t
    if cond is None or scale == 1.0:
        drop = None if cond is None else torch.zeros(B, dtype=torch.bool, device=x.device)
        return model(x, t, cond, drop=drop)
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop=drop)  # (2B, C, H, W)
    v_cond, v_uncond = v.chunk(2)
    return cfg_combine(v_uncond, v_cond, scale)


# ----------------------------------------------------------------------------------------------------------------
# Samplers: dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data)


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 times for a float64 state (exact grids in tests and analyses), float32 otherwise (never bf16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def euler_integrate(velocity: VelocityFn, x0: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """x_{k+1} = x_k + dt * v(x_k, t_k), t_k = k / steps. ``steps`` network evaluations."""
    x, dt = x0, 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), k * dt, device=x.device, dtype=_time_dtype(x))
        x = x + dt * velocity(x, t)
    return x


@torch.no_grad()
def heun_integrate(velocity: VelocityFn, x0: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """Heun (explicit trapezoid, 2nd order): predictor x~ = x + dt v(x, t), corrector x + dt/2 (v(x, t) + v(x~, t+dt)).

    2 * steps network evaluations. The last step is a full Heun step: the velocity parameterisation is finite at
    t = 1 (no 1/(1-t) factor), so there is no reason to fall back to Euler there.
    """
    x, dt = x0, 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), k * dt, device=x.device, dtype=_time_dtype(x))
        v = velocity(x, t)
        v_next = velocity(x + dt * v, t + dt)
        x = x + 0.5 * dt * (v + v_next)
    return x


@torch.no_grad()
def sample(
    model: nn.Module,
    cond: torch.Tensor | None,
    shape: tuple[int, ...],
    steps: int = 50,
    method: Literal["euler", "heun"] = "euler",
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate images (shape = (B, C, H, W)) from noise drawn with ``generator``; same generator seed, same output.
    The noise is drawn on the generator's device and moved to ``device``, so a CPU generator gives the same
    starting noise on CPU and GPU. ``noise`` (of ``shape``) is the starting noise itself, instead of a draw (one
    generator per sample: ``tdlm.fsdit.fewshot``).

    ``steps`` is the number of integration steps (Heun costs 2 network evaluations per step, Euler 1).
    Put the model (usually the EMA copy) in eval mode first, so that no condition is dropped at random.
    """
    noise = _draw(torch.randn, shape, generator, device) if noise is None else noise.to(device)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_velocity(model, x, t, cond, cfg_scale)

    if method == "euler":
        return euler_integrate(velocity, noise, steps)
    if method == "heun":
        return heun_integrate(velocity, noise, steps)
    raise ValueError(f"fsdit.sample.method must be 'euler' or 'heun', got {method!r}")
