"""Faults: SIGKILL and a crash mid-checkpoint resume bitwise, SIGTERM checkpoints and exits 0, NaN stops cleanly."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import poison_loss
import torch

from conftest import tiny_overrides
from tdlm.engine.checkpoint import list_checkpoints, read_state
from tdlm.config import load_config
from tdlm.engine.faults import NonFiniteWatch, StopSignal
from tdlm.engine.faults import TrainingStopped
from tdlm.tasks import text_engine
from tdlm.tasks import cli as main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "markov.yaml")
# Small enough for seconds, with everything a resume must restore: EMA, accumulation, a mid-epoch position.
RESUME = {"trainer.max_steps": 8, "trainer.save_every_n_steps": 4, "trainer.eval_every_n_steps": 4,
          "trainer.ema_decay": 0.9, "data.markov_tokens": 6000, "trainer.micro_batch_size": 4,
          "trainer.grad_accum_steps": 2}


def run(overrides, stop_at=None):
    engine = text_engine(load_config(CONFIG, overrides))  # the same base config as the subprocess runs
    try:
        return engine.fit(stop_at), engine
    finally:
        engine.close()


def records(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def launch(overrides, fault=None, timeout=300, **popen):
    """``python tests/fault_entry.py`` in a subprocess, with this process's thread count (bitwise comparisons)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    if fault:
        env["TDLM_TEST_FAULT"] = fault
    cmd = [sys.executable, str(ROOT / "tests" / "fault_entry.py"), CONFIG, *overrides]
    if popen:
        return subprocess.Popen(cmd, env=env, text=True, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never interrupted (computed once for the module)."""
    tmp = tmp_path_factory.mktemp("full")
    run(tiny_overrides(tmp, **RESUME))
    return losses(tmp / "runs" / "t")


@pytest.mark.parametrize("fault", ["sigkill:6", "kill_in_save:8"])
def test_killed_run_resumes_bitwise(uninterrupted, tmp_path, fault):
    """SIGKILL between checkpoints, or in the middle of writing one: the resumed run's losses are bitwise equal."""
    overrides = tiny_overrides(tmp_path, **RESUME)
    proc = launch(overrides, fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    rd = tmp_path / "runs" / "t"
    assert [p.name for p in list_checkpoints(rd / "checkpoints")] == ["step_0000004"]
    if fault.startswith("kill_in_save"):
        partial = rd / "checkpoints" / ".tmp_step_0000008"
        assert partial.is_dir() and not (partial / "trainer_state.json").exists()  # really killed mid-write
    assert max(losses(rd)) > 4  # it logged steps that the resume has to redo

    result, _ = run(tiny_overrides(tmp_path, **RESUME, **{"trainer.resume": "auto"}))
    resumed = losses(rd)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == uninterrupted  # bitwise, every step
    assert not list((rd / "checkpoints").glob(".tmp_*"))  # the half-written checkpoint was cleaned up
    assert result["summary/total_steps"] == 8


def test_resume_continues_the_wandb_run_and_keeps_secrets_out(tmp_path, monkeypatch, capfd):
    secret, token = "wandb-secret-0123456789abcdef0123456789abcdef", "hf_secret_token_0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", token)
    extra = {**RESUME, "trainer.max_steps": 6, "wandb.enabled": True, "wandb.mode": "offline"}
    run(tiny_overrides(tmp_path, **extra), stop_at=4)
    rd = tmp_path / "runs" / "t"
    first = read_state(rd / "checkpoints" / "step_0000004")["wandb_id"]
    run(tiny_overrides(tmp_path, **extra, **{"trainer.resume": "auto"}))
    assert read_state(rd / "checkpoints" / "step_0000006")["wandb_id"] == first
    runs = sorted(p.name for p in (rd / "wandb").glob("offline-run-*"))
    # one wandb run, continued; two sessions started in the same second get a "-1" suffix on the directory
    ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", name).group(1) for name in runs]
    assert ids == [first, first], runs
    out = capfd.readouterr()
    for path in [p for p in rd.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        assert secret.encode() not in data and token.encode() not in data, path
    assert secret not in out.out + out.err and token not in out.out + out.err


def test_sigterm_writes_checkpoint_and_exits_zero(tmp_path):
    """A real SIGTERM from outside: checkpoint at the step reached, exit 0, a message saying how to resume."""
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 100000, "trainer.save_every_n_steps": 50000,
                                            "trainer.eval_every_n_steps": 50000, "metrics.logging_steps": 1})
    rd = tmp_path / "runs" / "t"
    proc = launch(overrides, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((rd / "metrics.jsonl").is_file() and len(losses(rd)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    ckpts = list_checkpoints(rd / "checkpoints")
    step = read_state(ckpts[-1])["step"]
    assert len(ckpts) == 1 and step == max(losses(rd)) >= 2  # saved exactly where it stopped
    assert f"stopped by SIGTERM after step {step}" in out and "trainer.resume=auto" in out
    # and it resumes from there
    result, _ = run(overrides + [f"trainer.max_steps={step + 1}", "trainer.resume=auto"])  # later ones win
    assert result["summary/total_steps"] == step + 1


@pytest.mark.parametrize("logging_steps, save_every, kept", [(2, 4, [4]), (8, 2, [2, 4])])
def test_nan_stops_before_saving_the_poisoned_state(tiny, tmp_path, monkeypatch, capsys, logging_steps, save_every,
                                                    kept):
    """NaN at step 6, caught at the log step 6 or before the save at step 6: the message names step 6 and no
    checkpoint after step 4 exists."""
    poison_loss(monkeypatch, 6, 6)
    overrides = tiny(**{"trainer.max_steps": 12, "metrics.logging_steps": logging_steps,
                        "trainer.save_every_n_steps": save_every, "metrics.detailed_metrics_steps": 8,
                        "trainer.eval_every_n_steps": 8,
                        "metrics.attention_analysis_steps": 8})
    kept = [f"step_{s:07d}" for s in kept]
    # caught by the nonfinite_loss health rule (log step 6) or by the watch before the save at step 6
    with pytest.raises(TrainingStopped, match=r"at step 6[:;] "):
        run(overrides)
    rd = tmp_path / "runs" / "t"
    assert [p.name for p in list_checkpoints(rd / "checkpoints")] == kept
    capsys.readouterr()
    assert main([CONFIG, *overrides, "trainer.overwrite=true"]) == 3
    health_notes = ("warning: ", "health/")  # a rule starting or clearing to fire on the tiny run is not an error
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(health_notes)]
    assert len(err) == 1 and "step 6" in err[0] and "step_0000004" in err[0]
    assert [p.name for p in list_checkpoints(rd / "checkpoints")] == kept


def test_stop_signal_and_non_finite_watch_units():
    stop = StopSignal().install()
    try:
        stop.push(stop.flag("cpu"))
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM  # the handler only records it
        stop.push(stop.flag("cpu"))
        assert stop.should_stop()
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    watch = NonFiniteWatch()
    assert watch.first_bad_step(acc) is None
    watch.update(1, torch.tensor(1.0), 2.0)
    watch.update(2, torch.tensor(float("inf")), 2.0)
    watch.update(3, torch.tensor(1.0), float("nan"))
    assert watch.first_bad_step(acc) == 2
    watch.update(4, torch.tensor(1.0), torch.tensor(float("nan")))
    assert watch.first_bad_step(acc) == 4
    assert watch.first_bad_step(acc) is None  # each call covers the steps since the last one
