"""How noisy is each training estimator's gradient? At one checkpoint's fixed weights, the minibatch gradient of
the training loss under every ``diffusion.estimator``, on the same validation rows, and its noise.

    python eval/gradient_noise.py --checkpoint runs/quickstart --batches 32 --json

All the estimators are unbiased for the same NELBO, so their minibatch gradients g share one mean ḡ, and they
differ only in the noise E||g - ḡ||² (the trace of the gradient's covariance). Reported per estimator: that noise
(the unbiased sample variance over ``--batches`` micro-batches of ``--batch-size`` rows), ||ḡ||² (from the
estimators' pooled mean), the signal-to-noise ratio ||ḡ||² / noise, and ``batch_equivalent``: bernoulli's noise
over this one's, the factor by which bernoulli's batch would have to grow to be as quiet. Batch i draws the same
rows for every estimator (the rows' own spread is common to all) and its noise from a generator keyed by i.
``--fixed-rows`` keeps the first batch's rows in every batch: the noise is then the masking's alone, and the
difference from the default run is the data's share (which sequences a batch holds), common to all estimators.
``--mlm-weight`` adds the biased MLM weighting (weight 1 per masked token: ``diffusion.clip_weight=1``) as a
reference, kept out of the pooled mean since its gradient has another mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.likelihood import eval_split
from tdlm.model import noise_schedule
from tdlm.noise import ESTIMATORS, TrainingNoise
from tdlm.objective import masked_diffusion_outputs
from tdlm.runs import load_checkpoint


def minibatch_gradient(model, ids: torch.Tensor, noise: TrainingNoise, generator: torch.Generator,
                       mask_id: int, clip_weight: float = 0.0) -> torch.Tensor:
    """The flat gradient of one micro-batch's training loss (sum of w·CE over its valid tokens) at ``noise``."""
    first, uniforms = noise.draw(generator, ids.shape[0], ids.shape[1])
    masked, t, weight, ratio = noise.mask(first, uniforms)
    positions = masked.flatten().nonzero().squeeze(1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    out = masked_diffusion_outputs(model, ids, valid, masked, positions, weight, mask_id, None, t, clip_weight, ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss_sum / out.num_tokens, params)
    return torch.cat([g.flatten() for g in grads]).double()


def gradient_noise(model, rows: torch.Tensor, arms: dict[str, tuple[TrainingNoise, float]], batches: int,
                   batch_size: int, mask_id: int, seed: int = 0, fixed_rows: bool = False) -> dict:
    """Per arm: noise E||g - ḡ||², ||ḡ||², SNR and batch_equivalent (see the module docstring). ``fixed_rows``:
    every batch holds the same rows, so the noise is the estimator's alone (the masking), without the data's."""
    sums = {name: 0.0 for name in arms}
    squares = {name: 0.0 for name in arms}
    pick = torch.Generator().manual_seed(seed)
    for i in range(batches):
        if i == 0 or not fixed_rows:
            ids = rows[torch.randperm(len(rows), generator=pick)[:batch_size]]
        for name, (noise, clip) in arms.items():
            g = minibatch_gradient(model, ids, noise, torch.Generator().manual_seed(seed * 100_003 + i), mask_id, clip)
            sums[name] = sums[name] + g
            squares[name] += float(g @ g)
    unbiased = [n for n, (_, clip) in arms.items() if clip == 0.0]
    pooled = sum(sums[n] for n in unbiased) / (batches * len(unbiased))
    mean_sq = {name: float((sums[name] / batches) @ (sums[name] / batches)) for name in arms}
    noise = {name: (squares[name] - batches * mean_sq[name]) / (batches - 1) for name in arms}
    # ||mean||^2 overestimates ||ḡ||^2 by the mean's own variance (noise / draws): subtracted, so it is unbiased
    pooled_sq = float(pooled @ pooled) - sum(noise[n] for n in unbiased) / (batches * len(unbiased) ** 2)
    out = {}
    for name in arms:
        signal = pooled_sq if name in unbiased else mean_sq[name] - noise[name] / batches
        out[name] = {"noise": noise[name], "mean_gradient_sq": signal, "snr": signal / noise[name]}
    base = out.get("bernoulli", {}).get("noise")
    for name in out:
        out[name]["batch_equivalent"] = base / out[name]["noise"] if base else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--which", default="latest", choices=["best", "latest"])
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--proposal-power", type=float, default=0.5, help="importance: a of q(t) ∝ t^-a, in [0, 1)")
    p.add_argument("--mlm-weight", action="store_true", help="add the biased weight-1 (MLM) gradient as a reference")
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-sequences", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed-rows", action="store_true",
                   help="the same rows in every batch: the masking noise alone, without the data's")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.batches < 2 or not 0.0 <= a.proposal_power < 1.0:
        print("error: --batches must be >= 2 and --proposal-power in [0, 1)", file=sys.stderr)
        return 2
    ck = load_checkpoint(a.checkpoint, a.which)
    mc = ck.model.config
    if mc.causal or getattr(mc, "block_size", 0):
        print("error: --checkpoint must be a masked-diffusion (not AR or block) checkpoint", file=sys.stderr)
        return 2
    rows = eval_split("validation", ck.tokenizer, ck.config.data.seq_len, ck.config,
                      max_sequences=a.max_sequences)[:]["input_ids"]
    schedule = noise_schedule(mc)
    arms = {e: (TrainingNoise(e, schedule, mc.t_min, proposal_power=a.proposal_power), 0.0) for e in a.estimators}
    if a.mlm_weight:
        arms["mlm_weight_biased"] = (TrainingNoise("bernoulli", schedule, mc.t_min), 1.0)
    ck.model.train()  # dropout is 0 in tdlm's configs; train mode is the mode the gradient is taken in
    res = gradient_noise(ck.model, rows, arms, a.batches, a.batch_size, ck.tokenizer.mask_token_id, a.seed,
                         a.fixed_rows)
    out = {"checkpoint": str(ck.path), "step": ck.state.get("step"), "batches": a.batches,
           "batch_size": a.batch_size, "fixed_rows": a.fixed_rows, "proposal_power": a.proposal_power, "arms": res}
    print(json.dumps(out, indent=1) if a.json else "\n".join(
        f"{n}: noise {r['noise']:.4g}  |mean grad|^2 {r['mean_gradient_sq']:.4g}  SNR {r['snr']:.4g}  "
        f"batch-equivalent {r['batch_equivalent'] or float('nan'):.2f}" for n, r in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
