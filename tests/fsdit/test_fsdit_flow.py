"""Tests for tdlm/fsdit/flow.py against exactly solvable velocity fields and closed-form losses, and for the EMA
FSDiT trains with (``tdlm.engine.optim.make_ema``, shared by every task)."""

import pytest
import torch
import torch.nn as nn

from tdlm.engine.optim import ema_decay, make_ema
from tdlm.fsdit.flow import (
    cfg_combine,
    euler_integrate,
    flow_loss,
    guided_velocity,
    heun_integrate,
    interpolate,
    sample,
    sample_t,
    t_bin_index,
    target_velocity,
)
from tdlm.fsdit.model import FSDiT, FSDiTConfig


# Tiny models: one intra-op thread (spinning OpenMP threads on 2 shared cores slow them ~100x).
pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianField(nn.Module):
    """Exact marginal velocity when the data is N(mu, sigma^2) per pixel and the noise N(0, 1).

    x_t = t x + (1 - t) eps is Gaussian with mean t mu and std s(t) = sqrt((1-t)^2 + t^2 sigma^2); the ODE flow is
    x_t = t mu + s(t) eps, so v(x, t) = mu + s'(t)/s(t) (x - t mu) and the endpoint at t=1 is mu + sigma eps.
    ``cond`` (if given) shifts mu, and the null condition uses mu_null: a model whose CFG output is known.
    """

    def __init__(self, mu: float, sigma: float, mu_null: float = 0.0):
        super().__init__()
        self.mu, self.sigma, self.mu_null = mu, sigma, mu_null

    def forward(self, x, t, cond=None, drop=None):
        t = t.view(-1, 1, 1, 1).double()
        mu = torch.full((x.shape[0], 1, 1, 1), self.mu, dtype=torch.float64)
        if cond is None:
            mu[:] = self.mu_null
        elif drop is not None:
            mu[drop] = self.mu_null
        s2 = (1 - t) ** 2 + t**2 * self.sigma**2
        ds_over_s = (t * self.sigma**2 - (1 - t)) / s2
        return (mu + ds_over_s * (x.double() - t * mu)).to(x.dtype)


def test_interpolate_endpoints_and_target():
    x, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    assert torch.equal(interpolate(x, eps, torch.zeros(3)), eps)
    assert torch.equal(interpolate(x, eps, torch.ones(3)), x)
    t = torch.tensor([0.25, 0.5, 0.75])
    mid = interpolate(x, eps, t)
    assert torch.allclose(mid[1], 0.5 * (x[1] + eps[1]))
    # d x_t / dt by finite differences equals the target x - eps
    fd = (interpolate(x, eps, t + 1e-3) - interpolate(x, eps, t - 1e-3)) / 2e-3
    assert torch.allclose(fd, target_velocity(x, eps), atol=1e-3)


