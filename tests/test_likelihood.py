"""The NELBO estimators: unbiased against exact enumeration, lower variance than iid t, rank-free noise."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_diffusion import TinyDenoiser

from tdlm.diffusion import CosineSchedule, LinearSchedule, LogLinearSchedule, exact_nelbo
from tdlm.likelihood import NelboEstimator, sequence_nelbo, summarize

pytestmark = pytest.mark.usefixtures("one_thread")
L, MASK = 6, 0
X = torch.tensor([1, 3, 2, 4, 4, 1])


class Wrapped(torch.nn.Module):
    """TinyDenoiser behind the backbone's call signature (ids, attention_mask, logits_index=... or logits_mask=...)."""

    def __init__(self):
        super().__init__()
        self.net = TinyDenoiser(L)

    def forward(self, ids, attention_mask=None, logits_mask=None, logits_index=None):
        return selected(self.net(ids), logits_mask, logits_index)


def selected(logits, logits_mask=None, logits_index=None):
    """The backbone's logit selection: flat positions (``logits_index``), a boolean mask, or everything."""
    if logits_index is not None:
        return logits.flatten(0, 1).index_select(0, logits_index)
    return logits[logits_mask] if logits_mask is not None else logits


def passes_of(estimator, model, n, K, x=X):
    """Evaluate a 'dataset' of n copies of x for K passes; rows as the evaluator gathers them."""
    ids = x.expand(n, x.numel())
    valid = torch.ones_like(ids, dtype=torch.bool)
    idx = torch.arange(n)
    sums = torch.stack([sequence_nelbo(model, ids, *estimator.noise(valid, idx, p), MASK) for p in range(K)], 1)
    return summarize(torch.cat([idx.double()[:, None], valid.double().sum(1, keepdim=True), sums], 1))


@pytest.fixture(scope="module")
def model():
    return Wrapped().eval()


def exact_per_token(model, t_min):
    with torch.no_grad():
        return exact_nelbo(lambda z: F.log_softmax(model.net(z[None])[0], -1), X, MASK, t_min=t_min) / L


@pytest.mark.parametrize("name", ["iid", "stratified", "exact-k"])
def test_estimators_are_unbiased_for_the_truncated_nelbo(model, name):
    t_min = 1e-3
    exact = exact_per_token(model, t_min)
    res = passes_of(NelboEstimator(name, LinearSchedule(), t_min, seed=0, num_sequences=400), model, 400, 24)
    assert res.num_tokens == 400 * L and len(res.per_pass) == 24
    assert abs(res.nelbo_per_token - exact) < 3.5 * res.stderr, (name, res.nelbo_per_token, exact, res.stderr)
    assert res.stderr < 0.015 * exact  # power: a 5% bias would fail


def test_exact_k_with_t_min_zero_is_llada_l_over_k(model):
    est = NelboEstimator("exact-k", LinearSchedule(), 0.0, seed=1, num_sequences=400)
    k = torch.arange(1, 7)
    assert torch.allclose(est.exact_k_weight(k, torch.full_like(k, 6)), 6.0 / k.double(), rtol=1e-15, atol=0)
    exact = exact_per_token(model, 0.0)
    res = passes_of(est, model, 400, 24)
    assert abs(res.nelbo_per_token - exact) < 3.5 * res.stderr and res.stderr < 0.015 * exact


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule(), LogLinearSchedule(0.05)])
def test_exact_k_truncation_weights_integrate_to_the_masked_mass(schedule):
    # A model with a constant per-token loss l gives N = l * L * (m(1) - m(t_min)) / (1 - t_min) for any schedule,
    # and N = l * sum_k c_k under exact-k: the c_k must sum to L (m(1) - m(t_min)) / (1 - t_min).
    t_min, Lv = 0.05, 9
    est = NelboEstimator("exact-k", schedule, t_min, seed=0, num_sequences=1)
    k = torch.arange(1, Lv + 1)
    c = est.exact_k_weight(k, torch.full_like(k, Lv)) * k.double() / Lv
    m = schedule.mask_prob(torch.tensor([t_min, 1.0], dtype=torch.float64))
    assert float(c.sum()) == pytest.approx(Lv * float(m[1] - m[0]) / (1 - t_min), rel=1e-12)
    assert (c - 1).abs().max() > 1e-3  # the truncation is really applied (per k; linear still sums to L)


