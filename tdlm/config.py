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
    sft_padding: Literal["pad", "eos"] = "pad"
    """source=sft: what fills a row after the response's EOS (docs/sft.md). pad: [PAD], never attended, masked or
    scored; eos: [EOS] counted as response tokens (LLaDA), so the model learns to stop."""
    sft_template: Literal["auto", "plain", "chat"] = "auto"
    """source=sft: how ``messages`` are rendered: the tokenizer's chat template (chat; an error without one), the
    plain template of docs/sft.md (plain), or the chat template when the tokenizer has one, else plain (auto)."""
    sft_overlong: Literal["refuse", "truncate"] = "refuse"
    """source=sft: an example whose prompt + response exceed seq_len stops with its file and line (refuse), or is
    cut (truncate: the prompt keeps its start and end, then the response is cut)."""
    random_length_prob: float = 0.0
    """Training rows cut to a length ~ U{1..seq_len}, with this probability each (LLaDA: 0.01); the tail is padding,
    never attended, masked or scored."""
    document_mask: bool = False
    """Packed rows: attention is block-diagonal per document and RoPE positions restart at each document."""


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
    never_mask: list = field(default_factory=list)
    """Tokens that stay clean and out of the loss (bos, eos, sep, cls, unk, or a token string); they are not in the
    bound's denominator either (docs/sft.md)."""
    block_size: int = 0
    """Block diffusion (BD3-LM): rows cut into blocks of this many tokens, each with its own t, denoised given the
    clean blocks before it (``tdlm/objective.py``); 1 is autoregressive, 0 or data.seq_len plain MDLM. Must
    divide data.seq_len; training runs one forward over 2 x seq_len tokens."""
    t_clip: list = field(default_factory=list)
    """Block diffusion, bernoulli estimator: [lo, hi] with t_min <= lo < hi <= 1, BD3-LM's clipped schedule. Training
    t ~ U[lo, hi] (the masked fraction, linear schedule) with weight w(t): a lower-variance gradient of an objective
    that is not the NELBO (so train/loss is not the bound); val/loss and evaluation integrate over [t_min, 1]. []
    = off."""


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
    "data.source": ("stdlib", "markov", "files", "hub", "prepared", "sft"),
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
    validate_block_size(cfg)
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
    validate_sequences(cfg)
    return cfg


def validate_sequences(cfg: RunConfig) -> None:
    """The SFT, variable-length and document-mask keys (docs/sft.md)."""
    d = cfg.data
    if not 0.0 <= d.random_length_prob <= 1.0:
        raise ConfigError(f"data.random_length_prob: must be in [0, 1], got {d.random_length_prob}")
    if d.document_mask and (d.source in ("sft", "markov") or not d.packing):
        raise ConfigError(f"data.document_mask: needs packed documents (data.packing=true, a text source), not "
                          f"source={d.source} packing={d.packing}")


def validate_block_size(cfg: RunConfig) -> None:
    """``diffusion.block_size``: a divisor of data.seq_len (blocks tile every row), on a bidirectional denoiser with
    a fixed attention (a Hugging Face backbone's interface is checked when it is built, ``tdlm.hf_backbone``)."""
    bs, seq_len = cfg.diffusion.block_size, cfg.data.seq_len
    if bs < 0:
        raise ConfigError(f"diffusion.block_size: must be >= 0 (0 = plain MDLM), got {bs}")
    if bs and seq_len % bs:
        raise ConfigError(f"diffusion.block_size: {bs} does not divide data.seq_len {seq_len}; blocks must tile "
                          f"every row (use a divisor of {seq_len})")
    if bs and cfg.model.causal:
        raise ConfigError(f"diffusion.block_size: {bs} needs a bidirectional denoiser, but model.causal=true "
                          f"(block_size=1 is the autoregressive end of block diffusion)")
    clip = cfg.diffusion.t_clip
    if clip:
        if not 0 < bs < seq_len:
            raise ConfigError("diffusion.t_clip: the clipped schedule is for block diffusion; set a "
                              "diffusion.block_size below data.seq_len")
        if cfg.diffusion.estimator != "bernoulli":
            raise ConfigError(f"diffusion.t_clip: applies to the bernoulli estimator, not {cfg.diffusion.estimator}")
        if (len(clip) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip)
                or not cfg.diffusion.t_min <= clip[0] < clip[1] <= 1.0):
            raise ConfigError(f"diffusion.t_clip: need [lo, hi] with t_min={cfg.diffusion.t_min} <= lo < hi <= 1, "
                              f"got {clip}")
    if bs and (cfg.data.document_mask or cfg.data.source == "sft"):
        raise ConfigError(f"diffusion.block_size: {bs} with "
                          f"{'data.document_mask' if cfg.data.document_mask else 'data.source=sft'} is not supported "
                          f"yet (block diffusion builds its own block-causal mask over whole rows)")
    if bs and cfg.model.attention_anneal_steps:
        raise ConfigError(f"diffusion.block_size: {bs} fixes the attention to the block-causal mask; "
                          f"model.attention_anneal_steps must be 0")


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
