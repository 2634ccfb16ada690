"""The text run configuration: the model, data, diffusion and sample sections beside the shared loop, optimizer,
metrics and wandb sections of ``tdlm.engine.config`` (whose loader they use).

``load_config(path, overrides)`` rejects unknown keys (naming the nearest one), wrong types and out-of-range
values with a one-line ``ConfigError`` that names the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tdlm.engine.config import (ConfigError, MetricsSection, OptimSection, RunPaths, TrainerSection,  # noqa: F401
                                WandbSection, build_config, check_values, load, validate_shared)


@dataclass
class ModelSection:
    vocab_size: int = 0
    """0 = take the tokenizer's vocabulary size."""
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 0
    """0 = the SwiGLU default, 8/3·hidden rounded up to a multiple of 64."""
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    causal: bool = False
    """True trains the same backbone autoregressively (the AR baseline with exact perplexity)."""
    pretrained: str = ""
    """A local Hugging Face model directory (or a hub name when online) as the backbone instead of tdlm's own:
    tdlm's own ``model/``, any masked LM, any causal LM (adapted to diffusion, or kept causal with ``causal``), or
    with ``trust_remote_code`` an MDLM- or LLaDA/Dream-style checkpoint (``tdlm/hf_backbone.py``). The shape keys
    above are then the checkpoint's; its tokenizer is the data's unless ``data.tokenizer`` names another."""
    trust_remote_code: bool = False
    """Run the checkpoint's own modelling code (``auto_map`` in its config.json); never on by default."""
    shift_logits: Literal["auto", True, False] = "auto"
    """Position i predicted from the hidden state at i-1 (DiffuLLaMA/Dream); auto = on for an adapted causal LM
    and for Dream, off otherwise. Refused on a masked LM."""
    attention_anneal_steps: int = 0
    """Adapted causal LM: steps over which attention goes from causal to full (DiffuLLaMA); 0 = full at once."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (Hugging Face backbones): less memory, about 30% more compute."""
    lora: dict = field(default_factory=dict)
    """LoRA adapters through ``peft`` on a pretrained backbone: {r, alpha, dropout, target_modules}; empty = off.
    Checkpoints export the merged model."""


@dataclass
class DataSection:
    source: str = "stdlib"
    """stdlib (Python standard-library docstrings), markov (synthetic, known entropy), files, hub, prepared."""
    paths: list = field(default_factory=list)
    """source=files: .txt / .jsonl / .parquet files, or directories whose such files are read in sorted order;
    source=prepared: the directory written by data_prep/prepare.py. One path may be given as a plain string."""
    hub_name: str = ""
    hub_config: str = ""
    text_column: str = "text"
    tokenizer: str = "train"
    """train = byte-level BPE trained on the training split; otherwise a pretrained tokenizer name or path."""
    vocab_size: int = 4096
    seq_len: int = 128
    packing: bool = True
    """True: documents joined with BOS/EOS and cut into full blocks. False: one document per row, right-padded."""
    val_fraction: float = 0.05
    unique_tokens: int = 0
    """> 0: train on the first training rows that hold this many valid tokens (whole rows, so up to one row more;
    ``summary/unique_tokens`` logs the count used): the data-constrained setting, epochs of a fixed unique budget
    (docs/experiments/data_constrained.md). 0 = the whole training split."""
    eval_batches: int = 0
    """Validation batches scored at each evaluation, each the size of one global batch (micro-batch x accumulation
    x processes), so any split of the same global batch scores the same rows; 0 = the whole validation split."""
    max_documents: int = 0
    """0 = all documents."""
    num_proc: int = 1
    streaming: bool = False
    """True: training reads the prepared shards in order, not rows shuffled over the whole split: process r of W
    reads shards r, r+W, ... (shard order and rows within a shard permuted per epoch); a checkpoint records each
    process's position (shard, offset). Needs at least as many shards as processes (docs/data.md)."""
    cache_dir: str = ".cache/tdlm"
    markov_order: int = 1
    """Order 1 by default: masked LMs sit on a long unigram plateau for order >= 2 chains (BERT does too)."""
    markov_symbols: int = 16
    markov_tokens: int = 400000
    markov_concentration: float = 0.25
    seed: int = 1234


@dataclass
class DiffusionSection:
    schedule: str = "linear"
    """linear | cosine | loglinear; the loss weight is -alpha'(t)/(1-alpha(t)) (1/t for linear)."""
    t_min: float = 1e-3
    """t is drawn from [t_min, 1]; the omitted [0, t_min] slice is O(t_min) nats per token (docs/diffusion.md)."""
    stratified: bool = True
    """One t per stratum of the *global* batch (lower variance, same expectation)."""
    loglinear_eps: float = 1e-3
    clip_weight: float = 0.0
    """>0 clips w(t) for the *training* gradient only (biased); reported NELBO never uses it."""
    estimator: Literal["bernoulli", "exact-k", "importance"] = "bernoulli"
    """How the training noise is drawn; each is unbiased for the same NELBO (``tdlm/noise.py``, docs/diffusion.md):
    bernoulli (t per sequence, independent masks, w(t)), exact-k (exactly k ~ U{1..L} tokens, (L/k) c_k),
    importance (t from q ∝ t^-proposal_power, w(t) p/q). Validation always scores the same Bernoulli noise."""
    proposal_power: float = 0.5
    """a in [0, 1) of the importance proposal q(t) ∝ t^-a (0 = uniform: the Bernoulli estimator)."""


@dataclass
class SampleSection:
    at_end: int = 3
    """Samples printed when training ends (0 = none)."""
    steps: int = 64
    """Reverse steps of the ancestral sampler (on the model's own noise schedule)."""


