"""Diffusion run vs autoregressive run: one Markdown + JSON report (and a PNG of val loss vs epochs).

    python eval/compare.py --diffusion runs/quickstart --ar runs/quickstart_ar --out reports/ar_vs_diffusion \
        --scorer /models/gpt2-large --num-samples 64 --steps 128 --mc-passes 8

Columns per run: parameters (total, non-embedding), tokens seen (steps x global batch x sequence length, the
convention that does not differ 2x between papers), validation perplexity (diffusion: NELBO bound with its
Monte-Carlo stderr; AR: exact), gen-PPL with unigram entropy and repeated 4-gram rate (under ``--scorer``, or
"n/a" without one: entropy and repetition are then on the model's own tokens), and training wall time (the
``summary/training_time_hours`` of every session in metrics.jsonl, summed). The data-constrained view lists
validation loss against epochs (steps x global batch / training rows) for both runs. One process; CPU is fine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.accel import eval_accelerator, release
from tdlm.engine.checkpoint import latest_checkpoint, read_state
from tdlm.config import ConfigError
from tdlm.gen_metrics import aggregate, load_scorer, repetition_rate, score_samples, unigram_entropy
from tdlm.likelihood import checkpoint_likelihood, eval_split
from tdlm.runs import count_parameters, load_checkpoint, read_metrics_jsonl, run_dir_of, run_world_size
from tdlm.sampling import SamplerConfig, build_canvas, sample_checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusion", required=True, help="diffusion run dir or checkpoint")
    p.add_argument("--ar", required=True, help="autoregressive run dir or checkpoint")
    p.add_argument("--out", required=True, help="output directory (compare.md, compare.json, val_vs_epochs.png)")
    p.add_argument("--which", default="best", choices=["best", "latest"])
    p.add_argument("--scorer", help="causal LM for gen-PPL: a local HF directory or an AR checkpoint/run of ours")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=64, help="diffusion sampling steps")
    p.add_argument("--estimator", default="stratified", choices=["stratified", "iid", "exact-k"])
    p.add_argument("--mc-passes", type=int, default=4)
    p.add_argument("--max-sequences", type=int, default=0, help="validation rows to score (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def training_facts(ck) -> dict:
    """Parameters, tokens seen, wall time and the val-loss-vs-epochs history of a checkpoint's run."""
    cfg, run_dir = ck.config, run_dir_of(ck.path)
    if cfg is None:
        raise ConfigError(f"{ck.path}: no config.yaml in its run dir {run_dir}; compare needs the run dir")
    world = run_world_size(run_dir)
    global_batch = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * world
    step = int(ck.state["step"])
    hours = None
    if (run_dir / "metrics.jsonl").is_file():
        _, per_session = read_metrics_jsonl(run_dir).series("summary/training_time_hours")
        hours = math.fsum(per_session) if per_session else None
    last = latest_checkpoint(run_dir / "checkpoints")
    history = read_state(last).get("history", {}).get("val_loss", []) if last else []
    try:
        train_rows = len(eval_split("train", ck.tokenizer, cfg.data.seq_len, cfg))
    except (ConfigError, OSError):
        train_rows = None  # data not reachable here: completed epochs only
    curve = [{"step": s, "epochs_completed": e, "epochs": s * global_batch / train_rows if train_rows else None,
              "val_loss": v} for s, e, v in history]
    return {"run": run_dir.name, "checkpoint_step": step, "parameters": count_parameters(ck.model),
            "global_batch": global_batch, "seq_len": cfg.data.seq_len,
            "tokens_seen": step * global_batch * cfg.data.seq_len, "train_rows": train_rows,
            "wall_time_hours": hours, "val_vs_epochs": curve}


def generation_facts(ck, args, scorer) -> dict:
    cfg = SamplerConfig(steps=args.steps, method="ancestral", forbidden_token_ids=(ck.tokenizer.pad_token_id,))
    seq_len = ck.config.data.seq_len
    first = None
    if ck.causal:
        first = [int(r[0]) for r in eval_split("validation", ck.tokenizer, seq_len, ck.config)["input_ids"]]
    samples, _ = sample_checkpoint(ck.model, ck.tokenizer, list(range(args.num_samples)), cfg, args.seed,
                                   build_canvas(ck.tokenizer, seq_len), first_tokens=first)
    if scorer is not None:
        return {**aggregate(score_samples([s["text"] for s in samples], scorer)), "measured_on": "scorer tokens",
                "example": samples[0]["text"][:200]}
    special = set(ck.tokenizer.all_special_ids)
    own = [[t for t in s["ids"] if t not in special] for s in samples]
    n = max(1, len(own))
    return {"gen_ppl": None, "num_samples": len(own), "measured_on": "model tokens (no --scorer)",
            "unigram_entropy": math.fsum(map(unigram_entropy, own)) / n,
            "repetition_rate_4gram": math.fsum(repetition_rate(x) for x in own) / n,
            "example": samples[0]["text"][:200]}


