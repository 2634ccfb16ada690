"""Config loading: every bad input is one clear line naming the key, file or value."""

import pytest

from tdlm.config import ConfigError, load_config


def err(tmp_path, text=None, overrides=()):
    path = None
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["trainer.max_steps=50", "optim.lr=3e-4", "data.paths=[a.txt]", "model.causal=true"])
    assert cfg.trainer.max_steps == 50 and cfg.optim.lr == 3e-4 and cfg.data.paths == ["a.txt"] and cfg.model.causal


def test_unknown_key_names_nearest(tmp_path):
    msg = err(tmp_path, "trainer:\n  max_step: 10\n")
    assert "trainer.max_step" in msg and "trainer.max_steps" in msg
    assert "optim.learning_rate" in err(tmp_path, overrides=["optim.learning_rate=1"])
    assert "'modle'" in err(tmp_path, "modle:\n  hidden_size: 3\n")


def test_wrong_type_and_range(tmp_path):
    assert "trainer.max_steps" in err(tmp_path, "trainer:\n  max_steps: ten\n")
    assert "trainer.max_steps" in err(tmp_path, overrides=["trainer.max_steps=0"])
    assert "diffusion.t_min" in err(tmp_path, overrides=["diffusion.t_min=1.5"])
    assert "diffusion.schedule" in err(tmp_path, overrides=["diffusion.schedule=quadratic"])
    assert "model.causal" in err(tmp_path, overrides=["model.causal=maybe"])


def test_malformed_yaml_gives_line(tmp_path):
    msg = err(tmp_path, "model:\n  hidden_size: 32\n  num_layers: [1, 2\ntrainer: {}\n")
    assert "c.yaml" in msg and "line" in msg


def test_missing_file_and_consistency(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    assert "data.seq_len" in err(tmp_path, overrides=["data.seq_len=1024", "model.max_seq_len=512"])
    assert "metrics.detailed_metrics_steps" in err(tmp_path, overrides=["metrics.logging_steps=100",
                                                                        "metrics.detailed_metrics_steps=250"])
    assert "data.paths" in err(tmp_path, overrides=["data.source=files"])


def test_metric_cadences_must_be_multiples_of_logging_steps(tmp_path):
    msg = err(tmp_path, overrides=["metrics.logging_steps=100", "metrics.attention_analysis_steps=2050"])
    assert msg.startswith("metrics.attention_analysis_steps: 2050 is not a multiple of metrics.logging_steps 100")
    msg = err(tmp_path, overrides=["metrics.logging_steps=100", "trainer.eval_every_n_steps=50"])
    assert msg.startswith("trainer.eval_every_n_steps: 50 is not a multiple of metrics.logging_steps 100")
    cfg = load_config(None, ["metrics.logging_steps=100", "trainer.eval_every_n_steps=300",
                             "metrics.detailed_metrics_steps=500", "metrics.attention_analysis_steps=2000"])
    assert cfg.metrics.tiers.essential.enabled and not cfg.metrics.tiers.research.enabled
    assert "metrics.tiers.research.enabld" in err(tmp_path, overrides=["metrics.tiers.research.enabld=true"])