@dataclass
class RunConfig(RunPaths):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sample: SampleSection = field(default_factory=SampleSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    wandb: WandbSection = field(default_factory=WandbSection)


_CHOICES = {
    "data.source": ("stdlib", "markov", "files", "hub", "prepared"),
    "diffusion.schedule": ("linear", "cosine", "loglinear"),
}
_POSITIVE = ("model.hidden_size", "model.num_layers", "model.num_heads", "model.max_seq_len", "data.seq_len",
             "data.vocab_size", "data.num_proc", "data.markov_order", "data.markov_symbols", "data.markov_tokens",
             "sample.steps")
_NON_NEGATIVE = ("model.vocab_size", "model.intermediate_size", "data.max_documents", "data.eval_batches",
                 "data.unique_tokens",
                 "diffusion.clip_weight", "sample.at_end")
_UNIT = {"model.dropout": (0.0, 1.0, False)}


def validate(cfg: RunConfig) -> RunConfig:
    """Range and consistency checks; each failure names its dotted key."""
    validate_shared(cfg)
    check_values(cfg, _CHOICES, _POSITIVE, _NON_NEGATIVE, _UNIT)
    if not 0.0 <= cfg.diffusion.t_min < 1.0:
        raise ConfigError(f"diffusion.t_min: must be in [0, 1), got {cfg.diffusion.t_min}")
    if not 0.0 <= cfg.diffusion.proposal_power < 1.0:
        raise ConfigError(f"diffusion.proposal_power: must be in [0, 1) (0 = uniform t; 0.5 = the small-t optimum), "
                          f"got {cfg.diffusion.proposal_power}")
    if cfg.diffusion.estimator != "bernoulli" and cfg.model.causal:
        raise ConfigError(f"diffusion.estimator: {cfg.diffusion.estimator} is a masked-diffusion estimator; an AR "
                          f"run (model.causal=true) draws no noise")
    if not 0.0 < cfg.diffusion.loglinear_eps < 1.0:
        raise ConfigError(f"diffusion.loglinear_eps: must be in (0, 1), got {cfg.diffusion.loglinear_eps}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.model.pretrained:
        validate_pretrained(cfg)
    elif cfg.model.trust_remote_code or cfg.model.lora or cfg.model.attention_anneal_steps:
        key = ("trust_remote_code" if cfg.model.trust_remote_code else "lora" if cfg.model.lora
               else "attention_anneal_steps")
        raise ConfigError(f"model.{key}: applies to a pretrained backbone only; set model.pretrained")
    if cfg.model.hidden_size % cfg.model.num_heads or (cfg.model.hidden_size // cfg.model.num_heads) % 2:
        raise ConfigError(f"model.num_heads: hidden_size {cfg.model.hidden_size} must split into heads of even size")
    if cfg.data.seq_len > cfg.model.max_seq_len and not cfg.model.pretrained:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len {cfg.model.max_seq_len}")
    if cfg.data.source == "files" and not cfg.data.paths:
        raise ConfigError("data.paths: source=files needs at least one file or directory")
    if cfg.data.source == "hub" and not cfg.data.hub_name:
        raise ConfigError("data.hub_name: source=hub needs a dataset name")
    return cfg


LORA_KEYS = {"r": int, "alpha": (int, float), "dropout": (int, float), "target_modules": list}


def validate_pretrained(cfg: RunConfig) -> None:
    """``model.pretrained``: the data use the checkpoint's tokenizer unless ``data.tokenizer`` names another (the
    markov corpus brings its own, so it cannot feed a pretrained vocabulary); the LoRA keys are checked here."""
    m = cfg.model
    if cfg.data.source == "markov":
        raise ConfigError("data.source: markov has its own tokenizer; model.pretrained needs the checkpoint's "
                          "(use data.source=files)")
    where = Path(m.pretrained)
    if where.is_dir() and not (where / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {where} holds no model (no config.json)")
    if not where.exists() and (where.is_absolute() or m.pretrained.startswith(".")):
        raise ConfigError(f"model.pretrained: {where} does not exist")
    if cfg.data.tokenizer == "train":  # the checkpoint's tokenizer; tdlm's own model/ keeps it one level up
        own = Path(m.pretrained)
        beside = own.parent / "tokenizer"
        no_tokenizer = own.is_dir() and not (own / "tokenizer_config.json").is_file()
        cfg.data.tokenizer = str(beside) if no_tokenizer and beside.is_dir() else m.pretrained
    if m.attention_anneal_steps < 0:
        raise ConfigError(f"model.attention_anneal_steps: must be >= 0, got {m.attention_anneal_steps}")
    for key, value in m.lora.items():
        if key not in LORA_KEYS:
            raise ConfigError(f"model.lora.{key}: unknown key; valid keys: {', '.join(LORA_KEYS)}")
        if not isinstance(value, LORA_KEYS[key]) or isinstance(value, bool):
            raise ConfigError(f"model.lora.{key}: wrong type {type(value).__name__} ({value!r})")
    if m.lora and int(m.lora.get("r", 8)) <= 0:
        raise ConfigError(f"model.lora.r: must be > 0, got {m.lora['r']}")
    if m.lora and not 0.0 <= float(m.lora.get("dropout", 0.0)) < 1.0:
        raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {m.lora['dropout']}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML file (may be None for all defaults), apply ``a.b=c`` overrides, build and validate."""
    return load(RunConfig, validate, path, overrides)


def config_from_dict(data: dict) -> RunConfig:
    return validate(build_config(RunConfig, data))
