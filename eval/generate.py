"""Generate text from a checkpoint: masked-diffusion samplers (``tdlm/sampling.py``) or, for an AR checkpoint,
left-to-right sampling with the same temperature / top-k / top-p.

    python eval/generate.py --checkpoint runs/markov --num-samples 8 --steps 128 --out samples.jsonl
    python eval/generate.py --checkpoint CKPT --method low_confidence --steps 64 --block-length 16 --temperature 0
    python eval/generate.py --checkpoint CKPT --prompt "def main" --top-p 0.9      # prefix
    python eval/generate.py --checkpoint CKPT --template "a b [MASK] [MASK] c [MASK] d"   # infilling
    python eval/generate.py --checkpoint runs/sft --prompt "What does json.dumps do?"  # an SFT response
    python eval/generate.py --checkpoint runs/sft --prompts held_out.jsonl --method low_confidence  # vs references
    python eval/generate.py --checkpoint CKPT --block-size 4 --steps 4 --seq-len 1000 --stop-at-eos  # blocks
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no eval/generate.py --checkpoint CKPT --num-samples 8 --out s.jsonl   # same samples

An SFT run (data.source=sft), ``--sft`` or ``--prompts`` renders each prompt with the run's SFT template
(docs/sft.md) and prints the response up to the first EOS (beside the reference a prompts file holds).

Sample i is drawn with its own generator seeded by (--seed, i), so the samples do not depend on the batch size
or the number of processes. Writes one JSON object per sample ({index, text, ids}) to --out, sorted by index,
and prints a summary (with --json, one JSON object: network calls, steps, seconds).

Block diffusion (``--block-size``, by default the checkpoint's own ``block_size``): blocks of L' tokens left to
right with a KV cache of the finished blocks, ``--steps`` steps *per block* with ``--method``; with
``--stop-at-eos`` / ``--min-entropy`` a sample ends at its first EOS or when the unigram entropy of its last
``--entropy-window`` tokens drops below ``--min-entropy`` nats (``tdlm.sampling.block_generate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.accel import gather_objects, run_script, shard
from tdlm.config import ConfigError
from tdlm.likelihood import eval_split
from tdlm.runs import load_checkpoint
from tdlm.objective import effective_block_size
from tdlm.sampling import (METHODS, STEP_SCHEDULES, SamplerConfig, block_sample_checkpoint, build_canvas,
                           sample_checkpoint)
from tdlm.sft import generate_responses, read_prompts


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=64, help="reverse steps in total (over all blocks)")
    p.add_argument("--method", default="ancestral", choices=METHODS)
    p.add_argument("--step-schedule", default=None, choices=STEP_SCHEDULES,
                   help="unmasking curve (a noise schedule's); default: the schedule the checkpoint was trained under")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--block-length", type=int, default=0, help="semi-autoregressive blocks (0 = one block)")
    p.add_argument("--no-cache", action="store_true", help="call the network even when nothing was revealed")


def sampler_config(args, tokenizer) -> SamplerConfig:
    return SamplerConfig(steps=args.steps, method=args.method, step_schedule=args.step_schedule,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         block_length=args.block_length, use_cache=not args.no_cache,
                         forbidden_token_ids=(tokenizer.pad_token_id,))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (see --which)")
    p.add_argument("--which", default="best", choices=["best", "latest"])
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=0, help="0 = the run's data.seq_len")
    p.add_argument("--prompt", default="", help="fixed prefix text")
    p.add_argument("--template", default="", help="text with [MASK] where tokens are generated (infilling)")
    p.add_argument("--prompts", help="jsonl of SFT prompts ({prompt[, response]} or {messages}): one response each")
    p.add_argument("--sft", action="store_true", help="render --prompt with the SFT template, stop at EOS "
                   "(default for an SFT run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--out", help="JSONL file for the samples")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_sampler_args(p)
    p.add_argument("--block-size", type=int, default=-1,
                   help="block diffusion: L' tokens per block (default: the checkpoint's; 0 = one canvas)")
    p.add_argument("--no-kv-cache", action="store_true", help="block diffusion: rerun the prefix every step")
    p.add_argument("--stop-at-eos", action="store_true", help="block diffusion: a sample ends at its first EOS")
    p.add_argument("--min-entropy", type=float, default=0.0,
                   help="block diffusion: end a sample whose last --entropy-window tokens have a lower unigram "
                        "entropy (nats; 0 = off; BD3-LM: 4 over 256 GPT-2 tokens)")
    p.add_argument("--entropy-window", type=int, default=256)
    args = p.parse_args(argv)
    if args.entropy_window < 1 or args.min_entropy < 0 or args.block_size < -1:
        p.error("--entropy-window must be >= 1, --min-entropy >= 0 and --block-size >= 0")
    return args


def first_tokens(ck, accelerator) -> list[int] | None:
    """First tokens of the run's validation rows: the start of unprompted AR samples (None without the data)."""
    if ck.config is None:
        return None
    with accelerator.main_process_first():
        ds = eval_split("validation", ck.tokenizer, ck.config.data.seq_len, ck.config)
    return [int(r[0]) for r in ds["input_ids"]]


