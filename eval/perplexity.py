"""Perplexity of a checkpoint: the masked-diffusion NELBO bound (Monte Carlo, with a standard error) or, for an
autoregressive checkpoint, the exact perplexity.

    python eval/perplexity.py --checkpoint runs/markov/checkpoints/step_0000800 --json
    python eval/perplexity.py --checkpoint runs/markov --which best --estimator exact-k --mc-passes 8 --json
    python eval/perplexity.py --checkpoint CKPT --text a.txt b.txt            # raw text, the checkpoint's tokenizer
    python eval/perplexity.py --checkpoint CKPT --data data/stdlib --split validation   # from data_prep/prepare.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no eval/perplexity.py --checkpoint CKPT --json    # same numbers as one process

Estimators (``tdlm/likelihood.py``): ``stratified`` t (default), ``iid`` t, and LLaDA's ``exact-k``; all are
unbiased for the bound the trainer reports as ``val/loss`` (same schedule, same t_min, read from the run's
config.yaml). ``stderr`` is the Monte-Carlo standard error over ``--mc-passes`` passes (null for one pass).
Without a data option the run's own data config is used. Exit code 2 with one line on stderr for bad input.
A block-diffusion checkpoint (``block_size`` in its model config) is scored on the block NELBO, each estimator
applied per block of L' tokens (``block_size`` in the JSON).
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
from tdlm.likelihood import ESTIMATORS, checkpoint_likelihood
from tdlm.runs import load_checkpoint


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (see --which)")
    p.add_argument("--which", default="best", choices=["best", "latest"], help="checkpoint of a run dir")
    p.add_argument("--split", choices=["validation", "train"],
                   help="split of --data or of the run's data (default validation); not with --text")
    p.add_argument("--data", help="a directory written by data_prep/prepare.py")
    p.add_argument("--text", nargs="+", help="raw .txt/.jsonl/.parquet files, tokenized with the checkpoint's tokenizer")
    p.add_argument("--estimator", default="stratified", choices=ESTIMATORS)
    p.add_argument("--mc-passes", type=int, default=4, help="Monte-Carlo passes over the set (>= 2 for a stderr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t-min", type=float, default=None, help="default: the checkpoint's own (its model config)")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--max-sequences", type=int, default=0, help="0 = the whole split")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.mc_passes < 1 or args.batch_size < 1:
        p.error("--mc-passes and --batch-size must be >= 1")
    if args.text and args.split:
        p.error("--split: raw --text files have no splits; the result is labelled split=text")
    return args


def compute(args, accelerator) -> dict:
    """The result dict (identical on every process)."""
    ck = load_checkpoint(args.checkpoint, args.which)
    return checkpoint_likelihood(ck, accelerator, split=args.split or "validation", data_dir=args.data,
                                 text_files=args.text, estimator=args.estimator, passes=args.mc_passes, seed=args.seed,
                                 t_min=args.t_min, batch_size=args.batch_size, max_sequences=args.max_sequences)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    code, out, is_main = run_script(lambda accelerator: compute(args, accelerator))
    if code or not is_main:
        return code
    if args.json:
        print(json.dumps(out))
    else:
        se = out["stderr"]
        what = "exact perplexity (AR)" if out["kind"] == "exact" else f"perplexity bound ({out['estimator']})"
        se_text = "n/a" if se is None else f"{se:.5f}"
        print(f"{what}: {out['perplexity']:.4f}   nelbo/token {out['nelbo_per_token']:.5f} nats +- {se_text}   "
              f"tokens {out['num_tokens']}   passes {out['mc_passes']}   ppl 95% {_ppl_interval(out)}")
    return 0


def _ppl_interval(out: dict) -> str:
    se = out["stderr"]
    if not se:
        return "exact" if se == 0.0 else "n/a"
    lo, hi = (math.exp(out["nelbo_per_token"] + s * 1.96 * se) for s in (-1, 1))
    return f"[{lo:.4f}, {hi:.4f}]"


if __name__ == "__main__":
    sys.exit(main())
