"""lm-evaluation-harness tasks on a tdlm checkpoint (needs the ``eval`` extra: ``pip install -e .[eval]``).

    python eval/harness.py --checkpoint runs/quickstart --tasks arc_easy --mc-passes 32 --out reports/harness
    python eval/harness.py --checkpoint CKPT --tasks my_task --include-path tasks/ --limit 100 --json
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no eval/harness.py --checkpoint CKPT --tasks my_task --include-path tasks/ --json

The adapter (``tdlm/harness.py``) answers ``loglikelihood`` by the exact-k conditional NELBO (``--mc-passes``;
each request's stderr is written to ``requests.jsonl`` and summarised), ``loglikelihood_rolling`` by the NELBO
bound in windows of the model's length, and ``generate_until`` with tdlm's samplers (``--steps``, ``--method``,
``--block-length``); AR checkpoints are scored exactly. Tasks come from lm-eval's registry or ``--include-path``;
their datasets must be local (nothing is downloaded: HF_DATASETS_OFFLINE is set). Writes ``harness.json`` (lm-eval's
results, the recipe, seconds per 100 requests) to ``--out``. Exit code 2 with one line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.accel import run_script
from tdlm.config import ConfigError
from tdlm.sampling import METHODS


def add_harness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=[], help="lm-eval task names")
    p.add_argument("--include-path", help="a directory of task YAML files")
    p.add_argument("--mc-passes", type=int, default=32, help="exact-k passes per loglikelihood request")
    p.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval's --limit)")
    p.add_argument("--steps", type=int, default=0, help="generate_until: sampler steps (0 = one per token)")
    p.add_argument("--method", default="low_confidence", choices=METHODS)
    p.add_argument("--block-length", type=int, default=0, help="generate_until: semi-AR block length (0 = off)")
    p.add_argument("--max-gen-toks", type=int, default=64, help="generate_until default when a task gives none")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (see --which)")
    p.add_argument("--which", default="best", choices=["best", "latest"])
    add_harness_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for harness.json and requests.jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if not args.tasks:
        p.error("--tasks: give at least one task")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def work(accelerator):
        if args.mc_passes < 1:
            raise ConfigError(f"--mc-passes: must be >= 1, got {args.mc_passes}")
        try:
            from tdlm.harness import run_tasks
        except ImportError:
            raise ConfigError("eval/harness.py needs lm_eval: pip install -e .[eval]") from None
        return run_tasks(accelerator, args.checkpoint, args.tasks, args.include_path, args.mc_passes,
                         args.batch_size, args.seed, args.limit, args.steps, args.method, args.block_length,
                         args.max_gen_toks, args.which)

    code, result, is_main = run_script(work)
    if code or not is_main:
        return code
    out, records = result
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "harness.json").write_text(json.dumps(out, indent=1, default=str))
        (Path(args.out) / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for task, metrics in (out["results"] or {}).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}")
        print(f"{out['distinct_requests']} distinct requests, {out['seconds_per_100_requests']:.2f} s per 100, "
              f"loglikelihood stderr {out['loglikelihood_stderr']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
