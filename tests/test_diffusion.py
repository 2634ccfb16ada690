"""The mathematics: schedules and weights, masking statistics, the NELBO against exact enumeration, AR loss."""

import math

import torch
import torch.nn.functional as F

from tdlm.diffusion import (CosineSchedule, LinearSchedule, LogLinearSchedule, apply_noise, ar_token_losses,
                            diffusion_token_losses, exact_nelbo, make_schedule, sample_t)


def test_linear_weight_is_one_over_t():
    t = torch.tensor([1e-3, 0.1, 0.25, 0.5, 0.9, 1.0])
    assert torch.equal(LinearSchedule().weight(t), 1.0 / t)
    # loglinear: alpha = 1 - (1-eps) t, so -alpha'/(1-alpha) = (1-eps)/((1-eps) t) = 1/t as well
    assert torch.allclose(LogLinearSchedule(1e-3).weight(t.double()), 1.0 / t.double(), rtol=1e-12)


def test_weights_match_autograd_derivative():
    for sched in (LinearSchedule(), CosineSchedule(), LogLinearSchedule(1e-3)):
        t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
        (da,) = torch.autograd.grad(sched.alpha(t).sum(), t)
        expected = -da / (1 - sched.alpha(t))
        assert torch.allclose(sched.weight(t.detach()), expected.detach(), rtol=1e-10), sched.name
    assert abs(float(CosineSchedule().alpha(torch.tensor(0.0))) - 1.0) < 1e-12
    assert abs(float(CosineSchedule().alpha(torch.tensor(1.0)))) < 1e-7


def test_unknown_schedule_names_valid_ones():
    try:
        make_schedule("quadratic")
    except ValueError as e:
        assert "linear" in str(e) and "quadratic" in str(e)
    else:
        raise AssertionError("no error")


def test_stratified_t_has_one_draw_per_stratum():
    g = torch.Generator().manual_seed(0)
    n = 64
    t = sample_t(n, 0.0, True, g)
    strata = torch.floor(t * n).long().sort().values
    assert torch.equal(strata, torch.arange(n))
    t2 = sample_t(4096, 1e-3, False, torch.Generator().manual_seed(1))
    assert t2.min() >= 1e-3 and t2.max() <= 1.0 and abs(float(t2.mean()) - 0.5005) < 0.02


def test_mask_rate_matches_one_minus_alpha_and_pads_untouched():
    B, L, mask_id, pad = 2000, 64, 1, 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50, (B, L), generator=g)
    ids[:, 48:] = pad
    valid = ids != pad
    for sched in (LinearSchedule(), CosineSchedule()):
        t = torch.rand(B, generator=g)
        nb = apply_noise(ids, valid, t, torch.rand(B, L, generator=g), sched, mask_id)
        assert not nb.masked[:, 48:].any() and torch.equal(nb.noisy_ids[:, 48:], ids[:, 48:])
        assert torch.equal(nb.noisy_ids[~nb.masked], ids[~nb.masked])
        assert (nb.noisy_ids[nb.masked] == mask_id).all()
        p = sched.mask_prob(t).double()
        count = nb.masked.double().sum(1)
        expected, var = (48 * p).sum(), (48 * p * (1 - p)).sum()
        z = (count.sum() - expected) / var.sqrt()
        assert abs(float(z)) < 4, float(z)
        # per-row masking rate tracks that row's t (variable-ratio masking)
        r = torch.corrcoef(torch.stack([count / 48, p]))[0, 1]
        assert r > 0.95


