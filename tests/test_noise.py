"""The training estimators of the NELBO (``diffusion.estimator``, ``tdlm/noise.py``): each unbiased for the same
number as the exact enumeration, through the training loss path; the importance weights integrate exactly; the
validation bound does not depend on the estimator; bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_likelihood import Wrapped

from tdlm.config import ConfigError, load_config
from tdlm.diffusion import exact_nelbo, make_schedule
from tdlm.noise import TrainingNoise, power_proposal_ratio, power_proposal_t
from tdlm.objective import sequence_sums
from tdlm.tasks import MaskedDiffusionTask, text_engine

MASK, PAD = 0, 9
X = torch.tensor([1, 3, 2, 4, 4, 1])


@pytest.mark.parametrize("estimator", ["bernoulli", "exact-k", "importance"])
def test_training_loss_is_unbiased_for_the_exact_nelbo(estimator):
    """The mean of the training loss over many noise draws equals the exact enumeration NELBO (L = 6) within
    3 standard errors: the loss path the trainer runs (``MaskedDiffusionTask.outputs``), iid draws."""
    t_min, n, chunks = 1e-3, 4000, 5
    model = Wrapped().eval()
    task = SimpleNamespace(pad_id=PAD, mask_id=MASK, never_mask=(),
                           noise=TrainingNoise(estimator, make_schedule("linear"), t_min, stratified=False))
    g = torch.Generator().manual_seed(11)
    rows = []
    with torch.no_grad():
        for _ in range(chunks):
            noise = task.noise.draw(g, n, X.numel())
            out = MaskedDiffusionTask.outputs(task, model, {"input_ids": X.expand(n, -1)}, noise)
            rows.append(sequence_sums(out)[:, 0])
            assert float(out.loss_sum) == pytest.approx(float(rows[-1].sum()), rel=1e-5)  # what is differentiated
    est = torch.cat(rows)
    with torch.no_grad():
        exact = exact_nelbo(lambda z: model(z[None])[0].log_softmax(-1), X, MASK, t_min)
    stderr = float(est.std() / math.sqrt(est.numel()))
    assert abs(float(est.mean()) - exact) < 3 * stderr, (float(est.mean()), exact, stderr)
    assert stderr < 0.05 * exact  # a real test: the estimate is tight


def test_exact_k_and_importance_spread_less_than_bernoulli():
    """Same draws budget: the per-row spread (the research tier's nelbo_row_std) of exact-k and of the
    importance proposal is below the Bernoulli estimator's on the tiny denoiser."""
    model, spread = Wrapped().eval(), {}
    for estimator in ("bernoulli", "exact-k", "importance"):
        task = SimpleNamespace(pad_id=PAD, mask_id=MASK, never_mask=(),
                               noise=TrainingNoise(estimator, make_schedule("linear"), 1e-3, stratified=False))
        noise = task.noise.draw(torch.Generator().manual_seed(5), 20000, X.numel())
        with torch.no_grad():
            spread[estimator] = float(sequence_sums(MaskedDiffusionTask.outputs(
                task, model, {"input_ids": X.expand(20000, -1)}, noise))[:, 0].std())
    assert spread["exact-k"] < 0.5 * spread["bernoulli"] and spread["importance"] < spread["bernoulli"], spread


@pytest.mark.parametrize("schedule, t_min, power", [("linear", 1e-3, 0.5), ("cosine", 1e-2, 0.3)])
def test_importance_weights_integrate_to_the_nelbo(schedule, t_min, power):
    """A denoiser whose CE is the same constant c on every masked token has NELBO per token
    E_t[w(t) m(t)] c = (alpha(t_min) - alpha(1)) / (1 - t_min) c: closed form. Under the proposal the weights
    w p/q, averaged over its inverse-CDF midpoints, integrate to exactly that; and q is the density of the
    inverse CDF (p/q = (1 - t_min)^-1 dt/du)."""
    sched = make_schedule(schedule)
    n = 200_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = power_proposal_t(u, t_min, power)
    ratio = power_proposal_ratio(t, t_min, power)
    integral = float((sched.weight(t) * ratio * sched.mask_prob(t)).mean())
    a = sched.alpha(torch.tensor([t_min, 1.0], dtype=torch.float64))
    assert integral == pytest.approx(float(a[0] - a[1]) / (1 - t_min), rel=1e-4)
    dt_du = torch.diff(t) * n
    torch.testing.assert_close(ratio[1:], dt_du / (1 - t_min), rtol=2e-3, atol=0)
    assert t.min() >= t_min and t.max() <= 1.0
    assert float((t < 0.1).double().mean()) > 0.1  # more mass at small t than uniform: the point of it


def test_validation_bound_does_not_depend_on_the_estimator(tiny):
    """The same initial model scores the same val/loss whatever the training estimator: validation keeps its
    own fixed Bernoulli noise."""
    values = {}
    for estimator in ("bernoulli", "exact-k", "importance"):
        engine = text_engine(load_config(None, tiny(**{"diffusion.estimator": estimator,
                                                       "trainer.run_name": estimator})))
        try:
            values[estimator] = engine.task.evaluate(engine.model, None)
        finally:
            engine.close()
    b = values["bernoulli"]
    assert float(b.count) > 0 and all(torch.equal(v.loss_sum, b.loss_sum) for v in values.values())


def test_a_short_exact_k_run_learns_and_logs_its_spread(tiny, tmp_path):
    engine = text_engine(load_config(None, tiny(**{"diffusion.estimator": "exact-k", "trainer.max_steps": 8,
                                                   "metrics.tiers.research.enabled": True})))
    try:
        result = engine.fit()
    finally:
        engine.close()
    assert math.isfinite(result["val/loss"]) and result["research/nelbo_row_std"] > 0
    assert result["diffusion/t_mean"] == pytest.approx(0.5, abs=0.05)


def test_bad_estimator_settings_are_one_clear_error(tiny):
    with pytest.raises(ConfigError, match=r"diffusion.estimator: 'antithetic' is not one of bernoulli, exact-k"):
        load_config(None, tiny(**{"diffusion.estimator": "antithetic"}))
    with pytest.raises(ConfigError, match=r"diffusion.proposal_power: must be in \[0, 1\)"):
        load_config(None, tiny(**{"diffusion.estimator": "importance", "diffusion.proposal_power": 1.5}))
    with pytest.raises(ConfigError, match=r"diffusion.estimator: exact-k is a masked-diffusion estimator"):
        load_config(None, tiny(**{"diffusion.estimator": "exact-k", "model.causal": True}))


def test_exact_k_resume_is_exact(tiny, tmp_path):
    """Stopped after step 4 and resumed: the same losses as the uninterrupted run, bit for bit."""
    common = {"diffusion.estimator": "exact-k", "trainer.max_steps": 8, "trainer.save_every_n_steps": 4,
              "trainer.eval_every_n_steps": 4}

    def losses(name, stop_at=None, **extra):
        engine = text_engine(load_config(None, tiny(**common, **extra, **{"trainer.run_name": name})))
        try:
            engine.fit(stop_at)
        finally:
            engine.close()
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["train/loss"], r.get("val/loss")) for r in rows if "train/loss" in r}

    full = losses("full")
    losses("part", stop_at=4)
    resumed = losses("part", **{"trainer.resume": "auto"})
    assert sorted(resumed) == sorted(full) == list(range(1, 9)) and resumed == full
