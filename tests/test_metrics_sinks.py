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


def test_media_values_become_wandb_media_and_are_skipped_by_the_console(tmp_path, monkeypatch, capsys):
    import numpy as np

    from tdlm.metrics.media import Histogram, Image

    logged = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: SimpleNamespace(id="x", define_metric=lambda *a, **k: None, log=logged.append,
                                             finish=lambda: None)
    fake.Settings = lambda **kw: None
    fake.Histogram = lambda np_histogram: ("hist", np_histogram)
    fake.Image = lambda pixels, caption=None: ("image", pixels.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbSink(SimpleNamespace(mode="offline", project="p", entity="", tags=[]), tmp_path / "run", {})
    hist, img = Histogram((1.0, 2.0), (0.0, 0.5, 1.0)), Image(np.zeros((4, 6, 3), np.uint8), "grid")
    sink.log({"cond/h": hist, "samples/cfg_1": img, "train/loss": 1.0}, 3)
    assert logged == [{"trainer/global_step": 3, "cond/h": ("hist", ([1.0, 2.0], [0.0, 0.5, 1.0])),
                       "samples/cfg_1": ("image", (4, 6, 3), "grid"), "train/loss": 1.0}]
    ConsoleSink().log({"cond/h": hist, "samples/cfg_1": img, "train/loss": 1.0}, 3)
    assert capsys.readouterr().out == "step 3 | train/loss 1\n"
    jsonl = JsonlSink(tmp_path / "m.jsonl")
    jsonl.log({"cond/h": hist, "samples/cfg_1": img}, 3)
    jsonl.close()
    rec = json.loads((tmp_path / "m.jsonl").read_text())
    assert rec["cond/h"] == {"counts": [1.0, 2.0], "edges": [0.0, 0.5, 1.0]}
    assert rec["samples/cfg_1"] == "media/samples_cfg_1_step0000003.png" and (tmp_path / rec["samples/cfg_1"]).is_file()