def run(args, accelerator) -> tuple[list[dict], dict]:
    ck = load_checkpoint(args.checkpoint, args.which)
    tok = ck.tokenizer
    seq_len = args.seq_len or (ck.config.data.seq_len if ck.config else ck.model.config.max_seq_len)
    sft_run = ck.config is not None and ck.config.data.source == "sft"
    if args.prompts or (args.prompt and (args.sft or sft_run)):
        prompts = read_prompts(args.prompts) if args.prompts else [("--prompt", args.prompt, None)]
        start = time.perf_counter()
        out = generate_responses(ck, prompts, sampler_config(args, tok), args.seed, accelerator, seq_len)
        return out, {"checkpoint": str(ck.path), "num_prompts": len(out), "seconds": time.perf_counter() - start}
    canvas = build_canvas(tok, seq_len, args.prompt, args.template)
    cfg = sampler_config(args, tok)
    model = ck.model.to(accelerator.device)
    first = first_tokens(ck, accelerator) if ck.causal and not args.prompt else None
    block_size = args.block_size if args.block_size >= 0 else getattr(ck.model.config, "block_size", 0)
    block_size = 0 if ck.causal else effective_block_size(block_size, seq_len)
    if block_size and args.template:
        raise ConfigError("--block-size: block sampling continues a --prompt prefix; it cannot fill a --template "
                          "(pass --block-size 0)")
    start = time.perf_counter()
    if block_size:
        mine, calls = block_sample_checkpoint(model, tok, shard(accelerator, args.num_samples), cfg, args.seed,
                                              seq_len, block_size, args.batch_size, not args.no_kv_cache,
                                              args.stop_at_eos, args.min_entropy, args.entropy_window,
                                              canvas[canvas != tok.mask_token_id] if args.prompt else None)
    else:
        mine, calls = sample_checkpoint(model, tok, shard(accelerator, args.num_samples), cfg, args.seed, canvas,
                                        args.batch_size, first)
    samples = sorted(gather_objects(accelerator, mine), key=lambda s: s["index"])
    calls = sum(gather_objects(accelerator, [calls]))
    summary = {"checkpoint": str(ck.path), "causal": ck.causal, "num_samples": len(samples), "seq_len": len(canvas),
               "method": "autoregressive" if ck.causal else cfg.method, "steps": args.steps,
               "block_size": block_size,
               "kv_cache": bool(block_size) and not args.no_kv_cache and getattr(model, "supports_kv_cache", False),
               "network_calls": calls, "seconds": time.perf_counter() - start, "seed": args.seed,
               "num_processes": accelerator.num_processes}
    return samples, summary


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    code, result, is_main = run_script(lambda accelerator: run(args, accelerator))
    if code or not is_main:
        return code
    samples, summary = result
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(s) + "\n" for s in samples))
    if args.json:
        print(json.dumps(summary))
    elif "num_prompts" in summary:
        for s in samples:
            ref = "" if s["reference"] is None else f"\nreference: {s['reference']}"
            print(f"--- prompt {s['index']} ---\nprompt:    {s['prompt']}\nresponse:  {s['response']}{ref}")
    else:
        for s in samples:
            print(f"--- sample {s['index']} ---\n{s['text']}")
        print(f"{len(samples)} samples, {summary['network_calls']} network calls, {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
