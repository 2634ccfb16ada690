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
    p.add_argument("--samples", nargs="+", required=True)
    p.add_argument("--scorer", help="local HF causal LM directory or AR checkpoint/run dir of ours (required)")
    p.add_argument("--rep-n", type=int, default=4, help="n of the repeated n-gram rate")
    p.add_argument("--max-samples", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


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
