"""Does diffusion training leave the unigram plateau on every seed? The quickstart run for each training
estimator of the NELBO (``diffusion.estimator``) on several seeds, with the AR baseline as the reference line.

    python eval/bench_convergence.py --out runs/convergence                          # everything (hours on 2 cores)
    python eval/bench_convergence.py --out runs/convergence --estimators exact-k --seeds 0 1 --parallel 2
    python eval/bench_convergence.py --out runs/convergence --read-only               # report finished runs only
    python eval/bench_convergence.py --out runs/diag --estimators bernoulli --no-ar --seeds 1 2 --steps 300 \
        --arm mlm_weight=diffusion.clip_weight=1.0 --arm lr_4e-3=optim.lr=4e-3           # a recipe change as an arm

Runs live in ``OUT/<arm>_s<seed>/`` and are resumed (``trainer.resume=auto``) or skipped when finished, so the
sweep can be done in pieces. Per arm (and seed): the validation bound exp(val/loss) at steps 100/200/400/600,
the median and worst seed, the first logged step whose mask accuracy exceeds 10% (leaving the plateau, whose
mask accuracy is the unigram rate ~6% on this corpus), and the median tokens/s. Writes ``OUT/convergence.json``
and ``OUT/convergence.png``; prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ESTIMATORS = ("bernoulli", "exact-k", "importance")
CHECKPOINTS = (100, 200, 400, 600)
PLATEAU_EXIT_ACCURACY = 0.10


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}_s{seed}"


def finished(path: Path, steps: int) -> bool:
    log = path / "metrics.jsonl"
    return log.is_file() and any(json.loads(x).get("summary/total_steps") == steps
                                 for x in log.read_text().splitlines() if x.strip())


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """``NAME=key=value[,key=value...]`` -> (NAME, overrides): a named arm of the quickstart with config overrides."""
    name, _, overrides = spec.partition("=")
    if not name or not overrides or "=" not in overrides or name in (*ESTIMATORS, "ar"):
        raise SystemExit(f"--arm: expected NAME=key=value[,key=value...] with a new NAME, got {spec!r}")
    return name, overrides.split(",")


def train(out: Path, arm: str, seed: int, steps: int, threads: int, config: str,
          extra: tuple[str, ...] = ()) -> None:
    """One quickstart run (resumed where it stopped); the AR arm is ``configs/quickstart_ar.yaml``; ``extra``:
    the overrides of an ``--arm`` (which keeps the default estimator unless it sets one)."""
    path = run_dir(out, arm, seed)
    if finished(path, steps):
        return
    overrides = [f"trainer.seed={seed}", f"trainer.max_steps={steps}", f"trainer.output_dir={out}",
                 f"trainer.run_name={path.name}", "trainer.resume=auto", "trainer.progress_bar=false",
                 "sample.at_end=0", "wandb.enabled=false", "metrics.console=false"]
    if arm in ESTIMATORS:
        overrides.append(f"diffusion.estimator={arm}")
    overrides += list(extra)
    cfg = config if arm != "ar" else str(ROOT / "configs" / "quickstart_ar.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    log = (out / f"{path.name}.log").open("w")
    subprocess.run([sys.executable, str(ROOT / "tdlm" / "train.py"), cfg, *overrides], env=env, check=True,
                   stdout=log, stderr=subprocess.STDOUT)


def summarize_run(path: Path, steps: int) -> dict:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    bound = {r["step"]: math.exp(r["val/loss"]) for r in rows if "val/loss" in r}
    acc = [(r["step"], r["metrics/mask_accuracy"]) for r in rows if "metrics/mask_accuracy" in r]
    exit_step = next((s for s, a in sorted(acc) if a > PLATEAU_EXIT_ACCURACY), None)
    speed = [r["train/tokens_per_second"] for r in rows if "train/tokens_per_second" in r]
    return {"bound": {s: bound.get(s) for s in sorted({*CHECKPOINTS, steps})}, "plateau_exit_step": exit_step,
            "tokens_per_second": statistics.median(speed) if speed else None, "curve": sorted(bound.items())}


def summarize_arm(runs: dict[int, dict], steps: int) -> dict:
    final = {s: r["bound"].get(steps) for s, r in runs.items() if r["bound"].get(steps)}
    exits = [r["plateau_exit_step"] for r in runs.values()]
    return {"seeds": sorted(runs), f"median_bound_{steps}": statistics.median(final.values()) if final else None,
            f"worst_bound_{steps}": max(final.values()) if final else None,
            "worst_seed": max(final, key=final.get) if final else None,
            "plateau_exit_steps": exits, "all_exit_before_300": all(e is not None and e < 300 for e in exits),
            "median_tokens_per_second": statistics.median([r["tokens_per_second"] for r in runs.values()
                                                           if r["tokens_per_second"]] or [math.nan]),
            "per_seed": runs}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(["bernoulli", "exact-k", "importance", "ar"], ["C0", "C1", "C2", "k"]))
    for arm, summary in result["arms"].items():
        for i, (seed, run) in enumerate(sorted(summary["per_seed"].items())):
            steps, bounds = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(steps, bounds, color=colors.get(arm, "C3"), alpha=0.7, lw=1.2, label=arm if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity bound (AR: exact)")
    ax.set_title("quickstart, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory of the runs and the report")
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--no-ar", action="store_true", help="skip the AR reference runs")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1, help="per run")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=key=value[,key=value]",
                    help="an extra arm: the quickstart with these overrides (repeatable)")
    ap.add_argument("--read-only", action="store_true", help="report the finished runs, start none")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(parse_arm(spec) for spec in args.arm)
    arms = list(args.estimators) + ([] if args.no_ar else ["ar"]) + list(extra)
    jobs = [(arm, seed) for seed in args.seeds for arm in arms]  # seed-major: every arm advances together
    if not args.read_only:
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda job: train(out, *job, args.steps, args.threads, args.config,
                                            tuple(extra.get(job[0], ()))), jobs))
    result = {"steps": args.steps, "plateau_exit_accuracy": PLATEAU_EXIT_ACCURACY, "arms": {},
              "arm_overrides": extra}
    for arm in arms:
        runs = {seed: summarize_run(run_dir(out, arm, seed), args.steps) for seed in args.seeds
                if finished(run_dir(out, arm, seed), args.steps)}
        if runs:
            result["arms"][arm] = summarize_arm(runs, args.steps)
    (out / "convergence.json").write_text(json.dumps(result, indent=1))
    if result["arms"]:
        plot(result, out / "convergence.png")
    print(json.dumps({arm: {k: v for k, v in s.items() if k != "per_seed"} for arm, s in result["arms"].items()},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
