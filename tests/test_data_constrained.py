"""The data-constrained mode: ``data.unique_tokens`` and ``trainer.max_epochs`` give the epochs asked for, with a
validation at every epoch end; the FLOPs counter against a hand count; bad input; the R_D* fit on curves made
from its own model."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tdlm.config import ConfigError, load_config
from tdlm.tasks import text_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
import data_constrained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_epochs_of_a_unique_token_budget_with_validation_at_each_epoch_end(tiny):
    # 40 rows of 32 tokens (every Markov row is full), 8 rows per micro-batch x 2 accumulation: 2.5 steps per
    # epoch, so 3 epochs are round(7.5) = 8 steps and the epoch ends fall inside steps 3 and 5, after 8
    cfg = load_config(None, tiny(**{"data.unique_tokens": 40 * 32 - 5, "trainer.max_steps": "null",
                                    "trainer.max_epochs": 3, "trainer.grad_accum_steps": 2,
                                    "trainer.eval_every_n_steps": 100, "trainer.save_every_n_steps": 100}))
    engine = text_engine(cfg)
    try:
        result = engine.fit()
        assert len(engine.task.train_set) == 40 and cfg.trainer.max_steps == 8
    finally:
        engine.close()
    recs = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r.get("train/epoch")) for r in recs if "val/loss" in r]
    assert evals == [(3, 1.0), (5, 2.0), (8, 3.0)]  # 10 micro-batches per epoch: steps 3, 5 and 8 finish one
    assert result["summary/unique_tokens"] == 40 * 32 and result["summary/total_steps"] == 8


def test_flops_counter_equals_a_hand_count(tiny):
    cfg = load_config(None, tiny(**{"trainer.max_steps": 4}))
    engine = text_engine(cfg)
    try:
        result = engine.fit()
        vocab = engine.task.model.config.vocab_size
    finally:
        engine.close()
    d, layers, ff, L, rows = 32, 2, 128, 32, 8  # ff: the default 64 * ceil(8 d / 3 / 64)
    # per layer: fused qkv 3 d^2, output projection d^2, SwiGLU gate+up 2 d ff, down ff d; the tied head V d once
    n_matmul = layers * (4 * d * d + 3 * d * ff) + vocab * d
    per_token = 6 * n_matmul + 12 * layers * L * d
    recs = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    flops = {r["step"]: r["train/flops"] for r in recs if "train/flops" in r}
    assert flops == {s: s * rows * L * per_token for s in (1, 2, 3, 4)}
    assert result["summary/flops"] == 4 * rows * L * per_token


def test_bad_input_one_clear_line(tiny):
    with pytest.raises(ConfigError, match=r"trainer.max_epochs: 2 set together with trainer.max_steps=8"):
        load_config(None, tiny(**{"trainer.max_epochs": 2}))
    with pytest.raises(ConfigError, match=r"trainer.max_steps: null needs trainer.max_epochs > 0"):
        load_config(None, tiny(**{"trainer.max_steps": "null"}))
    with pytest.raises(ConfigError, match=r"trainer.max_epochs: must be >= 0"):
        load_config(None, tiny(**{"trainer.max_steps": "null", "trainer.max_epochs": -1}))
    cfg = load_config(None, tiny(**{"data.unique_tokens": 10**9}))
    with pytest.raises(ConfigError, match=r"data.unique_tokens: 1,000,000,000 exceeds the training split's"):
        text_engine(cfg)


def test_effective_data_fit_recovers_its_own_parameters():
    """Curves made from the model itself (Muennighoff et al. 2023, eq. 5 with a fixed model size) with a little
    noise: the fit finds R_D* inside its stated uncertainty, for a short and a long half-life."""
    rng = np.random.default_rng(0)
    unique = 1e6
    epochs = np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=float)
    for true in ({"E": 1.8, "B": 300.0, "beta": 0.35, "r_star": 15.0}, {"E": 1.5, "B": 200.0, "beta": 0.3,
                                                                         "r_star": 400.0}):
        loss = data_constrained.loss_model(epochs, unique, **true) + rng.normal(0, 2e-4, epochs.size)
        fit = data_constrained.fit_effective_data(epochs, loss, unique)
        lo, hi = fit["r_star_interval"]
        assert lo <= true["r_star"] <= hi, (true, fit)
        assert abs(np.log(fit["r_star"] / true["r_star"])) < 0.5


def test_crossover_needs_ar_ahead_first():
    def runs(losses):
        return {e: {"v": v, "flops": 10 * e} for e, v in zip((1, 2, 4, 8), losses)}

    ar = runs([3.0, 2.5, 2.4, 2.6])
    assert data_constrained.crossover(ar, runs([3.1, 2.7, 2.3, 2.2]), "v")["epochs"] == 4
    assert not data_constrained.crossover(ar, runs([2.9, 2.7, 2.5, 2.7]), "v")["seen"]  # AR ahead at the end
    assert not data_constrained.crossover(ar, runs([2.9, 2.4, 2.3, 2.2]), "v")["seen"]  # diffusion ahead throughout