def test_loss_is_zero_for_a_perfect_predictor_and_known_for_zero():
    x, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)

    class Oracle(nn.Module):
        def forward(self, x_t, t, cond, drop=None):
            return x - eps

    loss, t = flow_loss(Oracle(), x, None, noise=eps, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (5,) and torch.all(loss == 0) and torch.all((t >= 0) & (t < 1))

    class Zero(nn.Module):
        def forward(self, x_t, t, cond, drop=None):
            return torch.zeros_like(x_t)

    loss, _ = flow_loss(Zero(), x, None, noise=eps, t=torch.full((5,), 0.3))
    assert torch.allclose(loss, (x - eps).pow(2).mean(dim=(1, 2, 3)))  # per-sample mean over C, H, W


def test_flow_loss_with_the_real_model_backpropagates():
    model = FSDiT(FSDiTConfig(image_size=8, hidden_size=24, depth=1, num_heads=2, cond_dim=6)).train()
    x = torch.zeros(4, 3, 8, 8)
    loss, _ = flow_loss(model, x, torch.randn(4, 6), generator=torch.Generator().manual_seed(0))
    # Zero-initialised output: the loss is E[eps^2] over 192 values per sample, i.e. about 1.
    assert loss.mean().item() == pytest.approx(1.0, abs=0.15)
    loss.mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_t_bin_index_edges_and_uniform_occupancy():
    t = torch.tensor([0.0, 0.05, 0.1, 0.55, 0.999, 1.0])
    assert t_bin_index(t).tolist() == [0, 0, 1, 5, 9, 9]
    counts = torch.bincount(t_bin_index(sample_t(100_000, generator=torch.Generator().manual_seed(0))), minlength=10)
    assert torch.all((counts > 9_700) & (counts < 10_300))  # 10% each; binomial std is 95
    ln = sample_t(100_000, "logit_normal", generator=torch.Generator().manual_seed(0))
    edge = (t_bin_index(ln) == 0).float().mean().item()
    assert edge == pytest.approx(0.0141, abs=0.002)  # P(sigmoid(z) < 0.1) = Phi(-2.197)


def test_euler_lands_exactly_on_a_single_data_point():
    # Data = one point x*: the marginal velocity (x* - x)/(1 - t) is constant (= x* - eps) along the trajectory,
    # so Euler is exact for any number of steps.
    g = torch.Generator().manual_seed(0)
    x_star, eps = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
    field = lambda x, t: (x_star - x) / (1 - t.view(-1, 1, 1, 1).double())  # noqa: E731
    for steps in (1, 3, 50):
        assert torch.allclose(euler_integrate(field, eps, steps), x_star, atol=1e-10)


def convergence_ratios(fn, velocity, x0, exact, steps=(16, 32, 64)):
    """err(n) / err(2n): about 2 for a first-order method, about 4 for a second-order one."""
    errs = [(fn(velocity, x0, n) - exact).abs().max().item() for n in steps]
    return [a / b for a, b in zip(errs, errs[1:])], errs[-1]


def test_heun_is_second_order_on_a_linear_ode():
    # dx/dt = -2 x: x(1) = exp(-2) x(0).
    x0 = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = torch.exp(torch.tensor(-2.0, dtype=torch.float64)) * x0
    ratios, _ = convergence_ratios(euler_integrate, lambda x, t: -2 * x, x0, exact)
    assert all(1.9 < r < 2.1 for r in ratios)
    ratios, err = convergence_ratios(heun_integrate, lambda x, t: -2 * x, x0, exact)
    assert all(3.8 < r < 4.3 for r in ratios) and err < 2e-4  # measured 4.20, 4.10


def test_samplers_converge_to_the_exact_gaussian_flow():
    # Time-dependent linear field of N(0.5, 0.5^2) data: the exact endpoint is 0.5 + 0.5 eps.
    field = GaussianField(mu=0.5, sigma=0.5)
    eps = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = lambda x, t: field(x, t, cond=torch.zeros(4, 1))  # noqa: E731
    ratios, err_euler = convergence_ratios(euler_integrate, v, eps, 0.5 + 0.5 * eps)
    assert all(1.85 < r < 2.1 for r in ratios)  # measured 1.96, 1.98
    ratios, err_heun = convergence_ratios(heun_integrate, v, eps, 0.5 + 0.5 * eps)
    assert all(3.4 < r < 4.3 for r in ratios) and err_heun < 2e-4 < 0.03 < err_euler  # measured 3.64, 3.83


def test_cfg_scales_on_the_real_model():
    torch.manual_seed(0)
    model = FSDiT(FSDiTConfig(image_size=8, hidden_size=24, depth=1, num_heads=2, cond_dim=6)).eval()
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
        x, t, cond = torch.randn(3, 3, 8, 8), torch.rand(3), torch.randn(3, 6)
        v_c, v_u = model(x, t, cond), model(x, t, None)
        assert torch.allclose(guided_velocity(model, x, t, cond, 1.0), v_c, atol=1e-6)
        assert torch.allclose(guided_velocity(model, x, t, cond, 0.0), v_u, atol=1e-5)  # batched path, s = 0
        assert torch.allclose(guided_velocity(model, x, t, cond, 3.0), v_u + 3 * (v_c - v_u), atol=1e-5)
    assert torch.equal(cfg_combine(torch.zeros(2), torch.ones(2), 1.0), torch.ones(2))


def test_guided_sampler_reaches_the_extrapolated_mean():
    # Conditional data N(1, 0.5^2), null data N(0, 0.5^2): with s=2 the guided velocity is that of mu = 2 exactly
    # (the fields are affine in mu), so the sampler must end at 2 + 0.5 * eps for every channel.
    field = GaussianField(mu=1.0, sigma=0.5, mu_null=0.0)
    g = torch.Generator().manual_seed(3)
    out = sample(field, torch.zeros(6, 1), (6, 3, 4, 4), steps=40, method="heun", cfg_scale=2.0, generator=g)
    eps = torch.randn((6, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, 2.0 + 0.5 * eps, atol=1e-3)


def test_sampling_is_deterministic_given_the_generator():
    torch.manual_seed(0)
    model = FSDiT(FSDiTConfig(image_size=8, hidden_size=24, depth=1, num_heads=2, cond_dim=6)).eval()
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.1)
    cond = torch.randn(2, 6)
    run = lambda seed, method: sample(  # noqa: E731
        model, cond, (2, 3, 8, 8), steps=4, method=method, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed)
    )
    for method in ("euler", "heun"):
        a, b, c = run(7, method), run(7, method), run(8, method)
        assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="fsdit.sample.method"):
        run(7, "rk4")


