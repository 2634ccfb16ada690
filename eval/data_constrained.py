"""Repeated data, AR vs masked diffusion: a matched sweep over epochs of one fixed unique-token budget, the
effective-data fit of each objective (its R_D*) and the crossover.

    python eval/data_constrained.py --out runs/data_constrained                    # the CPU sweep (configs/markov.yaml)
    python eval/data_constrained.py --out runs/data_constrained --read-only        # refit finished runs
    python eval/data_constrained.py --out DIR --config C.yaml --unique-tokens N --epochs 1 4 16 64

Each (objective, epochs) pair is one run of ``--config`` with ``data.unique_tokens``, ``trainer.max_epochs`` and
``trainer.max_steps=null`` (its own LR schedule, as in Muennighoff et al.), in ``OUT/<objective>_e<E>/``; finished
runs are skipped, so the sweep can be run in pieces. The AR arm is the same backbone with ``model.causal=true``.

The model (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", arXiv 2305.16264, eq. 5 with the
model size fixed): repeating U unique tokens for R = epochs - 1 more passes is worth

    D' = U + U R* (1 - exp(-R / R*))            unique-equivalent tokens, so at most U (1 + R*),
    L(epochs) = E + B / D'^beta                 the validation loss (diffusion: the NELBO bound, AR: exact),

where R* (R_D*) is the number of repetitions after which repeated data is worth 1 - 1/e of fresh data; Prabhudesai
et al. 2025 (arXiv 2507.15857) report R* ~ 500 for diffusion and ~ 15 for AR. E, B and beta are fitted for each
objective as well (E absorbs the model-size term A / N^alpha). The fit: for each R* on a log grid, E and B by
linear least squares at the best beta; the reported R* minimises the squared error, and its 95% interval is the
profile-likelihood set {R*: RSS(R*) <= RSS_min (1 + F(0.95; 1, n - 4) / (n - 4))} (the F form of the likelihood
ratio for n points and 4 parameters; Bates & Watts, *Nonlinear Regression Analysis*, 1988, ch. 6). An interval reaching the grid's end says the
data do not bound R* on that side (no saturation seen within the epochs run), never a bare point estimate.
Writes ``OUT/data_constrained.json`` and ``OUT/data_constrained.png``; prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import f as f_dist

ROOT = Path(__file__).resolve().parent.parent
R_GRID = np.geomspace(0.1, 1e5, 301)


def effective_data(epochs, unique: float, r_star: float):
    """D' = U + U R* (1 - exp(-(epochs - 1) / R*))."""
    repeats = np.asarray(epochs, dtype=float) - 1.0
    return unique * (1.0 + r_star * -np.expm1(-repeats / r_star))


def loss_model(epochs, unique: float, E: float, B: float, beta: float, r_star: float):
    return E + B * effective_data(epochs, unique, r_star) ** -beta


def _fit_at(epochs, loss, unique, r_star, floor=None) -> tuple[float, dict]:
    """Least squares of E, B (linear; E fixed at ``floor`` when given) and beta (1-D search) at a fixed R*."""
    d = effective_data(epochs, unique, r_star)

    def solve(beta):
        if floor is None:
            x = np.stack([np.ones_like(d), d ** -beta], 1)
            coef, *_ = np.linalg.lstsq(x, loss, rcond=None)
            return float(((x @ coef - loss) ** 2).sum()), coef
        x = d ** -beta
        b = float(x @ (loss - floor) / (x @ x))
        return float(((floor + b * x - loss) ** 2).sum()), (floor, b)

    res = minimize_scalar(lambda b: solve(b)[0], bounds=(0.01, 2.0), method="bounded",
                          options={"xatol": 1e-6})
    rss, (e, b) = solve(res.x)
    return rss, {"E": float(e), "B": float(b), "beta": float(res.x)}


