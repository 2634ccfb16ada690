"""One evaluation report for a list of checkpoints: in-domain bound, zero-shot suite, lm-eval tasks, gen-PPL frontier.

    python eval/report.py --checkpoints runs/quickstart runs/quickstart_ar --out reports/eval \
        --data-root /data/zero_shot --tasks arc_easy --scorer /models/gpt2-large --mc-passes 8

Per checkpoint, each part that has what it needs (nothing is downloaded):
- in-domain: the NELBO bound +- stderr (AR: exact) on the run's validation split (``tdlm.likelihood``);
- zero-shot: every set under ``--data-root`` / ``--data`` (``tdlm/zero_shot.py``), beside the published figures;
- harness: ``--tasks`` through lm-eval (``tdlm/harness.py``; needs the ``eval`` extra);
- frontier: gen-PPL vs entropy at ``--temperatures`` under ``--scorer`` (``tdlm/frontier.py``), one plot.
Writes report.md (tables and plots), report.json and frontier.png to ``--out``. One process; exit code 2 with
one line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.accel import run_script
from tdlm.config import ConfigError
from tdlm.likelihood import ESTIMATORS, checkpoint_likelihood
from tdlm.runs import load_checkpoint
from tdlm.zero_shot import CHUNKING, evaluate_sets, markdown_table, resolve_paths


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints or run dirs")
    p.add_argument("--which", default="best", choices=["best", "latest"])
    p.add_argument("--out", required=True)
    p.add_argument("--estimator", default="exact-k", choices=ESTIMATORS)
    p.add_argument("--mc-passes", type=int, default=8, help="passes of every diffusion bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-sequences", type=int, default=0, help="in-domain validation rows (0 = all)")
    z = p.add_argument_group("zero-shot")
    z.add_argument("--data", nargs="+", default=[], metavar="NAME=PATH")
    z.add_argument("--data-root")
    z.add_argument("--chunking", default="wrap", choices=CHUNKING)
    z.add_argument("--max-documents", type=int, default=0)
    h = p.add_argument_group("lm-eval")
    h.add_argument("--tasks", nargs="+", default=[])
    h.add_argument("--include-path")
    h.add_argument("--limit", type=float, default=None)
    f = p.add_argument_group("frontier")
    f.add_argument("--scorer", help="local causal scorer (HF dir or AR checkpoint); no frontier without one")
    f.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.8])
    f.add_argument("--steps", type=int, default=64)
    f.add_argument("--num-samples", type=int, default=8)
    args = p.parse_args(argv)
    if args.mc_passes < 1 or args.batch_size < 1:
        p.error("--mc-passes and --batch-size must be >= 1")
    return args


def label_of(ck) -> str:
    return ck.path.parent.parent.name if ck.path.parent.name == "checkpoints" else ck.path.name


def build(args, accelerator) -> dict:
    zs_paths = resolve_paths(None, args.data, args.data_root) if (args.data or args.data_root) else {}
    scorer = None
    if args.scorer:
        from tdlm.gen_metrics import load_scorer

        scorer = load_scorer(args.scorer)
    cks = [load_checkpoint(c, args.which) for c in args.checkpoints]
    report = {"checkpoints": [], "zero_shot_sets": list(zs_paths), "recipe": {
        "estimator": args.estimator, "mc_passes": args.mc_passes, "seed": args.seed, "chunking": args.chunking}}
    curves = {}
    for ck in cks:
        label = label_of(ck)
        entry = {"label": label, "checkpoint": str(ck.path), "step": ck.state.get("step"), "causal": ck.causal}
        if ck.config is not None:
            entry["in_domain"] = checkpoint_likelihood(ck, accelerator, estimator=args.estimator,
                                                       passes=args.mc_passes, seed=args.seed,
                                                       batch_size=args.batch_size, max_sequences=args.max_sequences)
        if zs_paths:
            entry["zero_shot"] = evaluate_sets(ck, accelerator, zs_paths, args.chunking, estimator=args.estimator,
                                               passes=args.mc_passes, seed=args.seed, batch_size=args.batch_size,
                                               max_documents=args.max_documents)
        if args.tasks:
            try:
                from tdlm.harness import run_tasks
            except ImportError:
                raise ConfigError("--tasks: lm-eval tasks need lm_eval: pip install -e .[eval]") from None
            entry["harness"], _ = run_tasks(accelerator, str(ck.path), args.tasks, args.include_path,
                                            args.mc_passes, args.batch_size, args.seed, args.limit, loaded=ck)
        if scorer is not None:
            from tdlm.frontier import frontier_points

            curves[label] = entry["frontier"] = frontier_points(ck, scorer, args.temperatures, [args.steps],
                                                                args.num_samples, args.seed)
        report["checkpoints"].append(entry)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if curves:
        from tdlm.frontier import plot_frontier

        report["frontier_plot"] = plot_frontier(curves, out / "frontier.png")
        report["scorer"] = scorer.name
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    return report


def _se(r: dict) -> str:
    if r.get("kind") == "exact":
        return "exact"
    return "n/a" if r.get("stderr") is None else f"{r['stderr']:.4f}"


def markdown(report: dict) -> str:
    lines = ["# Evaluation report", "", f"Recipe: {report['recipe']}", "", "## In-domain (validation split)", "",
             "| checkpoint | step | ppl | nelbo/token +- stderr | tokens | estimator x passes |",
             "|---|---|---|---|---|---|"]
    for c in report["checkpoints"]:
        r = c.get("in_domain")
        if r:
            bound = "<=" if r["kind"] == "bound" else ""
            lines.append(f"| {c['label']} | {c['step']} | {bound}{r['perplexity']:.3f} | {r['nelbo_per_token']:.4f} "
                         f"+- {_se(r)} | {r['num_tokens']} | {r['estimator']} x{r['mc_passes']} |")
    if report["zero_shot_sets"]:
        lines += ["", "## Zero-shot perplexity", ""]
        for c in report["checkpoints"]:
            lines += [f"### {c['label']}", "", markdown_table(c["zero_shot"], c["label"]), ""]
    else:
        lines += ["", "## Zero-shot perplexity", "", "No local data given (--data-root / --data): not run."]
    if any("harness" in c for c in report["checkpoints"]):
        lines += ["", "## lm-eval tasks", "", "| checkpoint | task | metric | value | distinct requests | "
                  "s / 100 requests | loglikelihood stderr (mean) |", "|---|---|---|---|---|---|---|"]
        for c in report["checkpoints"]:
            h = c.get("harness") or {}
            se = (h.get("loglikelihood_stderr") or h.get("rolling_stderr") or {}).get("mean")
            se = "n/a" if se is None else f"{se:.4f}"
            for task, metrics in (h.get("results") or {}).items():
                for k, v in metrics.items():
                    if isinstance(v, float) and math.isfinite(v) and "stderr" not in k:
                        lines.append(f"| {c['label']} | {task} | {k} | {v:.4f} | {h['distinct_requests']} | "
                                     f"{h['seconds_per_100_requests']:.2f} | {'exact' if c['causal'] else se} |")
    if report.get("frontier_plot"):
        lines += ["", f"## Gen-PPL frontier (scorer {report['scorer']})", "",
                  "| checkpoint | temperature | steps | gen-PPL | unigram entropy | repeated 4-grams | samples |",
                  "|---|---|---|---|---|---|---|"]
        for c in report["checkpoints"]:
            for p in c.get("frontier", []):
                lines.append(f"| {c['label']} | {p['temperature']:g} | {p['steps']} | {p['gen_ppl']:.3f} | "
                             f"{p['unigram_entropy']:.3f} | {p['repetition_rate_4gram']:.3f} | {p['num_samples']} |")
        lines += ["", f"Sampling: {report['checkpoints'][0]['frontier'][0]['sampling_precision']}.", "",
                  f"![frontier]({report['frontier_plot']})"]
    else:
        lines += ["", "## Gen-PPL frontier", "", "No --scorer: not run (gen-PPL needs a causal scorer)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    code, report, is_main = run_script(lambda accelerator: build(args, accelerator))
    if code == 0 and is_main:
        print(f"wrote {Path(args.out) / 'report.md'} ({len(report['checkpoints'])} checkpoints)")
    return code


if __name__ == "__main__":
    sys.exit(main())
