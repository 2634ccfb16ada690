"""Sinks: the JSONL record, the console line, and wandb's shared x-axis and prefix groups (fake wandb module)."""

import json
import math
import sys
import types
from types import SimpleNamespace

from tdlm.metrics.core import MetricSpec
from tdlm.metrics.sinks import ConsoleSink, JsonlSink, WandbSink


def test_jsonl_and_console(tmp_path, capsys):
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.log({"train/loss": 1.5, "val/loss": math.nan}, 3)
    sink.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 3, "train/loss": 1.5, "val/loss": "nan"}
    ConsoleSink().log({"train/loss": 1.23456, "health/t_mean_off": 1.0}, 7)
    assert capsys.readouterr().out == "step 7 | train/loss 1.235 | health/t_mean_off 1\n"


def test_wandb_panels_share_the_global_step_and_group_by_prefix(tmp_path, monkeypatch):
    calls = []

    class Run:
        id = "abc"

        def define_metric(self, name, **kw):
            calls.append((name, kw))

        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish", {}))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: Run()
    fake.Settings = lambda **kw: None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    specs = [MetricSpec("train/loss", "nats", "", "min"), MetricSpec("research/x", "1", ""),
             MetricSpec("advanced/e_layer{i}", "nats", "", "max")]
    cfg = SimpleNamespace(mode="offline", project="p", entity="", tags=[])
    sink = WandbSink(cfg, tmp_path / "run", {}, specs=specs)
    sink.log({"train/loss": 2.0}, 5)
    sink.close()
    defined = {name: kw for name, kw in calls if name not in ("log", "finish")}
    for prefix in ("train/*", "research/*", "advanced/*", "health/*", "*"):
        assert defined[prefix] == {"step_metric": "trainer/global_step"}
    assert defined["train/loss"] == {"step_metric": "trainer/global_step", "summary": "min"}
    assert "advanced/e_layer{i}" not in defined  # a family template is not a metric name
    assert ("log", {"trainer/global_step": 5, "train/loss": 2.0}) in calls
