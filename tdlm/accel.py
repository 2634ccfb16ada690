"""Accelerate plumbing shared by the evaluation scripts (one process, or several under ``accelerate launch``)."""

from __future__ import annotations

import gc
import sys
from typing import Callable


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


def run_script(work: Callable) -> tuple[int, object, bool]:
    """``work(accelerator)`` between creating and releasing the eval accelerator, for a script's ``main``.

    Returns (exit code, result, whether this is the main process); a ``ValueError`` (``ConfigError`` included)
    becomes one ``error:`` line on stderr and exit code 2.
    """
    accelerator = None
    try:
        accelerator = eval_accelerator()
        return 0, work(accelerator), accelerator.is_main_process
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None, False
    finally:
        if accelerator is not None:
            release(accelerator)