def _fmt(v, spec=".3f", none="n/a") -> str:
    if v is None:
        return none
    return f"{v:{spec}}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def markdown(report: dict) -> str:
    lines = ["# Diffusion vs autoregressive", "",
             "| run | kind | params (non-emb.) | tokens seen | val ppl | NELBO/NLL per token ± stderr | gen-PPL "
             "| unigram entropy | rep. 4-grams | wall time (h) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        ppl, gen = r["perplexity"], r["generation"]
        kind = "AR (exact)" if ppl["kind"] == "exact" else f"diffusion (bound, {ppl['estimator']} x{ppl['mc_passes']})"
        lines.append(f"| {r['run']} | {kind} | {r['parameters']['total']:,} ({r['parameters']['non_embedding']:,}) "
                     f"| {r['tokens_seen']:,} | {ppl['perplexity']:.3f} | {ppl['nelbo_per_token']:.4f} ± "
                     f"{_fmt(ppl['stderr'], '.4f')} | {_fmt(gen['gen_ppl'])} | {_fmt(gen['unigram_entropy'])} "
                     f"| {_fmt(gen['repetition_rate_4gram'])} | {_fmt(r['wall_time_hours'], '.4f')} |")
    lines += ["", f"gen-PPL scorer: {report['settings']['scorer'] or 'none (gen-PPL not reported)'}; "
              f"{report['settings']['num_samples']} samples per run, diffusion: ancestral, "
              f"{report['settings']['steps']} steps, float64 Gumbel. Entropy and repetition measured on "
              f"{report['runs'][0]['generation']['measured_on']}.", "",
              "## Data-constrained view: validation loss vs epochs", "",
              "| run | step | epochs | val loss | val ppl |", "|---|---|---|---|---|"]
    for r in report["runs"]:
        for p in r["val_vs_epochs"]:
            ep = f"{p['epochs']:.3f}" if p["epochs"] is not None else f"{p['epochs_completed']} (completed)"
            lines.append(f"| {r['run']} | {p['step']} | {ep} | {p['val_loss']:.4f} | {math.exp(p['val_loss']):.3f} |")
    if report.get("plot"):
        lines += ["", f"![val loss vs epochs]({report['plot']})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["runs"]:
        pts = r["val_vs_epochs"]
        if pts:
            x = [p["epochs"] if p["epochs"] is not None else p["epochs_completed"] for p in pts]
            ax.plot(x, [p["val_loss"] for p in pts], marker="o", label=f"{r['run']} ({r['perplexity']['kind']})")
    ax.set_xlabel("epochs")
    ax.set_ylabel("val loss (nats/token; diffusion: NELBO)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def compare(args) -> dict:
    scorer = load_scorer(args.scorer) if args.scorer else None
    runs = []
    accelerator = eval_accelerator()
    try:
        for path, want_causal in ((args.diffusion, False), (args.ar, True)):
            ck = load_checkpoint(path, args.which)
            if ck.causal != want_causal:
                flag = "--ar" if want_causal else "--diffusion"
                raise ConfigError(f"{flag}: {ck.path} is {'an AR' if ck.causal else 'a diffusion'} checkpoint")
            ppl = checkpoint_likelihood(ck, accelerator, estimator=args.estimator, passes=args.mc_passes,
                                        seed=args.seed, max_sequences=args.max_sequences)
            runs.append({**training_facts(ck), "perplexity": ppl, "generation": generation_facts(ck, args, scorer)})
    finally:
        release(accelerator)
    settings = {k: getattr(args, k) for k in ("scorer", "num_samples", "steps", "estimator", "mc_passes", "seed",
                                              "which", "max_sequences")}
    return {"runs": runs, "settings": settings}


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if not args.scorer:
            print("warning: no --scorer; gen-PPL is reported as n/a", file=sys.stderr)
        report = compare(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = plot(report, out / "val_vs_epochs.png")
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
