"""Collectors every domain uses, over the sources the engine feeds (``tdlm.engine.loop``): the training loss,
the optimizer step, the parameter norm and validation.

The implementation lives here once; a domain registers a subclass that only declares its metric names (the
names its metric documents use: ``train/learning_rate`` for text, ``train/lr`` for FSDiT) and its docstring,
which is the definition on the domain's reference page. ``ENGINE_NEEDS`` is the part of every domain's need table
that these collectors read; a domain's registry starts from it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tdlm.metrics import functional as Fm
from tdlm.metrics.core import Collector, MetricSpec, Need

ENGINE_NEEDS = {
    "objective": Need(("loss",), "each micro-batch's reported loss sum and its targets (valid tokens, episodes)"),
    "optimizer_step": Need(("step",), "once per optimizer step: grad norm before clipping, LR, rows, wall time"),
    "params": Need(("step",), "the parameters after the optimizer step"),
    "grads": Need(("grads",), "the model after backward, before clipping and the optimizer step, and the LR"),
    "validation": Need(("val",), "the task's validation result, on evaluation steps"),
}

SUMMARY = (MetricSpec("summary/training_time_hours", "h", "wall time of this session's loop"),
           MetricSpec("summary/total_steps", "steps", "optimizer steps completed"),
           MetricSpec("summary/final_loss", "1", "last logged train/loss"),
           MetricSpec("summary/best_val_loss", "1", "lowest val/loss"),
           MetricSpec("summary/steps_this_session", "steps", "steps since start or resume"))
"""What the engine logs once, when a run ends (a domain may add its own ``summary/*``)."""


def _zeros(*shape):
    return torch.zeros(shape, dtype=torch.float64)


def _renamed(names: dict, values: dict) -> dict:
    return {names[role]: v for role, v in values.items() if role in names}


class TrainLoss(Collector):
    """Window sum of each micro-batch's reported loss over the window sum of its targets, all processes."""

    tier = "essential"
    required = True  # the NaN/Inf stop rule reads it
    needs = ("objective",)
    name: ClassVar[str] = "train/loss"

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("total", _zeros())
        self.add_state("targets", _zeros())

    def update(self, inputs):
        out = inputs["loss"]
        self.total += out.reported_sum
        self.targets += out.num_targets.double()

    def compute(self):
        return {self.name: Fm.ratio(self.total, self.targets)}


class Optimization(Collector):
    """Per optimizer step, over the window: the LR of the last step, the mean global gradient norm before
    clipping, rows x units per second and seconds per step of step wall time (evaluation, logging and checkpoints
    excluded), and the epoch. ``names`` maps each role (lr, grad_norm, throughput, step_time, epoch) a domain
    logs to its metric name."""

    tier = "essential"
    needs = ("optimizer_step",)
    names: ClassVar[dict[str, str]] = {}

    def __init__(self, **ctx):
        super().__init__()
        for name in ("lr", "epoch", "grad_sum", "grad_steps", "units", "seconds", "steps"):
            self.add_state(name, _zeros(), reduce=None)  # identical on every process

    def update(self, inputs):
        s = inputs["step"]
        self.lr.fill_(s.lr)
        self.epoch.fill_(s.epoch)
        if s.grad_norm is not None:
            self.grad_sum += torch.as_tensor(s.grad_norm, dtype=torch.float64).to(self.grad_sum.device)
            self.grad_steps += 1
        self.units += s.tokens
        self.seconds += s.seconds
        self.steps += 1

    def compute(self):
        return _renamed(self.names, {
            "lr": self.lr.clone(), "grad_norm": Fm.ratio(self.grad_sum, self.grad_steps),
            "throughput": Fm.ratio(self.units, self.seconds), "step_time": Fm.ratio(self.seconds, self.steps),
            "epoch": self.epoch.clone()})


class ParamNorm(Collector):
    """L2 norm of all trainable parameters (as one vector) after the optimizer step on the logging step."""

    tier = "essential"
    window = False
    needs = ("params",)
    metrics = (MetricSpec("train/param_norm", "1", "L2 norm of all parameters at the logging step"),)

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("norm", _zeros(), reduce=None)

    def update(self, inputs):
        params = [p.detach() for p in inputs["step"].model.parameters()]
        self.norm = torch.nn.utils.get_total_norm(params).double().to(self.norm)

    def compute(self):
        return {"train/param_norm": self.norm.clone()}


class Validation(Collector):
    """On evaluation steps: the task's validation loss sum over its count (``val`` source attributes
    ``loss_sum``, ``count``: float64 tensors). ``reduce`` says how processes combine them: ``"sum"`` when each
    process scored its share, ``None`` when every process already holds the total. Nothing is reported on
    steps without an evaluation. Always on: the best checkpoint is chosen by val/loss whatever the tiers."""

    tier = "essential"
    required = True
    needs = ("validation",)
    reduce: ClassVar[str | None] = "sum"

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("loss_sum", _zeros(), reduce=self.reduce)
        self.add_state("count", _zeros(), reduce=self.reduce)
        self._fed = False  # the same on every process: evaluation steps are the same everywhere

    def update(self, inputs):
        v = inputs["val"]
        self.loss_sum += v.loss_sum
        self.count += v.count
        self._fed = True

    def compute(self):
        return {"val/loss": Fm.ratio(self.loss_sum, self.count)} if self._fed else {}

    def pending(self) -> bool:
        return self._fed

    def reset(self):
        super().reset()
        self._fed = False
