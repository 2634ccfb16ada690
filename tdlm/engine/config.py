"""Typed run configuration, domain-free: the loader (YAML + dotted ``key=value`` overrides, checked against
nested dataclasses) and the sections every domain shares: the loop (``trainer``), ``optim``, ``metrics``, ``wandb``.

Every section is a dataclass whose fields are the only accepted keys. Loading checks unknown keys (naming the
nearest valid one), types and ranges, and raises ``ConfigError`` with a one-line message naming the dotted key.
A domain's root config (``tdlm.config.RunConfig``, ``tdlm.fsdit.config.FSDiTRunConfig``) adds its own sections
and calls ``validate_shared`` for these.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message is one line naming the culprit."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    """0 trains nothing: a run that checks the health rules notice (docs/metrics.md)."""
    weight_decay: float = 0.1
    """On matrices only (not embeddings, norms, biases). With beta2 below: the nanoGPT/LLaMA settings."""
    beta1: float = 0.9
    beta2: float = 0.95
    """0.95, not 0.98: the 1/t-weighted NELBO gradient is heavy-tailed (a sequence with small t weighs up to
    1/t_min), and with beta2=0.98 one such step shrinks the updates for long enough that the quickstart model
    stayed at its unigram plateau for 700+ steps (val loss 6.58, context ignored); 0.95 with weight decay 0.1
    reaches 6.11 in 600 steps (docs/diffusion.md)."""
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    fused: bool = True
    """Fused AdamW kernel (CPU and CUDA): one pass per step instead of ~10 ops per tensor (eval/bench_train.py)."""


@dataclass
class TrainerSection:
    """The training loop's settings, the same keys for every domain (``tdlm.engine.loop``)."""

    output_dir: str = "runs"
    run_name: str = "tdlm"
    seed: int = 0
    max_steps: int | None = 500
    """Optimizer steps; null to train for ``max_epochs`` instead (setting both is refused)."""
    max_epochs: float = 0.0
    """> 0: train for this many passes over the training split (max_steps must be null): steps = round(epochs x
    micro-batches per process per epoch / grad_accum_steps), and the validation loss is also taken at every epoch
    end. config.yaml keeps max_steps null and records the steps as ``resolved_max_steps``."""
    micro_batch_size: int = 16
    """Rows (sequences, episodes) per process per micro-step."""
    grad_accum_steps: int = 1
    eval_every_n_steps: int = 100
    save_every_n_steps: int = 250
    keep_last: int = 2
    """Newest checkpoints kept, beside the best one (lowest val/loss), which is always kept."""
    ema_decay: float = 0.0
    """0 = no EMA; otherwise an EMA with warm-up decay min(ema_decay, (1 + n) / (10 + n)) is evaluated, sampled
    and exported instead of the raw weights."""
    resume: str = ""
    """'' = fresh run; auto = latest checkpoint of this run; or a checkpoint directory."""
    overwrite: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto = bf16 on a GPU, fp32 on a CPU (bf16 is slower on CPUs without AMX)."""
    num_workers: int = 0
    """DataLoader worker processes for the training split."""
    compile: bool = False
    """torch.compile the model's training forward/backward (not evaluation or sampling). On the 2-core CPU it
    took ~20-30 s to compile and made the text step ~1.15x faster (docs/performance.md); not with DeepSpeed."""
    progress_bar: bool = True
    min_free_disk_mb: int = 50


@dataclass
class TierSection:
    enabled: bool = False


@dataclass
class TiersSection:
    essential: TierSection = field(default_factory=lambda: TierSection(enabled=True))
    research: TierSection = field(default_factory=TierSection)
    advanced: TierSection = field(default_factory=TierSection)


@dataclass
class MetricsSection:
    tiers: TiersSection = field(default_factory=TiersSection)
    """Which collector tiers run (docs/metrics.md, docs/metrics_fsdit.md list every metric by tier)."""
    logging_steps: int = 100
    """Cadence of the essential tier; every other cadence (and trainer.eval_every_n_steps) is a multiple."""
    detailed_metrics_steps: int = 500
    """Cadence of the research tier."""
    attention_analysis_steps: int = 2000
    """Cadence of the advanced tier."""
    console: bool = True
    """Print each logged step as one line on stdout (beside metrics.jsonl and wandb)."""
    health: dict = field(default_factory=dict)
    """Health-rule overrides: {rule: {param: value, enabled: bool, after_step: int}} (docs/metrics.md)."""


@dataclass
class WandbSection:
    enabled: bool = False
    project: str = "tdlm"
    entity: str = ""
    mode: str = "auto"
    """auto = online when an API key is configured, else offline; online | offline | disabled."""
    tags: list = field(default_factory=list)


class RunPaths:
    """What every domain's root config shares: a ``trainer`` section naming the run, and a plain-dict view."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.output_dir) / self.trainer.run_name


_SHARED_POSITIVE = ("trainer.micro_batch_size", "trainer.grad_accum_steps",
                    "trainer.eval_every_n_steps", "trainer.save_every_n_steps", "trainer.keep_last", "optim.eps",
                    "metrics.logging_steps", "metrics.detailed_metrics_steps", "metrics.attention_analysis_steps")
_SHARED_NON_NEGATIVE = ("optim.lr", "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip",
                        "trainer.num_workers", "trainer.min_free_disk_mb", "trainer.max_epochs")
