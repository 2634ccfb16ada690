"""Health rules: each one forced to fire, kept quiet on healthy values, overridden from YAML; the NaN stop; the
thresholds relative to what the data allows; the plateau rule's memory."""

import json
import math
from pathlib import Path

import pytest

from tdlm.config import ConfigError, load_config
from tdlm.metrics.health import HealthMonitor
from tdlm.metrics.text_health import TEXT_RULES
from tdlm.engine.faults import TrainingStopped
from tdlm.tasks import text_engine

from conftest import poison_loss

HEALTHY = {
    "train/loss": 2.0, "metrics/mask_accuracy": 0.7, "research/low_corruption_accuracy": 0.9,
    "research/medium_corruption_accuracy": 0.7, "research/high_corruption_accuracy": 0.4,
    "research/weight_difficulty_correlation": -0.3, "research/gradient_norm_ratio_high_to_low": 0.8,
    "research/gradient_norm_low_corruption": 1.0, "research/gradient_norm_high_corruption": 0.8,
    "val/loss": 2.1, "diffusion/t_mean": 0.51,
}
FIRES = {  # one change each that must fire exactly the named rule
    "nonfinite_loss": {"train/loss": math.nan},
    "mask_accuracy_low": {"metrics/mask_accuracy": 0.17},  # below 0.9 x the unigram accuracy 0.2 of BASELINES
    "high_above_medium_accuracy": {"research/high_corruption_accuracy": 0.75},
    "bucket_zero_accuracy": {"research/high_corruption_accuracy": 0.0},
    "weight_difficulty_correlation_sign": {"research/weight_difficulty_correlation": 0.2},
    "gradient_ratio_extreme": {"research/gradient_norm_ratio_high_to_low": 12.0},
    "high_corruption_gradient_vanishing": {"research/gradient_norm_high_corruption": 0.005,
                                           "research/gradient_norm_ratio_high_to_low": 0.5},
    "low_corruption_gradient_exploding": {"research/gradient_norm_low_corruption": 6.0,
                                          "research/gradient_norm_ratio_high_to_low": 0.5},
    "val_train_gap": {"val/loss": 2.5},
    "t_mean_off": {"diffusion/t_mean": 0.6},
}


BASELINES = {"unigram_accuracy": 0.2, "optimal_loss": None}  # what build_text_metrics gets from the data


def fired(values, step=1000, overrides=None, warmup=100, baselines=BASELINES):
    flags, hits = HealthMonitor(TEXT_RULES, overrides, warmup_steps=warmup, baselines=baselines).check(step, values)
    return flags, {r.name for r, _ in hits}, hits


def test_healthy_values_fire_nothing_and_flag_zero():
    flags, names, _ = fired(HEALTHY)
    assert names == set()
    assert flags == {f"health/{r.name}": 0.0 for r in TEXT_RULES}


@pytest.mark.parametrize("rule", sorted(FIRES))
def test_each_rule_fires(rule, capsys):
    flags, names, hits = fired({**HEALTHY, **FIRES[rule]})
    assert names == {rule}
    assert flags[f"health/{rule}"] == 1.0
    message = hits[0][1]
    assert message.startswith(f"health/{rule} at step 1000") and "\n" not in message
    assert [r.stop for r, _ in hits] == [rule == "nonfinite_loss"]