def fit_effective_data(epochs, loss, unique: float, floor: float | None = None) -> dict:
    """R* with its 95% profile interval, and E, B, beta at the best R* (module docstring); ``floor``: E fixed
    at the data's known entropy rate (the Markov corpus), which one unique budget alone cannot separate from B
    and beta."""
    epochs, loss = np.asarray(epochs, dtype=float), np.asarray(loss, dtype=float)
    n_params = 3 if floor is not None else 4
    if epochs.size < n_params + 1:
        raise ValueError(f"the fit needs at least {n_params + 1} epoch counts, got {epochs.size}")
    profile = np.array([_fit_at(epochs, loss, unique, r, floor)[0] for r in R_GRID])
    i = int(profile.argmin())
    lo_r, hi_r = R_GRID[max(i - 1, 0)], R_GRID[min(i + 1, len(R_GRID) - 1)]
    best = minimize_scalar(lambda lr: _fit_at(epochs, loss, unique, math.exp(lr), floor)[0],
                           bounds=(math.log(lo_r), math.log(hi_r)), method="bounded")
    r_star = math.exp(best.x)
    rss, params = _fit_at(epochs, loss, unique, r_star, floor)
    dof = max(epochs.size - n_params, 1)
    threshold = rss * (1 + f_dist.ppf(0.95, 1, dof) / dof)

    def excess(log_r):
        return _fit_at(epochs, loss, unique, math.exp(log_r), floor)[0] - threshold

    def edge(outside):  # where the profile crosses the threshold between R* and the nearest grid point outside
        if outside.size == 0:
            return None
        return math.exp(brentq(excess, math.log(r_star), math.log(outside[0]), xtol=1e-6))

    below, above = R_GRID[R_GRID < r_star][::-1], R_GRID[R_GRID > r_star]
    lo = edge(below[profile[R_GRID < r_star][::-1] > threshold])
    hi = edge(above[profile[R_GRID > r_star] > threshold])
    lo, hi = lo if lo is not None else float(R_GRID[0]), hi if hi is not None else float(R_GRID[-1])
    bounded = (lo > R_GRID[0], hi < R_GRID[-1])
    summary = {(True, True): f"{r_star:.3g} [{lo:.3g}, {hi:.3g}]", (True, False): f"> {lo:.3g} (no upper bound)",
               (False, True): f"< {hi:.3g} (no lower bound)", (False, False): "not constrained"}[bounded]
    return {"r_star": r_star, "r_star_interval": [lo, hi], "r_star_95": summary, "interval_level": 0.95,
            "bounded_below": bool(lo > R_GRID[0]), "bounded_above": bool(hi < R_GRID[-1]), **params, "rss": rss,
            "rmse": math.sqrt(rss / epochs.size), "unique_tokens": unique, "floor_fixed": floor is not None}


# ---------------------------------------------------------------------------------------------------- the sweep
def run_dir(out: Path, objective: str, epochs) -> Path:
    return out / f"{objective}_e{epochs:g}"


def final_record(path: Path) -> dict | None:
    """The run's summary (None while unfinished) with its last validation loss and the epoch-end curve."""
    log = path / "metrics.jsonl"
    if not log.is_file():
        return None
    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    summary = next((r for r in recs if "summary/total_steps" in r and "summary/flops" in r), None)
    vals = [r for r in recs if "val/loss" in r]
    if summary is None or not vals:
        return None
    return {"val_loss": vals[-1]["val/loss"], "best_val_loss": min(r["val/loss"] for r in vals),
            "flops": summary["summary/flops"],
            "unique_tokens": summary["summary/unique_tokens"], "steps": summary["summary/total_steps"],
            "epoch_curve": [[r.get("train/epoch"), r["step"], r["val/loss"]] for r in vals if "train/epoch" in r]}


def train(out: Path, objective: str, epochs: float, a) -> None:
    path = run_dir(out, objective, epochs)
    if final_record(path):
        return
    overrides = [f"data.unique_tokens={a.unique_tokens}", "trainer.max_steps=null", f"trainer.max_epochs={epochs}",
                 f"trainer.output_dir={out}", f"trainer.run_name={path.name}", "trainer.overwrite=true",
                 f"trainer.seed={a.seed}", "trainer.progress_bar=false", "sample.at_end=0", "wandb.enabled=false",
                 "metrics.console=false", f"model.causal={objective == 'ar'}", *a.set]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    with (out / f"{path.name}.log").open("w") as log:
        subprocess.run([sys.executable, str(ROOT / "tdlm" / "train.py"), a.config, *overrides], env=env,
                       check=True, stdout=log, stderr=subprocess.STDOUT)


def data_floor(path: Path) -> float | None:
    """The entropy rate of a run's corpus when it is known (the Markov source), from its prepared data."""
    from tdlm.data import prepare_dataset
    from tdlm.runs import load_run_config

    cfg = load_run_config(path)
    if cfg is None or cfg.data.source != "markov":
        return None
    info = json.loads((prepare_dataset(cfg.data, log=lambda *a: None) / "info.json").read_text())
    return info.get("true_nll_per_token")