_SHARED_UNIT = {"optim.beta1": (0.0, 1.0, False), "optim.beta2": (0.0, 1.0, False),
                "optim.min_lr_ratio": (0.0, 1.0, True), "trainer.ema_decay": (0.0, 1.0, False)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotated type; ints are accepted where floats are expected, and a string where
    a list is expected (a one-item list).

    ``X | None`` accepts null; ``Literal[...]`` accepts one of its values (the error lists them).
    """
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        typ = rest[0] if len(rest) == 1 else typ
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if typ is list and isinstance(value, str):
        return [value]  # one item needs no brackets: data.paths=notes.txt
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    expected = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}.get(
        getattr(typ, "__name__", str(typ)), typ)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {expected.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{prefix}{key}")
    return cls(**kwargs)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_values(cfg: Any, choices: dict | None = None, positive: tuple = (), non_negative: tuple = (),
                 unit: dict | None = None) -> None:
    """Generic range checks by dotted key: ``choices`` {key: allowed values}, ``positive`` (> 0),
    ``non_negative`` (>= 0), ``unit`` {key: (low, high, high inclusive)}. Raises ``ConfigError`` naming the key."""
    for key, allowed in (choices or {}).items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)}")
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    for key, (low, high, closed) in (unit or {}).items():
        v = _get(cfg, key)
        if not (low <= v <= high if closed else low <= v < high):
            raise ConfigError(f"{key}: must be in [{low:g}, {high:g}{']' if closed else ')'}, got {v}")


def check_cadences(metrics: MetricsSection, eval_every: int, eval_key: str = "trainer.eval_every_n_steps") -> None:
    """Every tier cadence and the evaluation cadence are multiples of ``metrics.logging_steps`` (aligned panels)."""
    for key in ("detailed_metrics_steps", "attention_analysis_steps"):
        if getattr(metrics, key) % metrics.logging_steps:
            raise ConfigError(f"metrics.{key}: {getattr(metrics, key)} is not a multiple of metrics.logging_steps "
                              f"{metrics.logging_steps}; cadences must align")
    if eval_every % metrics.logging_steps:
        raise ConfigError(f"{eval_key}: {eval_every} is not a multiple of metrics.logging_steps "
                          f"{metrics.logging_steps}; cadences must align")


def validate_shared(cfg: Any) -> None:
    """Ranges of the shared sections (trainer, optim, metrics, wandb) and the aligned metric cadences."""
    check_values(cfg, {"wandb.mode": ("auto", "online", "offline", "disabled")}, _SHARED_POSITIVE,
                 _SHARED_NON_NEGATIVE, _SHARED_UNIT)
    t = cfg.trainer
    if t.max_epochs and t.max_steps is not None:
        raise ConfigError(f"trainer.max_epochs: {t.max_epochs:g} set together with trainer.max_steps={t.max_steps}; "
                          f"give one (trainer.max_steps=null to train by epochs)")
    if t.max_steps is None and not t.max_epochs:
        raise ConfigError("trainer.max_steps: null needs trainer.max_epochs > 0")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps: must be > 0, got {t.max_steps}")
    check_cadences(cfg.metrics, cfg.trainer.eval_every_n_steps)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected dotted key=value, e.g. trainer.max_steps=50")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def _yaml_error_place(text: str, exc: yaml.YAMLError) -> str:
    """' line L, column C: what' for a YAML error, at the line the mistake is on.

    PyYAML reports where it *noticed* the error, often a line late: an unclosed ``[``, ``{`` or quote is noticed
    where the next line (or the end of the file) cannot continue it, and a key missing its colon
    (``hidden_size 256``) reads as a plain value running on into the next line, whose ``:`` is then refused.
    Those name the line where the bracket, quote or value began, and the line where the error was noticed.
    """
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f": {problem}"
    noticed = f"line {mark.line + 1}, column {mark.column + 1}"
    context, opened = getattr(exc, "context_mark", None), getattr(exc, "context", None) or ""
    if context is not None and context.line < mark.line and ("flow" in opened or "quoted" in opened):
        what = opened.replace("while parsing a ", "").replace("while scanning a ", "")
        return f" line {context.line + 1}, column {context.column + 1}: {what} not closed ({problem}, at {noticed})"
    last = None
    try:
        for last in yaml.scan(text):
            pass
    except yaml.YAMLError:
        pass
    if isinstance(last, yaml.ScalarToken) and last.plain and last.start_mark.line < last.end_mark.line == mark.line:
        start = last.start_mark
        first = text.splitlines()[start.line][start.column:].strip()
        return (f" line {start.line + 1}, column {start.column + 1}: {first!r} runs on into line {mark.line + 1} "
                f"(a key without ': ', or line {mark.line + 1} indented too deep?): {problem}, at {noticed}")
    return f" {noticed}: {problem}"


def read_config_data(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The raw mapping of a YAML file (None: empty) with dotted ``a.b=c`` overrides applied, before typing."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"malformed YAML in {path}{_yaml_error_place(text, exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def build_config(cls: type, data: dict) -> Any:
    """A root config dataclass ``cls`` from a raw mapping: unknown keys and wrong types raise ``ConfigError``."""
    return _build(cls, data, "")


def load(cls: type, validate, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Any:
    """Read a YAML file (None: all defaults), apply dotted ``a.b=c`` overrides, build ``cls`` and ``validate`` it."""
    return validate(build_config(cls, read_config_data(path, overrides)))
