"""Review training runs: final/best validation perplexity, the health rules that fired and when, tier-metric
trends (mask accuracy, corruption buckets, gradient balance), per run and across runs, in Markdown with PNG plots.

    python eval/review.py --runs runs/quickstart runs/quickstart_ar --out reports/review    # our run dirs
    python eval/review.py --runs runs/quickstart/wandb/offline-run-20261123_005720-iisa3ndw --out reports/r
    python eval/review.py --project my-entity/tdlm --out reports/review --max-runs 20       # wandb public API

``--runs`` takes our run dirs (``metrics.jsonl``), offline wandb run dirs or their ``run-<id>.wandb`` files, or
a directory of wandb runs. Metric names are those of docs/metrics.md: ``metrics/mask_accuracy``,
``research/{low,medium,high}_corruption_accuracy``, ``research/gradient_norm_*``, and ``health/<rule>`` = 1 when a
rule fires; a name is also matched by its last component (``tier1/mask_accuracy``), and every section is skipped
when its metrics are absent. Writes ``report.md``, ``report.json`` and the PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.config import ConfigError
from tdlm.runs import RunHistory, find_runs, numeric_items

ACCURACY = ["metrics/mask_accuracy", "research/low_corruption_accuracy", "research/medium_corruption_accuracy",
            "research/high_corruption_accuracy"]
GRADIENTS = ["research/gradient_norm_low_corruption", "research/gradient_norm_medium_corruption",
             "research/gradient_norm_high_corruption", "research/gradient_norm_total"]
RATIO = "research/gradient_norm_ratio_high_to_low"
TREND_KEYS = ["train/loss", "val/loss", *ACCURACY, *GRADIENTS, RATIO]


def resolve_key(run: RunHistory, key: str) -> str | None:
    """The run's name for a metric: exact, else the only key with the same last component."""
    keys = run.keys()
    if key in keys:
        return key
    tail = key.rsplit("/", 1)[-1]
    matches = sorted(k for k in keys if k.rsplit("/", 1)[-1] == tail)
    return matches[0] if len(matches) == 1 else None


def series(run: RunHistory, key: str) -> tuple[list[int], list[float]]:
    actual = resolve_key(run, key)
    return run.series(actual) if actual else ([], [])


