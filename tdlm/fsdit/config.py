"""FSDiT run configuration: the sections of ``configs/fsdit_*.yaml``, read by the loader of ``tdlm.config``.

The loop (``trainer``), optimizer, metrics and wandb sections are the engine's shared dataclasses
(``tdlm.engine.config``: the same keys, meaning and cadence rules as the text trainer's); the others are
FSDiT's. ``load_fsdit_config(path, overrides)`` rejects unknown keys (naming the nearest one), wrong types and
out-of-range values with a one-line ``ConfigError`` that names the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tdlm.engine.config import (ConfigError, MetricsSection, OptimSection, RunPaths, TrainerSection, WandbSection,
                                build_config, check_cadences, check_values, load, validate_shared)


@dataclass
class ModelSection:
    """The DiT backbone (``tdlm.fsdit.model.FSDiTConfig``); cond_dim comes from the SigLIP encoder."""

    patch_size: int = 2
    hidden_size: int = 450
    depth: int = 6
    num_heads: int = 9
    mlp_ratio: float = 3.0
    projector: Literal["mlp", "linear"] = "mlp"
    """mlp: cond_dim -> 2D -> GELU -> D (the original code's SupportProjector); linear: one Linear."""
    context_scale: Literal["channel", "scalar"] = "channel"
    """Learnable gate on y_emb: per channel, or one scalar."""
    context_scale_init: float = 1.0
    cond_layernorm: bool = False
    """c = LN(t_emb) + context_scale * LN(y_emb) instead of t_emb + context_scale * y_emb."""
    class_dropout: float = 0.1
    """Per-sample probability of training with the learned null condition (classifier-free guidance)."""
    t_scale: float = 1000.0
    """t in [0, 1] is multiplied by this before the sinusoidal embedding."""
    use_vae: bool = False
    """Diffuse in the latent space of a local diffusers AutoencoderKL (model.vae_path) instead of pixels."""
    vae_path: str | None = None
    """Local AutoencoderKL directory (config.json + weights); nothing is downloaded."""
    vae_scale: float = 0.18215
    """Latents are multiplied by this (SD-VAE's factor) so that latent/z_std is about 1."""


@dataclass
class DataSection:
    root: str = "data/cifar100"
    """Directory holding cifar-100-python/{train,test,meta} (or that folder itself)."""
    support_size: int = 6
    """Images in a support set: other images of the target's class, never the target."""
    class_split: list = field(default_factory=lambda: [0.6, 0.2, 0.2])
    """Fractions of classes for train / val / test; the splits are class-disjoint."""
    split_seed: int = 0
    val_size: int = 100
    """Fixed held-out episodes (x, eps, t, support) of validation classes; t is stratified over them."""


@dataclass
class SiglipSection:
    path: str | None = None
    """Local SigLIP directory (save_pretrained layout; a full SiglipModel checkpoint also loads)."""
    tiny: bool = False
    """Build a random 2-layer SigLIP from a SiglipVisionConfig instead (tests, demo: not a real encoder)."""
    tiny_image_size: int = 16
    seed: int = 0
    """Seed of the tiny encoder's random weights."""
    mode: Literal["precompute", "online"] = "precompute"
    """precompute: embed every image once, cached on disk; online: embed supports as they come, through an LRU."""
    cache_dir: str = ".cache/fsdit"
    cache_size: int = 4096
    """LRU capacity (images) of the online mode."""
    batch_size: int = 256


@dataclass
class FlowSection:
    t_dist: Literal["uniform", "logit_normal"] = "uniform"
    stratified: bool = True
    """Stratify t over the global batch (same marginal, every 1/n of probability mass hit once per step)."""
    num_t_bins: int = 10
    """Bins of t for train/loss_tbin_i and val/loss_tbin_i: bin k holds t in [k/K, (k+1)/K)."""


@dataclass
class SampleSection:
    method: Literal["euler", "heun"] = "euler"
    steps: int = 50
    cfg_scale: float = 3.0
    """Guidance scale s of samples/cfg_{s}: v = v_u + s (v_c - v_u); samples/cfg_1 is the plain conditional."""
    num_sets: int = 4
    """Support sets (one per validation class) in a sample grid; 0 = no samples."""
    per_set: int = 4
    """Samples per support set (different noise): the pairs of one set give the diversity metrics."""
    seed: int = 0


@dataclass
class EvalSection:
    """The in-training few-shot FID (``tdlm.fsdit.fewshot``): the EMA model samples with the ``sample`` section's
    method, steps, cfg_scale and seed, from one fixed support set per validation class, and the result is
    compared with the other images of those classes (never the supports). Logged as val/fid and val/kid."""

    fid_every_n_steps: int = 0
    """0 = off; else a multiple of trainer.eval_every_n_steps (it runs inside the evaluation), and at the end."""
    fid_num_samples: int = 600
    """Generated images, spread evenly over the validation classes (rounded up to a multiple of their number)."""
    fid_extractor: Literal["inception", "siglip", "randconv"] = "inception"
    """inception: an FID (needs eval.inception_path); siglip: a Fréchet distance in the features of the SigLIP this
    run conditions on; randconv: a random CNN, for tests only."""
    inception_path: str | None = None
    """Local TorchScript Inception file (inception-2015-12-05.pt); nothing is downloaded."""
    fid_batch_size: int = 50
    """Images per sampling batch (eval/fsdit_sample.py uses the same by default: the same images)."""


@dataclass
class FSDiTRunConfig(RunPaths):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    siglip: SiglipSection = field(default_factory=SiglipSection)
    flow: FlowSection = field(default_factory=FlowSection)
    sample: SampleSection = field(default_factory=SampleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=lambda: TrainerSection(
        run_name="fsdit", max_steps=1000, micro_batch_size=32, save_every_n_steps=500, ema_decay=0.9999))
    metrics: MetricsSection = field(default_factory=MetricsSection)
    wandb: WandbSection = field(default_factory=WandbSection)


IMAGE_SIZE = 32  # CIFAR-100

_POSITIVE = ("model.patch_size", "model.hidden_size", "model.depth", "model.num_heads", "model.mlp_ratio",
             "model.t_scale", "model.vae_scale", "data.support_size", "data.val_size", "siglip.tiny_image_size",
             "siglip.cache_size", "siglip.batch_size", "flow.num_t_bins", "sample.steps",
             "eval.fid_num_samples", "eval.fid_batch_size")
_NON_NEGATIVE = ("sample.cfg_scale", "sample.num_sets", "eval.fid_every_n_steps")
_UNIT = {"model.class_dropout": (0.0, 1.0, False)}


def validate(cfg: FSDiTRunConfig) -> FSDiTRunConfig:
    """Ranges and consistency; every failure names its dotted key. Files are checked when the trainer opens them."""
    validate_shared(cfg)
    check_values(cfg, positive=_POSITIVE, non_negative=_NON_NEGATIVE, unit=_UNIT)
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.num_heads: hidden_size {m.hidden_size} is not divisible by {m.num_heads} heads")
    if not m.use_vae and IMAGE_SIZE % m.patch_size:
        raise ConfigError(f"model.patch_size: {m.patch_size} does not divide the image size {IMAGE_SIZE}")
    split = cfg.data.class_split
    if (len(split) != 3 or not all(isinstance(f, (int, float)) and f >= 0 for f in split)
            or abs(sum(split) - 1.0) > 1e-6):
        raise ConfigError(f"data.class_split: expected three fractions >= 0 summing to 1, got {split}")
    if cfg.siglip.path is None and not cfg.siglip.tiny:
        raise ConfigError("siglip.path: not set; give a local SigLIP directory (save_pretrained layout), or "
                          "siglip.tiny=true for a random tiny encoder (tests and demo only)")
    if cfg.sample.num_sets and cfg.sample.per_set < 2:
        raise ConfigError(f"sample.per_set: must be >= 2 (the diversity metrics compare samples of one support "
                          f"set), got {cfg.sample.per_set}")
    e = cfg.eval
    if e.fid_every_n_steps:
        check_cadences(cfg.metrics, e.fid_every_n_steps, "eval.fid_every_n_steps")
        if e.fid_every_n_steps % cfg.trainer.eval_every_n_steps:
            raise ConfigError(f"eval.fid_every_n_steps: {e.fid_every_n_steps} is not a multiple of "
                              f"trainer.eval_every_n_steps {cfg.trainer.eval_every_n_steps}; cadences must align")
        if e.fid_extractor == "inception" and not e.inception_path:
            raise ConfigError("eval.inception_path: not set; eval.fid_extractor=inception needs a local TorchScript "
                              "Inception file (inception-2015-12-05.pt; nothing is downloaded), or set "
                              "eval.fid_extractor=siglip for a Fréchet distance in SigLIP features")
    return cfg


def load_fsdit_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> FSDiTRunConfig:
    """Read a YAML file (None: all defaults), apply dotted ``a.b=c`` overrides, build and validate."""
    return load(FSDiTRunConfig, validate, path, overrides)


def fsdit_config_from_dict(data: dict) -> FSDiTRunConfig:
    return validate(build_config(FSDiTRunConfig, data))
