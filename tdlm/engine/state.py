"""The loop state: where a run is (step, epoch, data cursor), its best validation value and its history.

One object, registered with Accelerate's checkpointing (``state_dict`` / ``load_state_dict``), so
``accelerator.load_state`` restores it with the model, optimizer, RNG and data sampler. Its dict is also written
as ``trainer_state.json`` for readers outside the loop (``tdlm/runs.py``, the eval scripts), beside ``layout``:
the settings that give the saved data position and RNG states their meaning, which a resume must keep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tdlm.engine.config import ConfigError


@dataclass
class LoopState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches (per process) already taken from the current epoch: the data cursor."""
    best_val: float = math.inf
    best_ckpt: str | None = None
    """Name of the checkpoint with the lowest val/loss (kept by pruning)."""
    wandb_id: str | None = None
    history: dict = field(default_factory=dict)
    """{"val_loss": [[step, epoch, value], ...]}."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


def check_layout(saved: dict, now: dict, ckpt: Path) -> None:
    """Refuse a resume whose data position or per-process RNG would mean something else than when saved."""
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise ConfigError(f"{key}: {value} differs from the checkpoint's {saved[key]} in {ckpt}; an exact "
                              f"resume (data position, per-process RNG, ZeRO shards) needs the same value")