def test_a_rule_that_keeps_firing_warns_once_until_it_clears(capsys):
    from tdlm.metrics.core import MetricRunner

    class Rows:
        def __init__(self):
            self.rows = []

        def log(self, values, step):
            self.rows.append((step, values["health/mask_accuracy_low"]))

    sink = Rows()
    runner = MetricRunner([], {"essential": 1}, last_step=10**6, sinks=[sink],
                          health=HealthMonitor(TEXT_RULES, {}, warmup_steps=100, baselines=BASELINES))
    healthy = {k: v for k, v in HEALTHY.items() if k != "val/loss"}  # an unchanging val/loss would be a plateau
    low = {**healthy, **FIRES["mask_accuracy_low"]}
    for step, values in [(1000, low), (1100, low), (1200, low), (1300, healthy), (1400, low), (1500, low)]:
        runner.log(step, values)
    assert sink.rows == [(1000, 1.0), (1100, 1.0), (1200, 1.0), (1300, 0.0), (1400, 1.0), (1500, 1.0)]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("warning: health/mask_accuracy_low at step 1000: ")
    assert lines[1] == "health/mask_accuracy_low cleared at step 1300"
    assert lines[2].startswith("warning: health/mask_accuracy_low at step 1400: ")
    # the firing state is part of the checkpointed health memory
    again = HealthMonitor(TEXT_RULES, {}, warmup_steps=100, baselines=BASELINES)
    again.load_state_dict(runner.health.state_dict())
    again.check(1600, low)
    assert again.started == [] and again.firing == {"mask_accuracy_low"}


def test_low_side_of_the_gradient_ratio_and_inf_loss():
    assert fired({**HEALTHY, "research/gradient_norm_ratio_high_to_low": 0.09})[1] == {"gradient_ratio_extreme"}
    assert fired({**HEALTHY, "train/loss": math.inf})[1] == {"nonfinite_loss"}


def test_nan_inputs_and_warmup_skip_rules():
    # an empty bucket is NaN: it neither fires bucket_zero_accuracy nor high_above_medium
    flags, names, _ = fired({**HEALTHY, "research/high_corruption_accuracy": math.nan})
    assert names == set() and "health/high_above_medium_accuracy" not in flags
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.1}, step=50)[1] == set()  # before warm-up ends
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.1}, step=100)[1] == {"mask_accuracy_low"}


def test_rules_read_the_latest_value_of_the_other_input():
    mon = HealthMonitor(TEXT_RULES)
    assert mon.check(100, {"train/loss": 2.0})[1] == []
    flags, hits = mon.check(100, {"val/loss": 3.0})  # eval logged separately: train/loss is remembered
    assert [r.name for r, _ in hits] == ["val_train_gap"]


def test_yaml_overrides_thresholds_enable_and_reject_unknown():
    values = {**HEALTHY, "metrics/mask_accuracy": 0.45}
    assert fired(values)[1] == set()
    assert fired(values, overrides={"mask_accuracy_low": {"min": 0.5}})[1] == {"mask_accuracy_low"}  # a hard floor
    assert fired(values, overrides={"mask_accuracy_low": {"unigram_accuracy": 0.6}})[1] == {"mask_accuracy_low"}
    assert fired({**HEALTHY, "diffusion/t_mean": 0.9}, overrides={"t_mean_off": {"enabled": False}})[1] == set()
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.1}, step=150,
                 overrides={"mask_accuracy_low": {"after_step": 200}})[1] == set()
    # a positive correlation is healthy for a weighting that grows with difficulty
    assert fired({**HEALTHY, "research/weight_difficulty_correlation": 0.3},
                 overrides={"weight_difficulty_correlation_sign": {"expected_sign": 1}})[1] == set()
    with pytest.raises(ConfigError, match="metrics.health.mask_acc: unknown health rule"):
        HealthMonitor(TEXT_RULES, {"mask_acc": {"min": 0.1}})
    with pytest.raises(ConfigError, match=r"metrics.health.mask_accuracy_low.minimum: unknown parameter"):
        HealthMonitor(TEXT_RULES, {"mask_accuracy_low": {"minimum": 0.1}})
    with pytest.raises(ConfigError, match=r"metrics.health.t_mean_off.enabled: expected a bool"):
        HealthMonitor(TEXT_RULES, {"t_mean_off": {"enabled": 0}})


def test_trainer_rejects_bad_health_override(tiny):
    with pytest.raises(ConfigError, match="metrics.health.nope"):
        text_engine(load_config(None, tiny(**{"metrics.health": "{nope: {min: 1}}"})))


