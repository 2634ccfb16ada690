"""Two CPU processes (gloo) log the same metric values as one process over the same global batch."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tdlm.config import load_config
from tdlm.tasks import text_engine

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("train/tokens_per_second", "summary/training_time_hours")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path) -> dict:
    """step -> merged record (the summary shares the last step's)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec.pop("step"), {}).update(rec)
    return out


@pytest.mark.slow
def test_two_process_metrics_equal_one_process(tiny, tmp_path):
    every = {"metrics.tiers.research.enabled": True, "metrics.tiers.advanced.enabled": True,
             "trainer.max_steps": 4, "metrics.logging_steps": 1, "metrics.detailed_metrics_steps": 2,
             "metrics.attention_analysis_steps": 2, "trainer.eval_every_n_steps": 2, "trainer.grad_accum_steps": 2,
             "metrics.console": False}
    config = ROOT / "configs" / "markov.yaml"
    one = text_engine(load_config(config, tiny(**every, **{"trainer.micro_batch_size": 8, "trainer.run_name": "one",
                                                                "data.eval_batches": 2})))
    try:
        one.fit()
    finally:
        one.close()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tdlm" / "train.py"), str(config),
           *tiny(**every, **{"trainer.micro_batch_size": 4, "trainer.run_name": "two",
                             "data.eval_batches": 2})]  # the same 32 validation rows: 2 global batches of 16
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_dir = tmp_path / "runs" / "two"
    assert yaml.safe_load((two_dir / "config.yaml").read_text())["world_size"] == 2  # really two processes

    a, b = records(tmp_path / "runs" / "one"), records(two_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert set(a[step]) == set(b[step]), step
        for key, x in a[step].items():
            if key in TIMING:
                continue
            y = b[step][key]
            if isinstance(x, str) or (isinstance(x, float) and math.isnan(x)):
                assert str(x) == str(y), (step, key)
            else:
                assert y == pytest.approx(x, rel=2e-5, abs=1e-7), (step, key, x, y)
    assert "research/gradient_norm_low_corruption" in a[2] and "advanced/attention_entropy_layer1" in a[4]
