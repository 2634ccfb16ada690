"""What every ``eval/bench_*.py`` shares: interleaved timing, medians and a record of the machine's state.

The benchmarks compare two (or more) things in one process, on one machine, with the same threads. Arms run in
rounds and each round rotates their order, so slow drift of the machine (other jobs, turbo, caches) falls on
every arm alike and no arm always runs first or last. Each arm reports the median of its repetitions, and a ratio
is reported twice: from the two medians, and as the median of the per-round ratios (paired within a round, so
the more robust figure on a busy machine). ``cpu_share`` is the CPU time the process (and its finished children)
got over wall time x threads during the timed rounds: near 1 the process had the cores to itself; well below 1 it
competed with other jobs and absolute figures are low (ratios are still fair: the arms ran under the same load,
interleaved).

Contention on a shared 2-core machine comes in bursts (another job's multi-process test), and a burst slows
a multi-threaded step 5-10x (its threads wait for each other at every barrier), not by the other job's share.
So each repetition's own CPU share is recorded too, and ``uncontended`` drops the repetitions that got less
than a threshold of the cores (the figures say how many were kept and give the all-rounds medians beside).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python eval/bench_x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_state(threads: int) -> dict:
    """Load average, threads and versions, recorded before and after each benchmark."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"loadavg_1_5_15min": [round(x, 2) for x in load], "torch_threads": threads,
            "cpu_count": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def set_threads(threads: int) -> int:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _cpu_seconds() -> float:
    t = os.times()  # children: worker processes that have been waited for (e.g. a finished datasets pool)
    return t.user + t.system + t.children_user + t.children_system


def interleaved(arms: dict[str, Callable[[int], None]], rounds: int, warmup: int = 2,
                sync: Callable[[], None] = lambda: None, cpus: int = 0) -> dict:
    """Time each arm ``rounds`` times in rotating order after ``warmup`` untimed calls each.

    An arm is ``fn(i)`` doing one repetition (i = 0, 1, ... so it can take its own i-th input). Returns seconds
    per arm, the rounds' per-arm seconds, and the CPU share of the timed part over ``cpus`` (default: threads).
    """
    names = list(arms)
    for name in names:
        for i in range(warmup):
            arms[name](-1 - i)
        sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    shares: dict[str, list[float]] = {n: [] for n in names}
    ncpu = cpus or torch.get_num_threads()
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0, c0 = time.perf_counter(), _cpu_seconds()
            arms[name](r)
            sync()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            shares[name].append(round((_cpu_seconds() - c0) / (dt * ncpu), 3))
    wall = time.perf_counter() - wall0
    share = (_cpu_seconds() - cpu0) / (wall * ncpu)
    return {"seconds": times, "cpu_share": round(share, 3), "cpu_shares": shares}


def uncontended(timing: dict, min_share: float, min_kept: int = 3) -> tuple[dict, dict]:
    """(seconds, kept): per arm, the repetitions whose CPU share was at least ``min_share``, the others None so
    that rounds stay aligned for paired ratios; an arm with fewer than ``min_kept`` such repetitions keeps all
    (its ``kept`` count says so). ``min_share`` 0 keeps everything."""
    seconds, kept = {}, {}
    for name, xs in timing["seconds"].items():
        ok = [s >= min_share for s in timing["cpu_shares"][name]]
        if sum(ok) < min_kept:
            ok = [True] * len(xs)
        seconds[name] = [x if k else None for x, k in zip(xs, ok)]
        kept[name] = sum(ok)
    return seconds, kept


def _present(xs: list) -> list[float]:
    return [x for x in xs if x is not None]


def median(xs: list[float | None]) -> float:
    """Median of the repetitions present (None: dropped by ``uncontended``)."""
    return statistics.median(_present(xs))


def spread(xs: list[float | None]) -> dict:
    """Median, min and the interquartile range relative to the median (how noisy the arm was)."""
    xs = _present(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    m = statistics.median(xs)
    return {"median_s": round(m, 5), "min_s": round(min(xs), 5), "iqr_rel": round((q[2] - q[0]) / m, 3)}


def ratio(times: dict[str, list[float | None]], slow: str, fast: str) -> dict:
    """How many times faster ``fast`` is than ``slow``: from the medians, and the median of per-round ratios
    (rounds where both are present)."""
    per_round = [a / b for a, b in zip(times[slow], times[fast]) if a is not None and b is not None]
    return {"of_medians": round(median(times[slow]) / median(times[fast]), 3),
            "median_of_rounds": round(median(per_round), 3) if per_round else None}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