def trend(steps: list[int], values: list[float]) -> dict:
    """First/last/min/max and early-vs-late means (first and last fifth of the points)."""
    n = len(values)
    k = max(1, n // 5)
    early, late = sum(values[:k]) / k, sum(values[-k:]) / k
    scale = max(abs(early), abs(late), 1e-12)
    direction = "flat" if abs(late - early) < 0.02 * scale else ("up" if late > early else "down")
    return {"points": n, "first_step": steps[0], "last_step": steps[-1], "first": values[0], "last": values[-1],
            "min": min(values), "max": max(values), "early_mean": early, "late_mean": late, "direction": direction}


def health_events(run: RunHistory) -> list[dict]:
    out = []
    for key in sorted(k for k in run.keys() if k.startswith("health/")):
        steps, values = run.series(key)
        fired = [s for s, v in zip(steps, values) if v >= 0.5]
        if fired:
            out.append({"rule": key.split("/", 1)[1], "times": len(fired), "first_step": fired[0],
                        "last_step": fired[-1], "steps": fired[:20]})
    return out


def findings(trends: dict) -> list[str]:
    """Readings of the final values against the healthy ranges docs/metrics.md gives."""
    notes = []
    acc = trends.get("metrics/mask_accuracy")
    if acc:
        level = "good (>60%)" if acc["late_mean"] > 0.6 else "moderate (40-60%)" if acc["late_mean"] >= 0.4 \
            else "poor (<40%)"
        notes.append(f"mask accuracy ends at {acc['late_mean']:.3f}: {level}, trend {acc['direction']}")
    med, high = trends.get(ACCURACY[2]), trends.get(ACCURACY[3])
    if med and high and high["late_mean"] > med["late_mean"]:
        notes.append("high-corruption accuracy exceeds medium-corruption accuracy (unnatural pattern)")
    for key in ACCURACY[1:]:
        if trends.get(key) and trends[key]["last"] == 0.0:
            notes.append(f"{key} is 0 at the end (masking or training failure)")
    ratio = trends.get(RATIO)
    if ratio and not 0.1 <= ratio["late_mean"] <= 10.0:
        notes.append(f"gradient norm ratio high/low = {ratio['late_mean']:.3g}: extreme (outside 0.1-10)")
    elif ratio and not 0.2 <= ratio["late_mean"] <= 2.0:
        notes.append(f"gradient norm ratio high/low = {ratio['late_mean']:.3g}: imbalanced (outside 0.2-2)")
    high_g = trends.get(GRADIENTS[2])
    if high_g and high_g["late_mean"] < 0.01:
        notes.append(f"high-corruption gradient norm {high_g['late_mean']:.3g} < 0.01: vanishing")
    val = trends.get("val/loss")
    if val and val["last"] > val["min"] * 1.02 and val["points"] >= 3:
        notes.append(f"val loss ended {val['last']:.4f}, above its best {val['min']:.4f} (overfitting?)")
    return notes


def analyse(run: RunHistory) -> dict:
    steps, ppl = series(run, "val/perplexity")
    if not ppl:  # older logs: derive from the loss
        steps, loss = series(run, "val/loss")
        ppl = [math.exp(v) for v in loss]
    val = None
    if ppl:
        best = min(range(len(ppl)), key=ppl.__getitem__)
        val = {"final": ppl[-1], "final_step": steps[-1], "best": ppl[best], "best_step": steps[best]}
    trends = {}
    for key in TREND_KEYS:
        s, v = series(run, key)
        if v:
            trends[key] = {"key": resolve_key(run, key), **trend(s, v)}
    all_steps = [r["step"] for r in run.rows]
    return {"name": run.name, "source": run.source, "last_step": max(all_steps) if all_steps else None,
            "val_perplexity": val, "health": health_events(run), "trends": trends, "findings": findings(trends)}


# ------------------------------------------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "run"


def plot_run(run: RunHistory, info: dict, out: Path) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss (nats/token)", ["train/loss", "val/loss"], False),
              ("val perplexity", ["val/perplexity"], False),
              ("accuracy on masked tokens", ACCURACY, False),
              ("gradient norm by corruption", GRADIENTS, True)]
    panels = [p for p in panels if any(series(run, k)[1] for k in p[1])]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys, logy) in zip(axes[:, 0], panels):
        for key in keys:
            s, v = series(run, key)
            if v:
                ax.plot(s, v, marker="." if len(v) < 50 else None, label=key)
        for event in info["health"]:  # where rules fired
            for step in event["steps"]:
                ax.axvline(step, color="red", alpha=0.25, lw=1)
        ax.set_title(title, fontsize=9)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step" + ("   (red: health rule fired)" if info["health"] else ""))
    fig.tight_layout()
    name = f"{_safe(run.name)}.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    return name


def plot_across(runs: list[RunHistory], out: Path) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("val/perplexity", "metrics/mask_accuracy") if any(series(r, k)[1] for r in runs)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in runs:
            s, v = series(r, key)
            if v:
                ax.plot(s, v, marker=".", label=r.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "across_runs.png", dpi=90)
    plt.close(fig)
    return "across_runs.png"


# ------------------------------------------------------------------------------------------------------- report


def _f(v, spec=".4g"):
    return "n/a" if v is None else f"{v:{spec}}"


