"""Cost of the metric tiers: median step time with all tiers off, essential only, and all on; JSON out.

    python eval/bench_metrics.py                                   # configs/quickstart.yaml, CPU
    python eval/bench_metrics.py --config configs/markov.yaml --rounds 30 --out runs/bench_metrics.json

Each mode has its own trainer. Step kinds are timed separately, interleaving the modes round by round so that
machine-load drift hits all of them alike: a *plain* step (no tier due: only the window collectors' device-side
accumulation), a *log* step (essential due: sync, compute, parameter norm, health rules, sinks), a *research*
step (essential + research due: 3 extra backward passes) and an *advanced* step (essential + advanced due: one
extra forward with explicit attention). The amortised step time at the default cadences (100/500/2000) is
plain + (log − plain)/logging_steps + (research − log)/detailed_metrics_steps
+ (advanced − log)/attention_analysis_steps; the overhead is relative to the all-off mode amortised the same
way (its loss collector stays on: the NaN stop rule reads it). Evaluation and checkpoints are excluded.
``hot_path_update_s`` times the collectors' per-micro-batch update alone on a real batch, a direct measure of
the per-step cost that end-to-end differences of a few tenths of a percent cannot resolve on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tdlm.config import MetricsSection, load_config  # noqa: E402
from tdlm.metrics.core import tier_cadences  # noqa: E402
from tdlm.engine.loop import Engine  # noqa: E402
from tdlm.engine.randomness import global_rows, keyed_generator  # noqa: E402
from tdlm.tasks import text_engine  # noqa: E402

MODES = {"off": (False, False, False), "essential": (True, False, False), "all": (True, True, True)}
NEVER = 10**9
BUDGET = {"essential": 0.01, "all": 0.03}


def make_trainer(config: str, mode: str, out_dir: str, extra: list[str]) -> Engine:
    ess, res, adv = MODES[mode]
    cfg = load_config(config, [
        f"metrics.tiers.essential.enabled={ess}", f"metrics.tiers.research.enabled={res}",
        f"metrics.tiers.advanced.enabled={adv}", "metrics.console=false", "wandb.enabled=false",
        f"trainer.output_dir={out_dir}", f"trainer.run_name=bench_{mode}", "trainer.progress_bar=false",
        f"trainer.max_steps={NEVER}", f"trainer.eval_every_n_steps={NEVER // 10**4 * 10**4}",
        f"trainer.save_every_n_steps={NEVER}", "sample.at_end=0", *extra])
    return text_engine(cfg)


def timed_step(trainer: Engine, due: tuple[str, ...], clock) -> float:
    """One optimizer step with exactly the tiers in ``due`` reporting on it; seconds of ``clock``."""
    trainer.metrics.cadences = {t: 1 if t in due else NEVER for t in trainer.metrics.cadences}
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    trainer.fit(stop_at=trainer.state.step + 1)
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def hot_path_update(trainer: Engine, clock, repeats: int = 30) -> float:
    """Median seconds of the collectors' per-micro-batch ``update`` on a real batch when no tier is due: the
    whole hot-path cost of the metrics, measured directly (end-to-end step differences are noisier)."""
    trainer.metrics.cadences = {t: NEVER for t in trainer.metrics.cadences}
    batch, step = trainer._next_batches(1)[0], trainer.state.step + 1
    acc, B = trainer.accelerator, trainer.cfg.trainer.micro_batch_size
    noise = trainer.task.draw_noise(keyed_generator(trainer.cfg.trainer.seed, step), acc.num_processes * B)
    rows = global_rows(0, acc.process_index, acc.num_processes, B)
    out = trainer.task.loss(trainer.model, batch, tuple(x[rows] for x in noise))
    times = []
    for _ in range(repeats):
        start = clock()
        trainer.metrics.update(step, batch=out.batch, loss=out, model=trainer.raw_model)
        times.append(clock() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=20, help="plain steps per mode (interleaved)")
    ap.add_argument("--due-rounds", type=int, default=5, help="log / research / advanced steps per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave torch's default)")
    ap.add_argument("--clock", choices=("auto", "process", "wall"), default="auto",
                    help="auto: CPU time of this process on a CPU device (stable on a shared machine, with one "
                         "thread), wall time on a GPU")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.micro_batch_size=8")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_metrics_")
    trainers = {m: make_trainer(args.config, m, tmp, args.overrides) for m in MODES}
    clock_name = args.clock
    if clock_name == "auto":
        clock_name = "wall" if trainers["off"].accelerator.device.type == "cuda" else "process"
    clock = time.process_time if clock_name == "process" else time.perf_counter
    cadence = tier_cadences(MetricsSection())  # the defaults (100 / 500 / 2000), whatever the config says
    kinds = {"off": {"plain": (), "log": ("essential",)}, "essential": {"plain": (), "log": ("essential",)},
             "all": {"plain": (), "log": ("essential",), "research": ("essential", "research"),
                     "advanced": ("essential", "advanced")}}
    times = {m: {k: [] for k in kinds[m]} for m in MODES}
    cfg, device = trainers["off"].cfg, str(trainers["off"].accelerator.device)
    n_params = sum(p.numel() for p in trainers["off"].model.parameters())
    try:
        for m, tr in trainers.items():
            for _ in range(args.warmup):
                timed_step(tr, (), clock)
        for r in range(max(args.rounds, args.due_rounds)):
            order = list(MODES)[r % 3:] + list(MODES)[:r % 3]
            for kind in ("plain", "log", "research", "advanced"):
                if r >= (args.rounds if kind == "plain" else args.due_rounds):
                    continue
                for m in order:
                    if kind in kinds[m]:
                        times[m][kind].append(timed_step(trainers[m], kinds[m][kind], clock))
        hot = {m: hot_path_update(tr, clock) for m, tr in trainers.items()}
    finally:
        for tr in trainers.values():
            tr.close()

    med = {m: {k: statistics.median(v) for k, v in ks.items()} for m, ks in times.items()}

    def amortised(m):
        t = med[m]
        a = t["plain"] + (t["log"] - t["plain"]) / cadence["essential"]
        if "research" in t:
            a += (t["research"] - t["log"]) / cadence["research"] + (t["advanced"] - t["log"]) / cadence["advanced"]
        return a
    amort = {m: amortised(m) for m in MODES}
    overhead = {m: amort[m] / amort["off"] - 1 for m in ("essential", "all")}
    result = {
        "config": str(args.config), "overrides": args.overrides, "device": device,
        "torch_threads": torch.get_num_threads(), "clock": clock_name,
        "model": {"hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
                  "seq_len": cfg.data.seq_len, "micro_batch_size": cfg.trainer.micro_batch_size,
                  "params": n_params},
        "cadences": cadence, "samples": {m: {k: len(v) for k, v in ks.items()} for m, ks in times.items()},
        "median_step_s": med, "amortised_step_s": amort, "overhead": overhead,
        "hot_path_update_s": hot, "hot_path_fraction_of_off_step": {m: hot[m] / med["off"]["plain"] for m in hot},
        "budget": BUDGET, "within_budget": {m: overhead[m] <= BUDGET[m] for m in BUDGET},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
