"""Health rules of the FSDiT trainer, and the assembly of its metric runner and reference page.

The rules are the FSDiT metric guides' warning signs as data (``Rule`` rows on the shared ``HealthMonitor``;
thresholds overridable in YAML under ``metrics.health``); ``build_fsdit_metrics`` is what the trainer calls;
``reference_page`` renders ``docs/metrics_fsdit.md``.
"""

from __future__ import annotations

from tdlm.metrics.core import TIERS, MetricRunner, tier_cadences
from tdlm.metrics.health import HealthMonitor, Rule, nonfinite_rule
from tdlm.metrics.image import IMAGE

SAME, DIFF = "cond/same_class_cos_mean", "cond/diff_class_cos_mean"

def _fid_rising(v, p, memory) -> bool:
    """Fires while val/fid is more than ``max_rise`` (relative) above the lowest val/fid of the run so far."""
    fid = v["val/fid"]
    memory["best"] = min(memory.get("best", fid), fid)
    return fid > (1 + p["max_rise"]) * memory["best"]


FSDIT_RULES = (
    nonfinite_rule("train/loss"),
    Rule("cond_not_discriminative", "same-class and different-class support embeddings are about as similar: "
         "the condition barely tells classes apart, so conditioned generation has little to learn from",
         (SAME, DIFF), "same_class_cos_mean − diff_class_cos_mean < min_gap",
         lambda v, p: v[SAME] - v[DIFF] < p["min_gap"], {"min_gap": 0.05}),
    Rule("z_std_off", "the clean model input's std is far from 1 (diffusion assumes roughly unit scale; VAE "
         "latents: check model.vae_scale)", ("latent/z_std",), "z_std < min or z_std > max",
         lambda v, p: not p["min"] <= v["latent/z_std"] <= p["max"], {"min": 0.25, "max": 4.0}),
    Rule("mode_collapse", "samples of one support set barely differ whatever the noise (mode collapse)",
         ("sample_diversity/pairwise_mse_mean",), "pairwise_mse_mean < min",
         lambda v, p: v["sample_diversity/pairwise_mse_mean"] < p["min"], {"min": 0.01}),
    Rule("act_rms_exploding", "activation RMS grows steeply with depth (last block vs first)",
         ("act/rms_ratio_last_first",), "act rms of the last block / first block > max_ratio",
         lambda v, p: v["act/rms_ratio_last_first"] > p["max_ratio"], {"max_ratio": 10.0}),
    Rule("cos_eps_negative", "predicted velocity points away from the true one (a sign or convention bug)",
         ("diffusion/cos_eps_mean",), "cos_eps_mean < −margin", lambda v, p: v["diffusion/cos_eps_mean"] < -p["margin"],
         {"margin": 0.05}, warmup=True),
    Rule("t_mean_off", "mean training t far from 0.5 (biased t sampling)", ("diffusion/t_mean",),
         "|t_mean − target| > tolerance", lambda v, p: abs(v["diffusion/t_mean"] - p["target"]) > p["tolerance"],
         {"target": 0.5, "tolerance": 0.05}),
    Rule("fid_rising", "the few-shot Fréchet distance rose well above its best (samples got worse: EMA or LR "
         "trouble, overfitting to the training classes)", ("val/fid",),
         "val/fid > (1 + max_rise) · best val/fid so far",
         _fid_rising, {"max_rise": 0.2}, memory=True),
)


def build_fsdit_metrics(cfg, *, cond_dim: int, pooled_range: float = 1.0, device=None, sinks=(),
                        is_main: bool = True) -> MetricRunner:
    """The runner of an FSDiT run: enabled tiers from ``cfg.metrics.tiers``, rules with YAML overrides."""
    ctx = {"num_t_bins": cfg.flow.num_t_bins, "cond_dim": cond_dim, "depth": cfg.model.depth,
           "num_heads": cfg.model.num_heads, "pooled_range": pooled_range, "sample_sets": cfg.sample.num_sets,
           "grad_accum_steps": cfg.trainer.grad_accum_steps, "fid_every": cfg.eval.fid_every_n_steps}
    enabled = {t: getattr(cfg.metrics.tiers, t).enabled for t in TIERS}
    health = HealthMonitor(FSDIT_RULES, cfg.metrics.health, warmup_steps=cfg.optim.warmup_steps)
    return MetricRunner(IMAGE.build(enabled, ctx), tier_cadences(cfg.metrics), cfg.trainer.max_steps,
                        health=health, sinks=sinks, device=device, is_main=is_main)


REFERENCE_INTRO = """
Every metric the FSDiT trainer (`tdlm/fsdit/train.py`) logs, generated from `tdlm/metrics/image/`
(collectors, registry `IMAGE`) and `tdlm/metrics/image_health.py` (`FSDIT_RULES`), on the same core, tiers,
cadence rules and health engine as the text trainer ([metrics.md](metrics.md)). *The original code* is the
research implementation of FSDiT this module was written from ([fsdit_notes.md](fsdit_notes.md)):

```yaml
metrics:
  tiers: {essential: {enabled: true}, research: {enabled: true}, advanced: {enabled: true}}
  logging_steps: 100            # essential
  detailed_metrics_steps: 500   # research: a multiple of logging_steps
  attention_analysis_steps: 2000  # advanced: a multiple of logging_steps
  health: {mode_collapse: {min: 0.005}}   # rule overrides, see the table at the end
trainer:
  eval_every_n_steps: 100       # val/*: a multiple of logging_steps
```

A tier reports on multiples of its cadence and on the last step; *window* collectors are updated every step and
report over all steps since their last report, the others run on due steps only (the diagnostic forward and the
sampling never run otherwise). The sample grids are also drawn once at the end of training when the advanced
tier is off. Values are float64 sums and counts combined across processes before any ratio; an empty bucket
is NaN, never 0. Names marked `{i}` are per block (0 … model.depth − 1) or t-bin (0 … flow.num_t_bins − 1),
`{h}` per head of the last block, `{s}` the guidance scale `sample.cfg_scale` as written by `:g` (3.0 → `3`).

Conventions, where the metric guides and the code could be read two ways: the flow is x_t = (1 − t)·ε + t·x
with t = 0 noise and t = 1 data, and the model predicts the velocity v = x − ε, so `diffusion/cos_eps_mean`
compares **velocities**; `train/grad_norm` is measured **before** clipping; `val/train_val_gap` is val − train
with both losses from the same model in eval mode on fixed episodes (> 0 = better on training classes);
`samples/cfg_1` is the plain conditional model, `samples/cfg_{s}` the guided one and `samples/uncond` the
unconditional one (the original code's `cfg_0` was conditional). Media: histograms go to `metrics.jsonl` as
`{"counts", "edges"}` and to wandb as `wandb.Histogram`; images are saved as PNG under `<run>/media/` (the
JSONL record holds the path) and sent to wandb as `wandb.Image`.
"""


def reference_page() -> str:
    """The text of ``docs/metrics_fsdit.md``."""
    from tdlm.metrics.docs import render

    return render(IMAGE, FSDIT_RULES, "Metric reference: FSDiT (few-shot image DiT)", REFERENCE_INTRO)
