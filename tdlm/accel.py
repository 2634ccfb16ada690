"""Accelerate plumbing shared by the evaluation scripts (one process, or several under ``accelerate launch``)."""

from __future__ import annotations

import gc


def eval_accelerator():
    """An Accelerator for evaluation: float32 (the bound is reported in float64 sums of float32 CE)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")


def release(accelerator) -> None:
    """Tear down after the caller dropped its prepared objects; two-process gloo runs otherwise abort at exit
    about 1 in 6 (the DDP wrapper and the accelerator's lists keep ProcessGroupGloo threads alive)."""
    accelerator.end_training()
    accelerator.free_memory()
    gc.collect()


def shard(accelerator, n: int) -> list[int]:
    """The indices 0..n-1 this process handles (contiguous chunks; every index exactly once overall)."""
    with accelerator.split_between_processes(list(range(n))) as mine:
        return list(mine)


def gather_objects(accelerator, items: list) -> list:
    """Concatenation of every process's ``items`` (picklable), on every process."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)
