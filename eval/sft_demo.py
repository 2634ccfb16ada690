"""The end of ``make demo-sft``: the conditional perplexity bound of the held-out responses before (the starting
checkpoint) and after fine-tuning, then generated answers to held-out prompts beside their references.

    python eval/sft_demo.py --run runs/sft --before runs/quickstart/checkpoints/step_0000600 --num-prompts 6

Both bounds score the held-out examples (prompt clean, response tokens only) with the same estimator, passes and
seed (``tdlm/likelihood.py``), twice: as the run pads them (``data.sft_padding``; under ``eos`` the EOS filling the
row counts, and dominates) and with ``pad`` padding, i.e. over each response and its one EOS only, the number to
compare across runs. Answers come from ``tdlm.sft.generate_responses``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import Dataset

from eval.generate import add_sampler_args, sampler_config
from tdlm.accel import run_script
from tdlm.likelihood import ESTIMATORS, eval_split, score_rows
from tdlm.runs import load_checkpoint
from tdlm.sft import generate_responses, read_examples, sft_rows, split_examples


def run(args, accelerator):
    after = load_checkpoint(args.run, "best")
    cfg = after.config
    with accelerator.main_process_first():
        as_trained = eval_split("validation", after.tokenizer, cfg.data.seq_len, cfg)
    held_out = split_examples(read_examples(cfg.data), cfg.data.val_fraction)[1]
    pad_rows = sft_rows(held_out, after.tokenizer, replace(cfg.data, sft_padding="pad"))
    responses_only = Dataset.from_dict({**pad_rows, "idx": list(range(len(held_out)))}).with_format("torch")
    bounds = {}
    for split, ds in ((f"{cfg.data.sft_padding} padding", as_trained), ("responses only", responses_only)):
        for name, ck in (("before", load_checkpoint(args.before, "best")), ("after", after)):
            res, _ = score_rows(ck, ds, accelerator, args.estimator, args.mc_passes, seed=0)
            bounds[f"{name}, {split}"] = (res.nelbo_per_token, res.stderr, res.num_tokens)
    prompts = [(where, ex["prompt"], ex["response"]) for where, ex in held_out[: args.num_prompts]]
    answers = generate_responses(after, prompts, sampler_config(args, after.tokenizer), 0, accelerator,
                                 cfg.data.seq_len)
    return bounds, answers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the SFT run directory")
    p.add_argument("--before", required=True, help="the checkpoint fine-tuning started from")
    p.add_argument("--estimator", default="exact-k", choices=ESTIMATORS)
    p.add_argument("--mc-passes", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=6)
    add_sampler_args(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    code, result, is_main = run_script(lambda accelerator: run(args, accelerator))
    if code or not is_main:
        return code
    bounds, answers = result
    for name, (nelbo, se, tokens) in bounds.items():
        print(f"conditional perplexity bound ({name:22s}): {math.exp(nelbo):9.3f}   nelbo/token {nelbo:.4f} +- "
              f"{se:.4f} ({args.estimator}, {args.mc_passes} passes, {tokens} scored tokens)")
    for a in answers:
        print(f"--- {a['prompt']}\n  generated: {a['response']}\n  reference: {a['reference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
