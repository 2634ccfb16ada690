"""Generative perplexity of samples under a causal scorer, with unigram entropy and repetition rate beside it.

    python eval/gen_ppl.py --samples samples.jsonl --scorer /models/gpt2-large --json
    python eval/gen_ppl.py --samples samples.jsonl --scorer runs/quickstart_ar            # an AR run of ours
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no eval/gen_ppl.py --samples samples.jsonl --scorer SCORER --json

``--samples``: JSONL files with a ``text`` field (as eval/generate.py writes) or .txt files (one sample per
blank-line-separated paragraph). ``--scorer``: a local HF causal-LM directory (never downloaded) or an AR
checkpoint / run dir of ours. Without a scorer the script stops with an error instead of reporting anything.
Entropy and repetition are measured on the scorer's tokens, so runs scored by one scorer are comparable.
Aggregation and conventions: ``tdlm/gen_metrics.py``.

Frontier (``tdlm/frontier.py``; one process): sample each checkpoint at several temperatures (or step counts),
score every batch with the scorer, and plot gen-PPL against unigram entropy, all checkpoints on one plot:

    python eval/gen_ppl.py --frontier --checkpoints runs/quickstart runs/quickstart_ar --scorer /models/gpt2-large \
        --temperatures 1.0 0.9 0.8 --steps 128 --num-samples 32 --out reports/frontier   # frontier.png + .json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.accel import gather_objects, run_script, shard
from tdlm.config import ConfigError
from tdlm.gen_metrics import aggregate, load_scorer, score_samples
from tdlm.sampling import METHODS


def read_samples(paths: list[str]) -> list[str]:
    texts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"--samples: file not found: {p}")
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if line.strip():
                    rec = json.loads(line)
                    if "text" not in rec:
                        raise ConfigError(f"--samples: {p} line {n} has no 'text' field")
                    texts.append(rec["text"])
        else:
            texts += [t.strip() for t in p.read_text().split("\n\n") if t.strip()]
    if not texts:
        raise ConfigError(f"--samples: no samples in {', '.join(paths)}")
    return texts


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", help="sample files to score (not with --frontier)")
    p.add_argument("--scorer", help="local HF causal LM directory or AR checkpoint/run dir of ours (required)")
    p.add_argument("--rep-n", type=int, default=4, help="n of the repeated n-gram rate")
    p.add_argument("--max-samples", type=int, default=0)
    p.add_argument("--json", action="store_true")
    f = p.add_argument_group("frontier")
    f.add_argument("--frontier", action="store_true", help="sample and score a gen-PPL / entropy frontier")
    f.add_argument("--checkpoints", nargs="+", default=[], help="checkpoints or run dirs, one curve each")
    f.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.9, 0.8])
    f.add_argument("--steps", nargs="+", type=int, default=[64], help="diffusion sampler steps (one or several)")
    f.add_argument("--method", default="ancestral", choices=METHODS)
    f.add_argument("--num-samples", type=int, default=16, help="per point")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--which", default="best", choices=["best", "latest"])
    f.add_argument("--out", help="directory for frontier.json and frontier.png")
    args = p.parse_args(argv)
    if args.frontier and (args.samples or not args.checkpoints or not args.out):
        p.error("--frontier: give --checkpoints and --out, and no --samples")
    if not args.frontier and not args.samples:
        p.error("--samples: required (or --frontier with --checkpoints)")
    return args


def frontier(args) -> dict:
    """Every checkpoint's points, the plot, and the JSON written to --out."""
    from tdlm.frontier import frontier_points, plot_frontier
    from tdlm.runs import load_checkpoint

    scorer = load_scorer(args.scorer)
    curves, runs = {}, []
    for path in args.checkpoints:
        ck = load_checkpoint(path, args.which)
        label = ck.path.parent.parent.name if ck.path.parent.name == "checkpoints" else ck.path.name
        label = label if label not in curves else f"{label}-{len(curves)}"
        curves[label] = frontier_points(ck, scorer, args.temperatures, args.steps, args.num_samples, args.seed,
                                        args.method)
        runs.append({"label": label, "checkpoint": str(ck.path), "causal": ck.causal, "points": curves[label]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"scorer": scorer.name, "runs": runs, "plot": plot_frontier(curves, out / "frontier.png")}
    (out / "frontier.json").write_text(json.dumps(report, indent=1))
    return report


def compute(texts: list[str], scorer, accelerator, rep_n: int = 4) -> dict:
    """Scores every text once across the processes; the same result on each."""
    mine = shard(accelerator, len(texts))
    scores = score_samples([texts[i] for i in mine], scorer, mine, rep_n)
    out = {**aggregate(gather_objects(accelerator, scores), rep_n), "scorer": scorer.name}
    if not out["scored_tokens"]:
        raise ConfigError("--samples: nothing to score (every sample is empty after removing special tokens)")
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.frontier:
        code, out, is_main = run_script(lambda accelerator: frontier(args))
        if code == 0 and is_main and args.json:
            print(json.dumps(out))
        elif code == 0 and is_main:
            for r in out["runs"]:
                for pt in r["points"]:
                    print(f"{r['label']}: T={pt['temperature']:g} steps={pt['steps']} gen-PPL {pt['gen_ppl']:.3f} "
                          f"entropy {pt['unigram_entropy']:.3f} nats   ({pt['sampling_precision']})")
        return code

    def work(accelerator):
        scorer = load_scorer(args.scorer)  # fails before any scoring without a scorer
        texts = read_samples(args.samples)
        scorer.model.to(accelerator.device)
        return compute(texts[: args.max_samples] if args.max_samples else texts, scorer, accelerator, args.rep_n)

    code, out, is_main = run_script(work)
    if code or not is_main:
        return code
    if args.json:
        print(json.dumps(out))
    else:
        print(f"gen-PPL {out['gen_ppl']:.3f} over {out['scored_tokens']} tokens of {out['num_samples']} samples   "
              f"unigram entropy {out['unigram_entropy']:.3f} nats   repeated {args.rep_n}-grams "
              f"{out[f'repetition_rate_{args.rep_n}gram']:.3f}   scorer {out['scorer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