def test_nan_loss_logs_saves_the_record_and_stops(tiny, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, 6)  # from step 6 on
    engine = text_engine(load_config(None, tiny(**{"trainer.max_steps": 8})))
    try:
        with pytest.raises(TrainingStopped, match=r"health/nonfinite_loss at step 6.*last good checkpoint: "
                                                  r"step_0000004"):
            engine.fit()
    finally:
        engine.close()
    rd = tmp_path / "runs" / "t"
    recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 6 and recs[-1]["health/nonfinite_loss"] == 1.0 and recs[-1]["train/loss"] == "nan"
    stopped = json.loads((rd / "stopped.json").read_text())
    assert stopped["step"] == 6 and stopped["rule"] == "nonfinite_loss"
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step_0000004"]  # nothing poisoned saved
    assert "warning: health/nonfinite_loss at step 6" in capsys.readouterr().err


def test_accuracy_floor_is_relative_to_the_unigram_baseline():
    # 0.3 is below the metric design's 40% but far above what token frequencies alone give (0.2): no alarm
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.3})[1] == set()
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.181})[1] == set()   # floor 0.9 x 0.2 = 0.18
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.179})[1] == {"mask_accuracy_low"}
    # a corpus dominated by one token: 0.45 is worse than predicting it every time
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.45}, baselines={"unigram_accuracy": 0.6})[1] == {
        "mask_accuracy_low"}
    # nothing measured (baselines not passed): only the hard floor min (0 by default) remains
    assert fired({**HEALTHY, "metrics/mask_accuracy": 0.01}, baselines=None)[1] == set()
    _, hits = HealthMonitor(TEXT_RULES, warmup_steps=100, baselines=BASELINES).check(
        1000, {"metrics/mask_accuracy": 0.1})
    assert hits[0][1] == ("health/mask_accuracy_low at step 1000: " + hits[0][0].description +
                          " (metrics/mask_accuracy=0.1; fraction=0.9, unigram_accuracy=0.2, min=0)")


def plateau_flags(losses, baselines=BASELINES, overrides=None, start=100, every=100):
    mon = HealthMonitor(TEXT_RULES, overrides, warmup_steps=start, baselines=baselines)
    return [mon.check(start + i * every, {"val/loss": x})[0]["health/val_loss_plateau"] for i, x in
            enumerate(losses)], mon


def test_val_loss_plateau_fires_after_patience_evaluations_without_improvement():
    # a model that does not move (lr=0: the same weights and validation noise give the same loss) fires at the
    # 4th evaluation: the 1st sets the best, then 3 (patience) without a gain
    flags, mon = plateau_flags([5.0, 5.0, 5.0, 5.0, 5.0])
    assert flags == [0, 0, 0, 1, 1] and mon.memory["val_loss_plateau"] == {"best": 5.0, "evals_since_best": 4}
    # still learning, slowly: 0.2% per evaluation is a gain (min_improvement 0.1%)
    assert plateau_flags([5.0 * 0.998 ** i for i in range(10)])[0] == [0] * 10
    # a creep of 0.05% per evaluation adds up: the best moves once it has gained 0.1%, so this never fires
    assert plateau_flags([5.0 * 0.9995 ** i for i in range(10)])[0] == [0] * 10
    # rising (overfitting) is no improvement either; a later gain clears it
    assert plateau_flags([5.0, 5.1, 5.2, 5.3, 4.9])[0] == [0, 0, 0, 1, 0]
    # near a known optimum (markov: the entropy per token) a flat loss is convergence, not a stall
    near = {"unigram_accuracy": 0.2, "optimal_loss": 1.73}
    assert plateau_flags([1.76] * 6, baselines=near)[0] == [0] * 6   # 1.7% above: within tolerance 2%
    assert plateau_flags([1.80] * 6, baselines=near)[0] == [0, 0, 0, 1, 1, 1]  # 4% above
    assert plateau_flags([5.0] * 4, overrides={"val_loss_plateau": {"patience": 1}})[0] == [0, 1, 1, 1]
    # before the end of warm-up the rule is not evaluated (and counts nothing)
    mon = HealthMonitor(TEXT_RULES, warmup_steps=100)
    assert "health/val_loss_plateau" not in mon.check(50, {"val/loss": 5.0})[0]
    assert mon.memory["val_loss_plateau"] == {}


