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


def test_malformed_yaml_names_the_line_of_the_mistake(tmp_path):
    # PyYAML notices these a line late; the message starts at the line to fix and says where it was noticed
    msg = err(tmp_path, "model:\n  hidden_size: 32\n  num_layers: [1, 2\ntrainer: {}\n")
    assert msg.startswith("malformed YAML in ") and "c.yaml line 3, column 15: flow sequence not closed (" in msg
    assert msg.endswith("at line 4, column 8)")
    msg = err(tmp_path, "model:\n  hidden_size 32\n  num_layers: 2\n")  # a key without its colon
    assert "c.yaml line 2, column 3: 'hidden_size 32' runs on into line 3 " in msg
    assert msg.endswith("mapping values are not allowed here, at line 3, column 13")
    msg = err(tmp_path, "trainer:\n  run_name: 'abc\n  seed: 1\n")
    assert "c.yaml line 2, column 13: quoted scalar not closed (found unexpected end of stream" in msg
    # noticed on the line of the mistake: that line, as PyYAML gives it
    assert "c.yaml line 3, column 1: found character '\\t' that cannot start any token" in err(
        tmp_path, "model:\n  hidden_size: 32\n\tnum_layers: 2\n")


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


def test_out_of_range_values_and_cadences(tmp_path):
    # the mask ratio 1 - alpha(t) is bounded through t in [t_min, 1]
    assert "diffusion.t_min" in err(tmp_path, overrides=["diffusion.t_min=-0.1"])
    assert "diffusion.loglinear_eps" in err(tmp_path, overrides=["diffusion.loglinear_eps=1"])
    assert "diffusion.clip_weight" in err(tmp_path, overrides=["diffusion.clip_weight=-1"])
    for key in ("metrics.logging_steps", "trainer.save_every_n_steps", "trainer.eval_every_n_steps"):
        assert key in err(tmp_path, overrides=[f"{key}=0"])
    assert "trainer.eval_every_n_steps" in err(tmp_path, overrides=["metrics.logging_steps=100",
                                                                     "trainer.eval_every_n_steps=150"])
    assert "optim.beta2" in err(tmp_path, overrides=["optim.beta2=1.0"])
    assert "optim.min_lr_ratio" in err(tmp_path, overrides=["optim.min_lr_ratio=1.5"])
    assert "trainer.min_free_disk_mb" in err(tmp_path, overrides=["trainer.min_free_disk_mb=-5"])
    assert "model.dropout" in err(tmp_path, overrides=["model.dropout=1"])


def test_wrong_type_in_yaml_names_key_and_value(tmp_path):
    msg = err(tmp_path, "optim:\n  lr: fast\n")
    assert "optim.lr" in msg and "'fast'" in msg
    assert "trainer.keep_last" in err(tmp_path, "trainer:\n  keep_last: 2.5\n")
    assert err(tmp_path, "data:\n  paths: 3\n") == "data.paths: expected list, got int (3)"  # a string is one path
    assert err(tmp_path, "trainer: 3\n").startswith("trainer: expected a mapping")


def test_optional_and_literal_fields_through_the_generic_loader(tmp_path):
    from dataclasses import dataclass, field
    from typing import Literal

    from tdlm.engine.config import build_config, read_config_data

    @dataclass
    class Section:
        path: str | None = None
        mode: Literal["a", "b"] = "a"

    @dataclass
    class Root:
        s: Section = field(default_factory=Section)

    cfg = build_config(Root, read_config_data(None, ["s.path=null", "s.mode=b"]))
    assert cfg.s.path is None and cfg.s.mode == "b"
    assert build_config(Root, read_config_data(None, ["s.path=x"])).s.path == "x"
    with pytest.raises(ConfigError, match=r"^s.mode: 'c' is not one of a, b$"):
        build_config(Root, read_config_data(None, ["s.mode=c"]))
    with pytest.raises(ConfigError, match=r"^s.path: expected str, got int"):
        build_config(Root, read_config_data(None, ["s.path=3"]))