X32 = torch.randint(1, 5, (32,), generator=torch.Generator().manual_seed(0))


class Memorizer(torch.nn.Module):
    """Knows X32 and is the more confident the fewer tokens are masked: the loss per token grows with t, as in a
    trained model, which is the variance that stratifying t removes."""

    def forward(self, ids, attention_mask=None, logits_mask=None, logits_index=None):
        clean = (ids != MASK).double().mean(1)  # (B,)
        logits = 8.0 * clean[:, None, None] * F.one_hot(X32, 5).double()  # (B, L, V)
        return selected(logits, logits_mask, logits_index)


def test_stratified_and_exact_k_have_lower_variance_than_iid(model):
    # Measured with 200 passes: iid/stratified = 2.45 on the memorizer (exact-k 1.06), iid/exact-k = 3.8 on
    # TinyDenoiser (stratified 1.15): which one helps depends on whether the loss varies more with t or with |M|.
    stderr = {name: passes_of(NelboEstimator(name, LinearSchedule(), 1e-3, 3, 100), Memorizer(), 100, 40, X32).stderr
              for name in ("iid", "stratified")}
    assert stderr["stratified"] < 0.6 * stderr["iid"], stderr
    on_tiny = {name: passes_of(NelboEstimator(name, LinearSchedule(), 1e-3, 3, 100), model, 100, 40).stderr
               for name in ("iid", "exact-k")}
    assert on_tiny["exact-k"] < 0.5 * on_tiny["iid"], on_tiny


def test_noise_is_a_function_of_the_global_index_only():
    est = NelboEstimator("iid", LinearSchedule(), 1e-3, seed=5, num_sequences=10)
    valid = torch.ones(4, 8, dtype=torch.bool)
    valid[1, 5:] = False
    m_a, w_a = est.noise(valid, torch.tensor([3, 7, 1, 9]), pass_idx=2)
    m_b, w_b = est.noise(valid[[2, 0]], torch.tensor([1, 3]), pass_idx=2)  # another batch, other rows
    assert torch.equal(m_a[[2, 0]], m_b) and torch.equal(w_a[[2, 0]], w_b)
    assert not m_a[1, 5:].any()  # pads are never masked
    assert not torch.equal(est.noise(valid, torch.tensor([3, 7, 1, 9]), 3)[0], m_a)  # passes differ
    k_est = NelboEstimator("exact-k", LinearSchedule(), 0.0, seed=5, num_sequences=10)
    masked, weight = k_est.noise(valid, torch.tensor([3, 7, 1, 9]), 0)
    k = masked.sum(1)
    assert not masked[1, 5:].any() and (k >= 1).all()
    assert torch.allclose(weight, valid.sum(1).double() / k.double(), rtol=0, atol=1e-12)


def test_bad_estimator_arguments_name_the_option():
    with pytest.raises(ValueError, match="--estimator.*exact-k"):
        NelboEstimator("antithetic", LinearSchedule(), 1e-3, 0, 1)
    with pytest.raises(ValueError, match="--t-min.*infinite variance"):
        NelboEstimator("iid", LinearSchedule(), 0.0, 0, 1)


def test_summarize_is_order_free_and_reports_per_pass():
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.arange(50).double()[:, None], torch.full((50, 1), 4.0),
                      torch.rand(50, 3, generator=g, dtype=torch.float64)], 1)
    a, b = summarize(rows), summarize(rows[torch.randperm(50, generator=g)])
    assert a.nelbo_per_token == b.nelbo_per_token and a.stderr == b.stderr
    per_pass = rows[:, 2:].sum(0) / 200
    assert a.per_pass == per_pass.tolist() and math.isclose(a.nelbo_per_token, float(per_pass.mean()))
    assert math.isclose(a.stderr, float(per_pass.std()) / math.sqrt(3))
    assert summarize(rows[:, :3]).stderr is None
