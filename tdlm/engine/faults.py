"""Fault handling for the training loop: preemption (SIGTERM) and non-finite losses, with no host sync per step.

Both decisions must be taken at the *same step on every process*, or the next collective (a checkpoint save)
hangs. ``StopSignal`` folds its flag into an all-reduce the loop already does each step and reads the result
one step later on a GPU (so the read never waits for the step in flight); ``NonFiniteWatch`` records a flag per
step on the device and is read only where the loop syncs anyway (a log step) or must be sure (before a save).
"""

from __future__ import annotations

import collections
import math
import signal

import torch


class TrainingStopped(RuntimeError):
    """Training cannot go on (a NaN loss, a health rule that stops); the message says why and where."""


class StopSignal:
    """SIGTERM sets a flag; ``should_stop`` says, identically on every process, when the loop must stop.

    Usage per step: ``reduced = acc.reduce(torch.stack([x, stop.flag(device)]), "sum")``, then
    ``stop.push(reduced[1])`` and, after the step, ``if stop.should_stop(): save and exit``.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._pending: collections.deque = collections.deque()
        self._flags: dict = {}

    def install(self) -> "StopSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # async-signal context: only set a flag
        self.received = signum

    def flag(self, device) -> torch.Tensor:
        """This process's vote, float64 so it can ride in the same all-reduce as token counts.

        Cached per value: a fresh ``torch.tensor(x, device="cuda")`` would be a synchronous copy every step.
        """
        key = (str(device), self.received is not None)
        if key not in self._flags:
            self._flags[key] = torch.full((), float(key[1]), dtype=torch.float64, device=device)
        return self._flags[key]

    def push(self, reduced: torch.Tensor) -> None:
        """The all-reduced vote of this step (a device tensor; the all-reduce may still be in flight)."""
        if reduced.device.type == "cuda":
            host = torch.empty((), dtype=reduced.dtype, pin_memory=True)
            host.copy_(reduced, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host))
        else:
            self._pending.append((None, reduced))

    def should_stop(self) -> bool:
        """Decided on the vote of this step (CPU) or of the previous step (GPU): the same step on all ranks."""
        lag = 1 if self._pending and self._pending[0][0] is not None else 0
        stop = False
        while len(self._pending) > lag:
            event, value = self._pending.popleft()
            if event is not None:
                event.synchronize()  # waits for the previous step's all-reduce only, not for this step's work
            stop = stop or float(value) > 0
        return stop


class NonFiniteWatch:
    """Remembers, on the device, whether each step's loss and gradient norm were finite."""

    def __init__(self):
        self._steps: list[int] = []
        self._finite: list[torch.Tensor] = []

    def update(self, step: int, *values) -> None:
        """``values``: tensors or floats of this step (loss sums, grad norm); no host sync for tensors."""
        ok, host_ok = None, True
        for v in values:
            if torch.is_tensor(v):
                fin = torch.isfinite(v.detach()).all()
                ok = fin if ok is None else ok & fin
            elif v is not None:
                host_ok = host_ok and math.isfinite(v)
        ok = torch.tensor(host_ok) if ok is None else ok & host_ok
        self._steps.append(step)
        self._finite.append(ok)

    def first_bad_step(self, accelerator) -> int | None:
        """Collective: the first step since the last call whose loss or gradient norm was NaN/Inf on any process."""
        if not self._steps:
            ok = torch.ones(1, device=accelerator.device)
        else:
            ok = torch.stack([f.to(accelerator.device) for f in self._finite]).float()
        steps, self._steps, self._finite = self._steps, [], []
        if accelerator.num_processes > 1:
            ok = accelerator.reduce(ok, "sum") / accelerator.num_processes
        bad = (ok < 1).nonzero()
        return steps[int(bad[0])] if len(bad) and steps else None
