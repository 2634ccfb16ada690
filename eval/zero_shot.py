"""Zero-shot perplexity of a checkpoint on the MDLM/DUO test sets (PTB, WikiText-2/103, LM1B, LAMBADA, AG News,
PubMed, arXiv), from local copies only, with the published figures beside ours.

    python eval/zero_shot.py --checkpoint runs/quickstart --data ptb=/data/ptb/test.jsonl lambada=/data/lambada.jsonl
    python eval/zero_shot.py --checkpoint CKPT --data-root /data/zero_shot --estimator exact-k --mc-passes 8 \
        --out reports/zs                     # every set found under the root; writes zero_shot.json and zero_shot.md
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no eval/zero_shot.py --checkpoint CKPT --data-root DIR --json   # same numbers as one process

The protocol (detokenizers, chunking, what is scored) is documented in ``tdlm/zero_shot.py``. A set is read from
``--data NAME=PATH`` or ``--data-root DIR`` (``DIR/NAME.jsonl`` etc. or ``DIR/NAME/``); ``--datasets`` picks sets
(default: every set with local data; a named set without data is an error). Each set reports the bound (or the
exact AR NLL) per token +- its Monte-Carlo stderr, tokens scored, estimator and passes. Exit code 2 with one
line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.accel import run_script
from tdlm.likelihood import ESTIMATORS
from tdlm.runs import load_checkpoint
from tdlm.zero_shot import CHUNKING, SETS, evaluate_sets, markdown_table, resolve_paths


def add_zero_shot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", nargs="+", help=f"of {', '.join(SETS)} (default: those with local data)")
    p.add_argument("--data", nargs="+", default=[], metavar="NAME=PATH", help="a local file or directory per set")
    p.add_argument("--data-root", help="a directory holding NAME.jsonl/.json/.parquet/.csv/.txt or NAME/")
    p.add_argument("--split", help="split of a directory dataset (default: the set's own, test)")
    p.add_argument("--chunking", default="wrap", choices=CHUNKING)
    p.add_argument("--seq-len", type=int, default=0, help="block length L (default: the model's length)")
    p.add_argument("--max-documents", type=int, default=0, help="0 = every document")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (see --which)")
    p.add_argument("--which", default="best", choices=["best", "latest"])
    add_zero_shot_args(p)
    p.add_argument("--estimator", default="stratified", choices=ESTIMATORS)
    p.add_argument("--mc-passes", type=int, default=4, help="Monte-Carlo passes (>= 2 for a stderr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t-min", type=float, default=None, help="default: the checkpoint's own")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--out", help="directory for zero_shot.json and zero_shot.md")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.mc_passes < 1 or args.batch_size < 1:
        p.error("--mc-passes and --batch-size must be >= 1")
    return args


def compute(args, accelerator) -> dict:
    paths = resolve_paths(args.datasets, args.data, args.data_root)
    ck = load_checkpoint(args.checkpoint, args.which)
    results = evaluate_sets(ck, accelerator, paths, args.chunking, args.seq_len, args.split, args.estimator,
                            args.mc_passes, args.seed, args.t_min, args.batch_size, args.max_documents)
    return {"checkpoint": str(ck.path), "step": ck.state.get("step"), "causal": ck.causal, "sets": results,
            "not_available": [n for n in SETS if n not in paths], "num_processes": accelerator.num_processes}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    code, out, is_main = run_script(lambda accelerator: compute(args, accelerator))
    if code or not is_main:
        return code
    table = markdown_table(out["sets"])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "zero_shot.json").write_text(json.dumps(out, indent=1))
        (Path(args.out) / "zero_shot.md").write_text(f"# Zero-shot perplexity: {out['checkpoint']}\n\n{table}\n")
    print(json.dumps(out) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
