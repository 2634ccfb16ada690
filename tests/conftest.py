"""Shared fixtures: a tiny model config and a tiny prepared Markov dataset, built once per session offline."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_overrides(tmp_path, **extra):
    """Overrides for a seconds-long run on the Markov corpus."""
    base = {
        "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2, "model.max_seq_len": 32,
        "data.source": "markov", "data.seq_len": 32, "data.markov_tokens": 20000, "data.markov_symbols": 6,
        "data.cache_dir": str(tmp_path.parent / "data_cache"),
        "trainer.output_dir": str(tmp_path / "runs"), "trainer.run_name": "t", "trainer.max_steps": 8,
        "trainer.micro_batch_size": 8, "trainer.eval_every_n_steps": 4, "trainer.save_every_n_steps": 4,
        "trainer.progress_bar": False, "sample.at_end": 0, "data.eval_batches": 2,
        "metrics.logging_steps": 1, "metrics.detailed_metrics_steps": 4, "metrics.attention_analysis_steps": 4,
        "optim.warmup_steps": 2, "wandb.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_overrides(tmp_path, **kw)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and spinning OpenMP threads on the shared 2-core
    machine slow them down by an order of magnitude."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parent.parent


def launch_two_processes(script, args, config_file="multi_cpu.yaml", extra_env=None, timeout=300):
    """``accelerate launch`` of ``script`` on 2 CPU processes (1 thread each, fp32) with a configs/accelerate/ file.
    The launch gets its own process group, so a timeout kills the workers too, not only the launcher."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", **(extra_env or {}))
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / config_file), "--num_processes", "2",
           "--num_cpu_threads_per_process", "1", "--mixed_precision", "no", str(script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch timed out after {timeout} s:\n{out[-3000:]}\n{err[-5000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def poison_loss(monkeypatch, first_step: int, last_step: int | None = None) -> None:
    """Make the masked-diffusion training loss of optimizer steps ``first_step`` .. ``last_step`` (None: every later
    one) NaN: what the step differentiates and what it reports."""
    from tdlm.engine.loop import Engine
    from tdlm.tasks import MaskedDiffusionTask

    current = {"step": 0}
    optimizer_step, loss = Engine.optimizer_step, MaskedDiffusionTask.loss

    def step_recorded(self, step):
        current["step"] = step
        return optimizer_step(self, step)

    def poisoned(self, model, batch, noise):
        out = loss(self, model, batch, noise)
        if first_step <= current["step"] <= (last_step or current["step"]):
            out.loss_sum, out.reported_sum = out.loss_sum * float("nan"), out.reported_sum * float("nan")
        return out

    monkeypatch.setattr(Engine, "optimizer_step", step_recorded)
    monkeypatch.setattr(MaskedDiffusionTask, "loss", poisoned)
