"""Sampling throughput: the cached ancestral sampler vs uncached at 1000 steps, and LLaDA low-confidence
remasking at 64 steps, in one process, interleaved; JSON out.

    python eval/bench_sampling.py                                  # quickstart shape, random weights, batch 1 and 16
    python eval/bench_sampling.py --checkpoint runs/quickstart/checkpoints/step_0000600/model --batch 1 16
    python eval/bench_sampling.py --device cuda --layers 12 --hidden 768 --heads 12 --vocab 50304 --seq-len 1024

The cache skips the network for a row whose canvas the previous step left unchanged (the model has no time
input, so an unchanged row gives unchanged logits, and rows never attend to each other). At 1000 steps and
L=128 a row changes in a step with probability ~ 1 - exp(-L/steps) ~ 0.12, so about 1 row in 8 is recomputed,
whatever the batch size; ``rows_computed`` counts them and ``network_calls`` the (sub-batch) calls. Cached and
uncached runs share a generator seed, and their samples must be identical (``identical_samples``). Weights do
not change the cost; ``--checkpoint`` only makes the samples meaningful. On CUDA the network runs under bf16
autocast (as training does) and every repetition counts (the host's CPU share says nothing about the device).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from bench_common import emit, interleaved, machine_state, median, ratio, set_threads, spread, uncontended
from tdlm.model import TdlmConfig, TdlmForMaskedOrCausalLM

from tdlm.sampling import SamplerConfig, generate

MASK_ID = 0


def load_model(a) -> TdlmForMaskedOrCausalLM:
    if a.checkpoint:
        return TdlmForMaskedOrCausalLM.from_pretrained(a.checkpoint).eval()
    torch.manual_seed(0)
    cfg = TdlmConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                     max_seq_len=a.seq_len, mask_token_id=MASK_ID)
    return TdlmForMaskedOrCausalLM(cfg).eval()


def arms_for(model, batch: int, seq_len: int, mask_id: int, outputs: dict, device: str = "cpu") -> dict:
    """Arms drawing ``batch`` samples; a warm-up call (i < 0) runs 4 steps only."""
    canvas = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    kinds = {"ancestral_1000_uncached": dict(method="ancestral", steps=1000, use_cache=False),
             "ancestral_1000_cached": dict(method="ancestral", steps=1000, use_cache=True),
             "low_confidence_64": dict(method="low_confidence", steps=64)}

    def arm(name, kw):
        def go(i):
            cfg = SamplerConfig(**{**kw, "steps": kw["steps"] if i >= 0 else 4})
            with amp:
                out = generate(model, canvas, mask_id, cfg, torch.Generator(device=device).manual_seed(max(i, 0)))
            if i >= 0:
                outputs.setdefault(name, []).append(out)
        return go

    return {name: arm(name, kw) for name, kw in kinds.items()}


def run(a) -> dict:
    threads = set_threads(a.threads)
    before = machine_state(threads)
    model = load_model(a).to(a.device)
    mask_id = model.config.mask_token_id
    seq_len = a.seq_len if not a.checkpoint else min(a.seq_len, model.config.max_seq_len)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    results = {}
    for b in a.batch:
        outputs: dict = {}
        timing = interleaved(arms_for(model, b, seq_len, mask_id, outputs, a.device), rounds=a.rounds, warmup=1,
                             sync=sync)
        sec, kept = uncontended(timing, a.min_cpu_share if a.device == "cpu" else 0.0)
        same = all(torch.equal(u.ids, c.ids) for u, c in
                   zip(outputs["ancestral_1000_uncached"], outputs["ancestral_1000_cached"]))
        results[f"batch_{b}"] = {
            **{n: {"samples_per_s": round(b / median(s), 3), **spread(s),
                   "network_calls": median([o.network_calls for o in outputs[n]]),
                   "rows_computed": median([o.rows_computed for o in outputs[n]]), "kept_rounds": kept[n],
                   "all_rounds_samples_per_s": round(b / median(timing["seconds"][n]), 3),
                   "rounds_cpu_share": timing["cpu_shares"][n]} for n, s in sec.items()},
            "cache_speedup": ratio(sec, "ancestral_1000_uncached", "ancestral_1000_cached"),
            "low_confidence_64_vs_cached_ancestral_1000": ratio(sec, "ancestral_1000_cached", "low_confidence_64"),
            "identical_samples": same, "cpu_share": timing["cpu_share"]}
    return {"benchmark": "sampling", "model": "checkpoint " + a.checkpoint if a.checkpoint else "random weights",
            "device": a.device, "precision": "bf16 autocast" if a.device == "cuda" else "fp32",
            "shape": {"layers": model.config.num_layers, "hidden": model.config.hidden_size,
                      "vocab": model.config.vocab_size, "seq_len": seq_len}, "rounds": a.rounds,
            "results": results, "machine_before": before, "machine_after": machine_state(threads)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="a model/ directory; default: random weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--min-cpu-share", type=float, default=0.85,
                   help="report the repetitions that got at least this share of the threads' CPU time (0 = all)")
    return p.parse_args(argv)


if __name__ == "__main__":
    emit(run(parse()))
