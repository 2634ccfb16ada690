"""Health rules: each one forced to fire, kept quiet on healthy values, overridden from YAML; the NaN stop."""

import json
import math

import pytest
import torch

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
    "mask_accuracy_low": {"metrics/mask_accuracy": 0.39},
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


def fired(values, step=1000, overrides=None, warmup=100):
    flags, hits = HealthMonitor(TEXT_RULES, overrides, warmup_steps=warmup).check(step, values)
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
                          health=HealthMonitor(TEXT_RULES, {}, warmup_steps=100))
    low = {**HEALTHY, **FIRES["mask_accuracy_low"]}
    for step, values in [(1000, low), (1100, low), (1200, low), (1300, HEALTHY), (1400, low), (1500, low)]:
        runner.log(step, values)
    assert sink.rows == [(1000, 1.0), (1100, 1.0), (1200, 1.0), (1300, 0.0), (1400, 1.0), (1500, 1.0)]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("warning: health/mask_accuracy_low at step 1000: ")
    assert lines[1] == "health/mask_accuracy_low cleared at step 1300"
    assert lines[2].startswith("warning: health/mask_accuracy_low at step 1400: ")
    # the firing state is part of the checkpointed health memory
    again = HealthMonitor(TEXT_RULES, {}, warmup_steps=100)
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
    assert fired(values, overrides={"mask_accuracy_low": {"min": 0.5}})[1] == {"mask_accuracy_low"}
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