def markdown(infos: list[dict], across: str | None) -> str:
    lines = ["# Training run review", "", "| run | last step | final val ppl | best val ppl (step) | final mask acc. "
             "| health rules fired |", "|---|---|---|---|---|---|"]
    for i in infos:
        v, acc = i["val_perplexity"] or {}, i["trends"].get("metrics/mask_accuracy")
        fired = ", ".join(f"{h['rule']} x{h['times']}" for h in i["health"]) or "none"
        best = f"{v['best']:.4g} ({v['best_step']})" if v else "n/a"
        lines.append(f"| {i['name']} | {_f(i['last_step'], 'd')} | {_f(v.get('final'))} | {best} "
                     f"| {_f(acc['last'] if acc else None, '.3f')} | {fired} |")
    if across:
        lines += ["", f"![across runs]({across})"]
    for i in infos:
        lines += ["", f"## {i['name']}", "", f"source: `{i['source']}`", ""]
        v = i["val_perplexity"]
        lines.append(f"- validation perplexity: final {v['final']:.4g} at step {v['final_step']}, best {v['best']:.4g} "
                     f"at step {v['best_step']}" if v else "- validation perplexity: not logged")
        if i["health"]:
            lines += ["", "Health rules that fired:", "", "| rule | times | first step | last step | steps |",
                      "|---|---|---|---|---|"]
            lines += [f"| {h['rule']} | {h['times']} | {h['first_step']} | {h['last_step']} | "
                      f"{', '.join(map(str, h['steps']))} |" for h in i["health"]]
        else:
            lines.append("- health rules: none fired (or none logged)")
        if i["trends"]:
            lines += ["", "| metric | points | first | last | min | max | trend (early → late mean) |",
                      "|---|---|---|---|---|---|---|"]
            for key, t in i["trends"].items():
                lines.append(f"| {t['key']} | {t['points']} | {_f(t['first'])} | {_f(t['last'])} | {_f(t['min'])} "
                             f"| {_f(t['max'])} | {t['direction']} ({_f(t['early_mean'])} → {_f(t['late_mean'])}) |")
        missing = [k for k in ACCURACY + GRADIENTS if k not in i["trends"]]
        if missing:
            lines.append(f"\nNot logged in this run: {', '.join(missing)}")
        if i["findings"]:
            lines += ["", "Findings:", ""] + [f"- {f}" for f in i["findings"]]
        if i.get("plot"):
            lines += ["", f"![{i['name']}]({i['plot']})"]
    return "\n".join(lines) + "\n"


def load_project(project: str, max_runs: int = 0) -> list[RunHistory]:
    """Runs of ENTITY/PROJECT through the wandb public API (network; the one boundary tests mock)."""
    import wandb

    runs = []
    for run in wandb.Api().runs(project):
        rows = []
        for rec in run.scan_history():
            step = rec.get("trainer/global_step", rec.get("_step"))
            if isinstance(step, (int, float)):
                rows.append({**numeric_items({k: v for k, v in rec.items() if not k.startswith("_")}),
                             "step": int(step)})
        runs.append(RunHistory(run.name, rows, dict(run.config), f"wandb:{project}/{run.id}"))
        if max_runs and len(runs) >= max_runs:
            break
    if not runs:
        raise ConfigError(f"--project: no runs in {project}")
    return runs


def review(runs: list[RunHistory], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    infos = []
    for run in runs:  # duplicate names (several wandb runs called "tdlm") get a suffix
        names[run.name] = names.get(run.name, 0) + 1
        if names[run.name] > 1:
            run.name = f"{run.name}-{names[run.name]}"
        info = analyse(run)
        info["plot"] = plot_run(run, info, out)
        infos.append(info)
    across = plot_across(runs, out) if len(runs) > 1 else None
    (out / "report.md").write_text(markdown(infos, across))
    report = {"runs": infos, "across_plot": across}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", help="run dirs, wandb run dirs or run-<id>.wandb files")
    src.add_argument("--project", help="ENTITY/PROJECT on wandb (public API)")
    p.add_argument("--max-runs", type=int, default=0)
    p.add_argument("--out", default="review")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = load_project(args.project, args.max_runs) if args.project else \
            [r for path in args.runs for r in find_runs(Path(path))]
        review(runs, Path(args.out))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"reviewed {len(runs)} run(s): {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
