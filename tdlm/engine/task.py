"""The interface a domain implements to train on the engine (``tdlm.engine.loop.Engine``).

A task builds its model and data, draws a step's noise, turns (model, micro-batch, noise) into a loss, evaluates
and exports; the engine does everything else (launch, micro-batches, backward, clipping, optimizer, LR, EMA,
cadences, checkpoints, faults). Tasks: ``tdlm.tasks`` (masked diffusion, autoregressive) and
``tdlm.fsdit.task`` (flow matching).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class LossOutput:
    """One micro-batch's loss as the engine needs it, and what the domain's collectors read."""

    loss_sum: torch.Tensor
    """Sum over the micro-batch of the per-target losses, with grad. The engine divides by the *global* number of
    targets of the optimizer step (all micro-batches and processes), so the gradient does not depend on how the
    batch is split."""
    num_targets: torch.Tensor
    """This micro-batch's targets in that denominator (valid tokens, episodes)."""
    reported_sum: torch.Tensor
    """float64, detached: the objective as it is reported (``train/loss``); equals ``loss_sum`` unless the
    gradient uses a modified loss (the text task's clipped weights)."""
    batch: Any = None
    """The metric source ``batch`` (the domain's own type)."""


class Task:
    """Base class; a domain overrides what it needs. Set ``model`` and ``train_set`` in ``__init__``."""

    model: nn.Module
    train_set: torch.utils.data.Dataset
    collate_fn: Callable | None = None
    train_sampler: torch.utils.data.Sampler | None = None
    """The order the training rows are read in; None = shuffled by the engine. Its ``set_epoch`` is called at each
    epoch, and a ``position(epoch, batches)`` method, when it has one, goes into ``trainer_state.json`` as
    ``data_position`` (where a resume continues; the loop's cursor is what restores it)."""
    no_decay: tuple[str, ...] = ()
    """Parameter-name parts that get no weight decay beyond the 1-d ones (``tdlm.engine.optim.param_groups``)."""
    units_per_row: int = 1
    """Throughput unit per row: tokens per sequence for text, 1 for an image episode."""
    flops_per_unit: float = 0.0
    """Model training FLOPs of one unit (``tdlm.flops``); 0 = not counted. The engine logs the run's total."""
    synchronized_timing: bool = False
    """Synchronise the device before reading the step's timers (per-phase timings); costs a sync per step."""

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator

    # ---------------------------------------------------------------------------------------- set-up and resume
    def prepare(self, accelerator) -> None:
        """After the engine prepared model, optimizer and training loader: prepare evaluation loaders."""

    def layout(self) -> dict:
        """Settings the saved data position and RNG states depend on, beyond the loop's own."""
        return {}

    def check_resume(self, ckpt: Path, saved_state: dict) -> None:
        """Raise ``ConfigError`` if the checkpoint's model or data do not match this run."""

    def state(self) -> dict:
        """Extra keys of ``trainer_state.json`` (a tokenizer fingerprint, say)."""
        return {}

    def export(self, directory: Path) -> None:
        """Main process: files a checkpoint (or the run directory) holds beside ``model/`` (a tokenizer, say)."""

    def load_export(self, model_dir: Path) -> nn.Module:
        """The model a checkpoint exported, built directly (sampling under ZeRO-3, whose weights are sharded)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- one step
    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step``'s micro-batches (a step-dependent schedule of the model, say); a resumed
        run calls it with the same steps."""

    def draw_noise(self, generator: torch.Generator, rows: int) -> tuple[torch.Tensor, ...]:
        """The step's noise for ``rows`` global rows, each tensor with ``rows`` leading; the engine slices it."""
        return ()

    def num_targets(self, batch) -> torch.Tensor:
        """Targets of a micro-batch in the loss denominator (read before the forward, for the global count)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, noise: tuple[torch.Tensor, ...]) -> LossOutput:
        raise NotImplementedError

    def step_sources(self, info, inference_model: nn.Module) -> dict:
        """Extra metric sources fed once per optimizer step beside ``step=StepInfo`` (timers, sample recipes);
        ``inference_model`` is what samples come from (the EMA, or the raw model)."""
        return {}

    # ---------------------------------------------------------------------------------------- metrics, eval, end
    def build_metrics(self, sinks: list, is_main: bool):
        """The domain's ``MetricRunner`` (collectors, tiers, health rules)."""
        raise NotImplementedError

    def metric_specs(self) -> list:
        """Every metric the domain logs (wandb summaries)."""
        return []

    def evaluate(self, model: nn.Module, ema: nn.Module | None, step: int | None = None) -> Any:
        """Collective. The metric source ``val`` on evaluation steps (every process gets its share or the total);
        ``step``, the optimizer step, lets a task run slower evaluations on a cadence of its own."""
        raise NotImplementedError

    def summary(self, best_val: float) -> dict:
        """Extra ``summary/*`` values logged when the run ends."""
        return {}

    def report(self, result: dict, inference_model: Callable[[], nn.Module]) -> None:
        """Main process, after a completed run: what the entry script prints."""

    def close(self) -> None:
        """Drop prepared objects (two-process gloo runs abort at exit otherwise)."""