def test_ema_warmup_decay_and_updates():
    assert ema_decay(0, 0.9999).item() == pytest.approx(0.1)
    assert ema_decay(1, 0.9999).item() == pytest.approx(2 / 11)
    assert ema_decay(10_000, 0.999).item() == pytest.approx(0.999)
    model = nn.Linear(1, 1, bias=False)
    ema = make_ema(model, decay=0.5)
    expected = None
    for step, value in enumerate([4.0, 2.0, 8.0, 0.0, 1.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        if step == 0:
            expected = value  # the first update copies
        else:
            d = min(0.5, (1 + step) / (10 + step))
            expected = d * expected + (1 - d) * value
        assert ema.module.weight.item() == pytest.approx(expected)
    assert not any(p.requires_grad for p in ema.parameters())
    # n_averaged lives in the state dict, so a resumed EMA continues the warm-up where it stopped
    clone = make_ema(model, decay=0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.n_averaged.item() == 5 and clone.module.weight.item() == pytest.approx(expected)


def test_ema_copies_buffers_and_tracks_the_real_model():
    model = FSDiT(FSDiTConfig(image_size=8, hidden_size=24, depth=1, num_heads=2, cond_dim=6))
    ema = make_ema(model)
    ema.update_parameters(model)
    assert torch.equal(ema.module.pos_embed, model.pos_embed)
    with torch.no_grad():
        model.null_y.add_(1.0)
    before = ema.module.null_y.clone()
    ema.update_parameters(model)  # n = 1: d = 2/11
    assert torch.allclose(ema.module.null_y, before + (9 / 11) * 1.0, atol=1e-6)


def test_a_cpu_generator_works_for_any_target_device():
    # torch.randn(..., generator=cpu_gen, device="cuda") raises; the draw happens on the generator's device.
    t = sample_t(4, generator=torch.Generator().manual_seed(0), device="meta")
    assert t.device.type == "meta" and t.shape == (4,)
    a = sample_t(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(0)))


def test_stratified_t_hits_every_stratum_once_with_the_same_marginal():
    g = torch.Generator().manual_seed(0)
    for dist in ("uniform", "logit_normal"):
        t = sample_t(20, dist, generator=g, stratified=True)
        u = t if dist == "uniform" else torch.special.ndtr(torch.logit(t.double()))  # back to the uniform scale
        assert sorted((u * 20).long().tolist()) == list(range(20)) and 0 <= t.min() and t.max() < 1
    many = torch.cat([sample_t(10, generator=g, stratified=True) for _ in range(5000)])
    assert float(many.mean()) == pytest.approx(0.5, abs=0.003) and float(many.var()) == pytest.approx(1 / 12, abs=0.002)
    assert torch.bincount(t_bin_index(sample_t(10, generator=g, stratified=True)), minlength=10).tolist() == [1] * 10