def crossover(ar: dict, diff: dict, target: str) -> dict:
    """Where diffusion overtakes AR for good: the first epoch count from which diffusion's bound is at or below
    AR's loss at every larger count, after AR was ahead at a smaller one (Prabhudesai et al.'s critical compute).
    Diffusion ahead everywhere (both still at the unigram level, say) is not a crossover."""
    shared = sorted(set(ar) & set(diff))
    ahead = [diff[e][target] <= ar[e][target] for e in shared]
    for i, e in enumerate(shared):
        if i > 0 and all(ahead[i:]) and not all(ahead[:i]):
            return {"seen": True, "epochs": e, "flops": diff[e]["flops"], "epochs_compared": shared}
    return {"seen": False, "epochs_compared": shared, "diffusion_ahead": dict(zip(map(str, shared), ahead))}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color in (("diffusion", "C0"), ("ar", "k")):
        runs = result["runs"].get(name) or {}
        if not runs:
            continue
        e = np.array(sorted(runs, key=float), dtype=float)
        loss = np.array([runs[k][result["target"]] for k in sorted(runs, key=float)])
        flops = np.array([runs[k]["flops"] for k in sorted(runs, key=float)])
        label = "diffusion (bound)" if name == "diffusion" else "AR (exact)"
        axes[0].plot(e, loss, "o", color=color, label=label)
        axes[1].plot(flops, loss, "o-", color=color, label=label)
        fit = result["fits"].get(name)
        if fit and "r_star" in fit:
            grid = np.geomspace(e.min(), e.max(), 100)
            axes[0].plot(grid, loss_model(grid, fit["unique_tokens"], fit["E"], fit["B"], fit["beta"],
                                          fit["r_star"]), color=color, alpha=0.6,
                         label=f"fit, R* (95%): {fit['r_star_95']}")
    for ax, xlabel in zip(axes, ("epochs of the unique tokens", "training FLOPs")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss, nats/token")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['unique_tokens']:,} unique tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "data_constrained.yaml"))
    ap.add_argument("--unique-tokens", type=int, default=4096)
    ap.add_argument("--epochs", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--objectives", nargs="+", default=["diffusion", "ar"], choices=["diffusion", "ar"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="per run")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every run (key=value)")
    ap.add_argument("--read-only", action="store_true", help="fit the finished runs, start none")
    ap.add_argument("--target", choices=["best_val_loss", "val_loss"], default="best_val_loss",
                    help="each run's best epoch-end validation loss (early stopped: what E epochs can reach, "
                         "monotone in E as the model assumes) or its final one")
    ap.add_argument("--floor", default="auto",
                    help="E of the fit: auto = the corpus's entropy rate when known (Markov), none = fitted, or "
                         "a number (nats/token)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not a.read_only:
        for e in a.epochs:  # epoch-major: both objectives advance together
            for objective in a.objectives:
                train(out, objective, e, a)
    result = {"unique_tokens": a.unique_tokens, "config": a.config, "target": a.target, "runs": {}, "fits": {},
              "sweep_seconds": round(time.perf_counter() - t0, 1)}
    for objective in a.objectives:
        runs = {f"{e:g}": rec for e in a.epochs if (rec := final_record(run_dir(out, objective, e)))}
        result["runs"][objective] = runs
        floor = (data_floor(run_dir(out, objective, float(next(iter(runs))))) if a.floor == "auto" and runs else
                 None if a.floor in ("auto", "none") else float(a.floor))  # auto: from a finished run's data
        if len(runs) >= 5:
            e = np.array([float(k) for k in runs])
            loss = np.array([r[a.target] for r in runs.values()])
            unique = float(next(iter(runs.values()))["unique_tokens"])
            result["fits"][objective] = fit_effective_data(e, loss, unique, floor)
        else:
            result["fits"][objective] = {"skipped": f"{len(runs)} finished runs; the fit needs 5"}
    if all(result["runs"].get(k) for k in ("ar", "diffusion")):
        ar = {float(k): v for k, v in result["runs"]["ar"].items()}
        diff = {float(k): v for k, v in result["runs"]["diffusion"].items()}
        result["crossover"] = crossover(ar, diff, a.target)
    (out / "data_constrained.json").write_text(json.dumps(result, indent=1))
    if any(result["runs"].values()):
        plot(result, out / "data_constrained.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