class TinyDenoiser(torch.nn.Module):
    """A fixed random bidirectional model over a 5-token vocabulary (id 0 = [MASK])."""

    def __init__(self, L, V=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(V, 8, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(L, 8, generator=g))
        self.mix = torch.nn.Parameter(torch.randn(8, 8, generator=g) / 3)
        self.out = torch.nn.Parameter(torch.randn(8, V, generator=g))

    def forward(self, z):  # (B, L) -> (B, L, V), every position sees every other
        h = self.emb[z] + self.pos
        h = h + torch.tanh(h.mean(1, keepdim=True) @ self.mix)
        return h @ self.out


def test_monte_carlo_nelbo_equals_exact_enumeration():
    L, mask_id, t_min = 6, 0, 1e-3
    model = TinyDenoiser(L)
    x = torch.tensor([1, 3, 2, 4, 4, 1])
    with torch.no_grad():
        exact = exact_nelbo(lambda z: F.log_softmax(model(z[None])[0], -1), x, mask_id, t_min=t_min)
        sched = LinearSchedule()
        g = torch.Generator().manual_seed(0)
        n = 40000
        ids = x.expand(n, L)
        t = sample_t(n, t_min, True, g)
        nb = apply_noise(ids, torch.ones_like(ids, dtype=torch.bool), t, torch.rand(n, L, generator=g), sched, mask_id)
        logits = model(nb.noisy_ids)
        rows = torch.arange(n)[:, None].expand(n, L)[nb.masked]
        ce = diffusion_token_losses(logits[nb.masked], ids[nb.masked])
        per_seq = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, nb.weight[rows].double() * ce.double())
    mc, se = float(per_seq.mean()), float(per_seq.std() / math.sqrt(n))
    assert abs(mc - exact) < 3 * se, (mc, exact, se)
    assert se < 0.02 * exact  # the test has power: a 6% error would fail
    # the untruncated integral is the closed form sum_M (|M|-1)!(L-|M|)!/L! sum_i -log p
    logp = lambda z: F.log_softmax(model(z[None])[0], -1).detach()  # noqa: E731
    full = exact_nelbo(logp, x, mask_id, t_min=0.0)
    by_factorials = 0.0
    from itertools import combinations
    for k in range(1, L + 1):
        coef = math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L)
        for M in combinations(range(L), k):
            z = x.clone()
            z[list(M)] = mask_id
            by_factorials += coef * sum(-float(logp(z)[i, x[i]]) for i in M)
    assert abs(full - by_factorials) < 1e-9 * full
    assert abs(full - exact) < 0.01 * full  # truncating at t_min=1e-3 moves the bound by O(t_min)


def test_exact_nelbo_of_a_perfect_independent_model_is_its_entropy():
    # If p(x_i | anything) = q_i independently, the NELBO equals sum_i -log q_i (weights integrate to 1 per token).
    L, V = 4, 3
    q = torch.tensor([[0.2, 0.5, 0.3]] * L)
    x = torch.tensor([0, 1, 2, 1]) + 1  # shift: id 0 is the mask
    logp = torch.zeros(L, V + 1)
    logp[:, 1:] = q.log()
    val = exact_nelbo(lambda z: logp, x, 0)
    assert abs(val - float(-q[torch.arange(L), x - 1].log().sum())) < 1e-10


def test_ar_loss_is_mean_next_token_nll():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 7, 11
    logits = torch.randn(B, L, V, generator=g)
    ids = torch.randint(1, V, (B, L), generator=g)
    ids[2, 5:] = 0
    valid = ids != 0
    nll, tv = ar_token_losses(logits, ids, valid)
    manual, count = 0.0, 0
    for b in range(B):
        for i in range(L - 1):
            if valid[b, i + 1]:
                manual += float(-F.log_softmax(logits[b, i], -1)[ids[b, i + 1]])
                count += 1
    assert int(tv.sum()) == count == 3 * 6 - 2
    assert abs(float(nll.sum() / tv.sum()) - manual / count) < 1e-5


def test_gumbel_argmax_samples_the_softmax_and_never_a_forbidden_token():
    from tdlm.sampling import gumbel_argmax

    logits = torch.tensor([[-torch.inf, 0.0, 1.0, 2.0]]).expand(20000, 4)
    draws = gumbel_argmax(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 20000
    p = torch.softmax(torch.tensor([-torch.inf, 0.0, 1.0, 2.0], dtype=torch.float64), 0)
    assert freq[0] == 0 and torch.allclose(freq, p, atol=0.015)
