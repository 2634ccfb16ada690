"""Block diffusion's costs, in one process, interleaved (``bench_common``); JSON out.

    python eval/bench_block.py                       # tiny model: a couple of minutes on a loaded 2-core machine
    python eval/bench_block.py --device cuda --layers 12 --hidden 768 --heads 12 --vocab 50304 --seq-len 1024

- Training: tokens/s of one optimizer step (forward, backward, AdamW) of the block NELBO at ``--block-size``
  (one forward over [x_t ; x], 2L tokens, ``tdlm.objective.block_diffusion_outputs``) against plain MDLM on the
  same batch. The pass doubles the sequence, so expect about half MDLM's tokens/s (more on attention-bound
  shapes: attention over 2L costs 4x).
- Sampling: ``--gen-tokens`` tokens block by block (``tdlm.sampling.block_generate``, ``--steps`` per block,
  ancestral), with the KV cache of finished blocks against rerunning the whole prefix at every step; both draw
  from the same seed and must give identical samples (``identical_samples``).
"""

from __future__ import annotations

import argparse

import torch

from bench_common import emit, interleaved, machine_state, median, ratio, set_threads, spread, uncontended
from tdlm.model import TdlmConfig, TdlmForMaskedOrCausalLM
from tdlm.noise import BlockTrainingNoise, TrainingNoise
from tdlm.diffusion import LinearSchedule
from tdlm.objective import block_diffusion_outputs, masked_diffusion_outputs
from tdlm.sampling import SamplerConfig, block_generate

MASK_ID = 0


def training_arms(a, model, device) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, a.vocab, (a.batch, a.seq_len), generator=g).to(device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    plain = TrainingNoise("bernoulli", LinearSchedule(), 1e-3)

    def arm(block_size):
        noise = BlockTrainingNoise(plain, block_size) if block_size else plain

        def go(i):
            masked, t, weight, _ = noise.mask(*noise.draw(torch.Generator().manual_seed(max(i, 0)), a.batch,
                                                          a.seq_len))
            masked, weight = masked.to(device), weight.to(device)
            positions = masked.flatten().nonzero().squeeze(1)
            if block_size:
                out = block_diffusion_outputs(model, ids, valid, masked, positions, weight, MASK_ID, block_size)
            else:
                out = masked_diffusion_outputs(model, ids, valid, masked, positions, weight, MASK_ID)
            (out.loss_sum / valid.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return go

    return {"mdlm": arm(0), f"block_{a.block_size}": arm(a.block_size)}


def sampling_arms(a, model, outputs: dict) -> dict:
    cfg = SamplerConfig(steps=a.steps, method="ancestral")

    def arm(kv):
        def go(i):
            n = a.gen_tokens if i >= 0 else 2 * a.sample_block_size
            out = block_generate(model, 1, n, a.sample_block_size, MASK_ID, cfg,
                                 torch.Generator(device=a.device).manual_seed(max(i, 0)), use_kv_cache=kv)
            if i >= 0:
                outputs.setdefault(kv, []).append(out)
        return go

    return {"kv_cached": arm(True), "uncached": arm(False)}


def run(a) -> dict:
    threads = set_threads(a.threads)
    before = machine_state(threads)
    torch.manual_seed(0)
    cfg = TdlmConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                     max_seq_len=max(a.seq_len, a.gen_tokens + a.sample_block_size), mask_token_id=MASK_ID)
    model = TdlmForMaskedOrCausalLM(cfg).to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    min_share = a.min_cpu_share if a.device == "cpu" else 0.0
    train = interleaved(training_arms(a, model.train(), a.device), rounds=a.rounds, sync=sync)
    t_sec, t_kept = uncontended(train, min_share)
    outputs: dict = {}
    with torch.no_grad():
        sample = interleaved(sampling_arms(a, model.eval(), outputs), rounds=a.sample_rounds, warmup=1, sync=sync)
    s_sec, s_kept = uncontended(sample, min_share)
    tokens = a.batch * a.seq_len
    block = f"block_{a.block_size}"
    return {
        "benchmark": "block_diffusion", "device": a.device,
        "shape": {"layers": a.layers, "hidden": a.hidden, "vocab": a.vocab, "seq_len": a.seq_len, "batch": a.batch},
        "training": {**{n: {"tokens_per_s": round(tokens / median(s), 1), **spread(s), "kept_rounds": t_kept[n]}
                        for n, s in t_sec.items()},
                     "mdlm_over_block_speed": ratio(t_sec, block, "mdlm"), "cpu_share": train["cpu_share"]},
        "sampling": {"gen_tokens": a.gen_tokens, "block_size": a.sample_block_size, "steps_per_block": a.steps,
                     **{n: {"tokens_per_s": round(a.gen_tokens / median(s), 1), **spread(s), "kept_rounds": s_kept[n],
                            "network_calls": median([o.network_calls for o in outputs[n == "kv_cached"]])}
                        for n, s in s_sec.items()},
                     "kv_cache_speedup": ratio(s_sec, "uncached", "kv_cached"),
                     "identical_samples": all(torch.equal(c.ids, u.ids) for c, u in zip(outputs[True], outputs[False])),
                     "cpu_share": sample["cpu_share"]},
        "machine_before": before, "machine_after": machine_state(threads)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-size", type=int, default=4, help="L' of the training arm")
    p.add_argument("--gen-tokens", type=int, default=1000)
    p.add_argument("--sample-block-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per block")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--sample-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--min-cpu-share", type=float, default=0.85)
    return p.parse_args(argv)


if __name__ == "__main__":
    emit(run(parse()))
