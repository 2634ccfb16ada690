"""Advanced-tier FSDiT collectors (every ``metrics.attention_analysis_steps``): the diagnostic forward
(activations, attention entropy) and the sample grids with their diversity and value statistics."""

from __future__ import annotations

import math

import numpy as np
import torch

from tdlm.metrics import functional as Fm
from tdlm.metrics.core import Collector, MetricSpec
from tdlm.metrics.image.inputs import IMAGE, _std, _zeros
from tdlm.metrics.media import Image


@IMAGE.register
class ModelProbe(Collector):
    """On attention-analysis steps, one extra no-grad forward of the step's noised batch (its x_t, t and pooled
    support embeddings, no CFG drop) through the live model in eval mode, with explicit-softmax attention (SDPA
    never materialises the probabilities) and a forward hook on every block. act/layer{i}_abs_mean and
    act/layer{i}_rms: mean |h| and sqrt(mean h²) of the residual stream after block i over all tokens, channels
    and episodes; act/rms_ratio_last_first = rms of the last block / rms of the first (≫ 1: activations explode
    with depth). attn/entropy_layer{i}: −Σ_k p_k log p_k of each query's attention row in nats, averaged over
    queries, heads and episodes (uniform attention over N tokens = ln N: 5.545 for 256 patches);
    attn/entropy_head{h}_last: the same for head h of the last block. The entropy depends on t; this is the
    step's own mix of t."""

    tier = "advanced"
    window = False
    needs = ("flow", "condition", "probe")
    metrics = (MetricSpec("act/layer{i}_abs_mean", "1", "mean |h| after block i"),
               MetricSpec("act/layer{i}_rms", "1", "RMS of h after block i"),
               MetricSpec("act/rms_ratio_last_first", "1", "act rms of the last block / of the first block"),
               MetricSpec("attn/entropy_layer{i}", "nats", "attention entropy of block i, mean over heads"),
               MetricSpec("attn/entropy_head{h}_last", "nats", "attention entropy of head h of the last block"))

    def __init__(self, depth: int = 1, num_heads: int = 1, chunk_elements: int = 2**24, **ctx):
        super().__init__()
        self.chunk_elements = chunk_elements
        for name in ("act_n", "act_abs", "act_sq", "ent", "ent_n"):
            self.add_state(name, _zeros(depth))
        self.add_state("head", _zeros(num_heads))
        self.add_state("head_n", _zeros(num_heads))

    @torch.no_grad()
    def update(self, inputs):
        out, model = inputs["batch"], inputs["model"]
        B, N = out.x_t.shape[0], model.config.num_patches
        rows = max(1, self.chunk_elements // (model.config.num_heads * N * N))  # bounds B·H·N² per layer
        acts: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, a, h: acts.append(h.detach())) for b in model.blocks]
        was_training = model.training
        model.eval()
        try:
            for a in range(0, B, rows):
                acts.clear()
                _, probs = model(out.x_t[a:a + rows], out.t[a:a + rows], out.cond[a:a + rows],
                                 drop=torch.zeros_like(out.drop[a:a + rows]), return_attn=True)
                for i, (h, p) in enumerate(zip(acts, probs)):
                    h = h.double()
                    self.act_n[i] += h.numel()
                    self.act_abs[i] += h.abs().sum()
                    self.act_sq[i] += h.pow(2).sum()
                    e, n = Fm.attention_entropy_by_head(p)  # the layer's figure is the sum over its heads
                    self.ent[i] += e.sum()
                    self.ent_n[i] += n.sum()
                self.head += e  # the last block's, per head
                self.head_n += n
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)

    def compute(self):
        rms = Fm.ratio(self.act_sq, self.act_n).sqrt()
        vals = {f"act/layer{i}_abs_mean": v for i, v in enumerate(Fm.ratio(self.act_abs, self.act_n))}
        vals.update({f"act/layer{i}_rms": v for i, v in enumerate(rms)})
        vals["act/rms_ratio_last_first"] = rms[-1] / rms[0]
        vals.update({f"attn/entropy_layer{i}": v for i, v in enumerate(Fm.ratio(self.ent, self.ent_n))})
        vals.update({f"attn/entropy_head{h}_last": v for h, v in enumerate(Fm.ratio(self.head, self.head_n))})
        return vals


