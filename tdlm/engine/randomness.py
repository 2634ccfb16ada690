"""Step-keyed random streams and the global-batch row convention, one of each for every task.

Noise is drawn for the *global* batch of an optimizer step (every micro-step of every process) from a generator
keyed by (seed, step), then each micro-batch takes its rows. So the numbers a row gets do not depend on how many
processes share the batch, and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import torch


def keyed_generator(seed: int, key: int, salt: int = 0, device="cpu") -> torch.Generator:
    """A generator that is a function of (seed, key, salt) alone: the same on every process and after a resume.
    ``key`` is the training step, a sequence or a sample index; ``salt`` keeps unrelated streams apart."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + key * 7_919 + salt) % (2**63))


def global_rows(micro_step: int, process_index: int, num_processes: int, micro_batch_size: int) -> slice:
    """The rows of the global-batch noise that belong to this process's ``micro_step``: Accelerate shards each
    micro-step's global batch over the processes in order, so the global row of (micro, rank, i) is
    (micro * world + rank) * B + i."""
    start = (micro_step * num_processes + process_index) * micro_batch_size
    return slice(start, start + micro_batch_size)
