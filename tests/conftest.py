"""Shared fixtures: a tiny model config and a tiny prepared Markov dataset, built once per session offline."""

import os

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
        "trainer.progress_bar": False, "trainer.sample_at_end": 0, "trainer.eval_batches": 2,
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