def image_grid(rows: list[torch.Tensor], gap: int = 2) -> np.ndarray:
    """Images in [-1, 1], one (n_r, 3, H, W) tensor per grid row (rows may hold different counts; a zero-size
    entry leaves a blank cell-width gap) -> one (H', W', 3) uint8 picture with ``gap``-pixel white borders."""
    H, W = next(r.shape[-2:] for r in rows if r.numel())
    cols = max(r.shape[0] for r in rows)
    grid = np.full((len(rows) * (H + gap) + gap, cols * (W + gap) + gap, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        pix = ((row.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        for j, img in enumerate(pix.numpy()):
            y, x = gap + i * (H + gap), gap + j * (W + gap)
            grid[y:y + H, x:x + W] = img
    return grid


@IMAGE.register
class SampleQuality(Collector):
    """On attention-analysis steps, and once at the end of training even with the advanced tier off: the EMA
    model generates sample.per_set samples for each of sample.num_sets fixed support sets (one per validation
    class) with the sample.method sampler (sample.steps steps), three times from the same starting noise:
    conditional (s = 1, samples/cfg_1), guided v = v_u + s(v_c − v_u) with s = sample.cfg_scale
    (samples/cfg_{s}, omitted when s = 1) and unconditional (the learned null condition, samples/uncond). The
    cfg grids show each set's support images, then its samples; every process generates the same samples.
    sample_diversity/pairwise_mse_*: mean squared difference between the conditional samples of one support set
    (different noise, same condition), over every pair of every set: mean, population std, min, max; < 0.01 =
    the same output whatever the noise (mode collapse). final_sample_stats/*: mean, std, min, max of every value
    of the conditional samples in model space (pixels: expect values in [−1, 1]), and out_of_range_frac, the
    fraction outside [−1, 1]."""

    tier = "advanced"
    window = False
    final = True
    needs = ("samples",)
    metrics = (MetricSpec("samples/cfg_1", "image", "conditional samples (s = 1) beside their support sets"),
               MetricSpec("samples/cfg_{s}", "image", "guided samples, s = sample.cfg_scale (same noise)"),
               MetricSpec("samples/uncond", "image", "unconditional samples (null condition, same noise)"),
               *(MetricSpec(f"sample_diversity/pairwise_mse_{k}", "MSE", f"{k} of the within-set pairwise MSE")
                 for k in ("mean", "std", "min", "max")),
               *(MetricSpec(f"final_sample_stats/{k}", "1", f"{k} of all conditional sample values")
                 for k in ("mean", "std", "min", "max")),
               MetricSpec("final_sample_stats/out_of_range_frac", "fraction", "sample values outside [−1, 1]"))

    @classmethod
    def applies(cls, context) -> bool:
        return context.get("sample_sets", 1) > 0  # sample.num_sets = 0: no samples at all

    def __init__(self, **ctx):
        super().__init__()
        self.add_state("div", torch.full((5,), math.nan, dtype=torch.float64), reduce=None)  # n, Σ, Σ², min, max
        self.add_state("stats", torch.full((5,), math.nan, dtype=torch.float64), reduce=None)
        self._images: dict[str, Image] = {}

    @torch.no_grad()
    def update(self, inputs):
        from tdlm.fsdit.flow import sample

        r = inputs["sampler"]
        S, K = r.cond.shape[0], r.per_set
        device = r.cond.device
        cond = r.cond.repeat_interleave(K, 0)  # (S·K, cond_dim), set-major
        shape = (S * K, *r.shape)
        runs = {"cfg_1": (cond, 1.0), **({f"cfg_{r.cfg_scale:g}": (cond, r.cfg_scale)} if r.cfg_scale != 1 else {}),
                "uncond": (None, 1.0)}
        out = {}
        for name, (c, s) in runs.items():
            g = torch.Generator().manual_seed(r.seed)  # the same starting noise for every variant
            out[name] = sample(r.model, c, shape, steps=r.steps, method=r.method, cfg_scale=s, generator=g,
                               device=device)
        x = out["cfg_1"].double()  # model space
        pair = torch.cat([Fm.pairwise_mse(x[i * K:(i + 1) * K]) for i in range(S)])
        self.div = torch.stack([torch.tensor(float(pair.numel()), dtype=torch.float64), pair.sum(),
                                pair.pow(2).sum(), pair.min(), pair.max()]).to(self.div)
        self.stats = torch.stack([x.mean(), x.std(unbiased=False), x.min(), x.max(),
                                  (x.abs() > 1).double().mean()]).to(self.stats)
        self._images = {}
        for name, samples in out.items():
            imgs = r.decode(samples) if r.decode is not None else samples
            imgs = imgs.view(S, K, *imgs.shape[1:])
            rows = []
            for i in range(S):
                if name != "uncond":
                    rows.append(torch.cat([r.support_images[i].to(imgs.device), imgs[i]]))
                else:
                    rows.append(imgs[i])
            self._images[f"samples/{name}"] = Image(image_grid(rows), caption=f"{name}, {r.method} {r.steps} steps")

    def compute(self):
        n, s, ss, lo, hi = self.div.unbind()
        vals = dict(self._images)
        vals.update({"sample_diversity/pairwise_mse_mean": Fm.ratio(s, n),
                     "sample_diversity/pairwise_mse_std": _std(n, s, ss),
                     "sample_diversity/pairwise_mse_min": lo, "sample_diversity/pairwise_mse_max": hi})
        vals.update({f"final_sample_stats/{k}": self.stats[i]
                     for i, k in enumerate(("mean", "std", "min", "max", "out_of_range_frac"))})
        return vals

    def reset(self):
        super().reset()
        self._images = {}