def test_plateau_memory_is_checkpointed():
    _, mon = plateau_flags([5.0, 5.0, 5.0])
    again = HealthMonitor(TEXT_RULES, warmup_steps=100, baselines=BASELINES)
    again.load_state_dict(json.loads(json.dumps(mon.state_dict())))  # trainer_state.json round trip
    assert again.check(400, {"val/loss": 5.0})[0]["health/val_loss_plateau"] == 1.0
    fresh = HealthMonitor(TEXT_RULES, warmup_steps=100, baselines=BASELINES)
    assert fresh.check(400, {"val/loss": 5.0})[0]["health/val_loss_plateau"] == 0.0
    # a checkpoint whose rule has since been disabled restores the rest
    off = HealthMonitor(TEXT_RULES, {"val_loss_plateau": {"enabled": False}})
    off.load_state_dict(mon.state_dict())
    assert off.memory == {}


DEMOS = json.loads((Path(__file__).parent / "data" / "demo_health_inputs.json").read_text())
"""What the rules read at every log of full runs of the shipped text demos (``python tdlm/train.py
configs/<demo>.yaml``, one thread, before the rules became relative), with the baselines of their data."""


@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_no_rule_fires_on_a_shipped_demo_while_it_learns(demo):
    rec = DEMOS[demo]
    mon = HealthMonitor(TEXT_RULES, warmup_steps=rec["warmup_steps"], baselines=rec["baselines"])
    fired_at = [(step, r.name) for step, values in rec["logs"] for r, _ in mon.check(step, values)[1]]
    assert fired_at == []
    # the recording is of a learning run that the old fixed 40% floor flagged at nearly every log
    acc = [v["metrics/mask_accuracy"] for s, v in rec["logs"] if "metrics/mask_accuracy" in v and s >= 50]
    if acc:
        assert sum(a < 0.4 for a in acc) >= len(acc) - 2 and acc[-1] > 1.3 * rec["baselines"]["unigram_accuracy"]
    val = [v["val/loss"] for _, v in rec["logs"] if "val/loss" in v]
    assert len(val) >= 4 and all(b < a for a, b in zip(val, val[1:]))  # every evaluation improved


def test_a_run_with_lr_zero_fires(tiny, tmp_path, one_thread):
    """The same tiny run that learns with a learning rate: with lr=0 the model never beats the unigram baseline
    and its validation loss never moves."""
    engine = text_engine(load_config(None, tiny(**{"optim.lr": 0, "trainer.max_steps": 16, "metrics.console": False,
                                                   "trainer.save_every_n_steps": 100})))
    try:
        baselines = engine.task.data.baselines()
        engine.fit()
    finally:
        engine.close()
    assert 0.2 < baselines["unigram_accuracy"] < 0.35 and baselines["optimal_loss"] == pytest.approx(1.028, abs=1e-3)
    recs = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in recs if "health/mask_accuracy_low" in r}
    assert [s for s, r in by_step.items() if r["health/mask_accuracy_low"]] == list(range(2, 17))  # after warm-up
    assert {s: r["metrics/mask_accuracy"] for s, r in by_step.items()}[16] < 0.9 * baselines["unigram_accuracy"]
    vals = [(r["step"], r["val/loss"], r["health/val_loss_plateau"]) for r in recs if "val/loss" in r]
    assert [s for s, _, _ in vals] == [4, 8, 12, 16] and len({v for _, v, _ in vals}) == 1  # it never moved
    assert [f for _, _, f in vals] == [0, 0, 0, 1]  # the 1st sets the best, 3 more without a gain
