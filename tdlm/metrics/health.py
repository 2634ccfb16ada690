"""Health rules as data: a table of ``Rule`` rows, thresholds overridable in YAML, one engine for every domain.

A rule reads a few logged metrics and fires when its condition holds. ``HealthMonitor.check`` runs at every
log call, on all processes (the values are already synced, so every process decides the same): each rule
whose inputs were logged in this call yields ``health/<rule>`` = 1 (fired) or 0, and rules marked ``stop`` ask
the trainer to stop. The flag is logged at every evaluation; the console gets one warning line when a rule
starts firing and one line when it clears, not a line per logging step while it keeps firing.

YAML: ``metrics.health.<rule>.<param>: value``; every rule also takes ``enabled`` (default true) and
``after_step`` (default 0, or the end of LR warm-up for rules marked ``warmup``). A parameter may instead come
from what the trainer measured on its data (``baselines``, e.g. the unigram accuracy of the training split): a
threshold relative to what is reachable, not a fixed number that some corpora never reach. YAML still wins.
A rule with ``memory`` (a plateau: no improvement over N logs) keeps a few numbers across logs, checkpointed with
the rest of the monitor's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from tdlm.engine.config import ConfigError


@dataclass(frozen=True)
class Rule:
    name: str
    """Logged as ``health/<name>``."""
    description: str
    """The warning sign in words (one line), shown in the docs and in the warning."""
    metrics: tuple[str, ...]
    condition: str
    """The check written out for the reference page; ``check`` implements exactly this."""
    check: Callable[..., bool]
    """(values by metric name, params) -> fired; a rule with ``memory`` also gets its memory, a dict of floats
    it may update."""
    params: Mapping[str, float] = field(default_factory=dict)
    warmup: bool = False
    """Skip until ``after_step`` (default: the end of LR warm-up)."""
    stop: bool = False
    """Firing stops training (after logging)."""
    finite_only: bool = True
    """Skip the rule when an input is NaN/Inf (an empty bucket is NaN, not a failure)."""
    memory: bool = False
    """``check`` gets a third argument, this rule's memory across logs (kept in ``state_dict``)."""


class HealthMonitor:
    def __init__(self, rules: tuple[Rule, ...], overrides: Mapping[str, Mapping] | None = None,
                 warmup_steps: int = 0, key: str = "metrics.health", baselines: Mapping[str, float] | None = None):
        """``baselines``: measured values by parameter name; each sets that parameter of every rule that has it."""
        by_name = {r.name: r for r in rules}
        if len(by_name) != len(rules):
            raise ValueError("health rules must have unique names")
        overrides = dict(overrides or {})
        for name, over in overrides.items():
            if name not in by_name:
                raise ConfigError(f"{key}.{name}: unknown health rule; valid: {', '.join(by_name)}")
            if not isinstance(over, Mapping):
                raise ConfigError(f"{key}.{name}: expected a mapping of parameters, got {over!r}")
            allowed = {*by_name[name].params, "enabled", "after_step"}
            for p, v in over.items():
                if p not in allowed:
                    raise ConfigError(f"{key}.{name}.{p}: unknown parameter; valid: {', '.join(sorted(allowed))}")
                if isinstance(v, bool) != (p == "enabled") or not isinstance(v, (int, float)):
                    raise ConfigError(f"{key}.{name}.{p}: expected {'a bool' if p == 'enabled' else 'a number'}, "
                                      f"got {v!r}")
        self.rules = []
        self.params: dict[str, dict] = {}
        for r in rules:
            measured = {k: float(v) for k, v in (baselines or {}).items() if k in r.params and v is not None}
            p = {"enabled": True, "after_step": warmup_steps if r.warmup else 0, **r.params, **measured,
                 **overrides.get(r.name, {})}
            if p["enabled"]:
                self.rules.append(r)
                self.params[r.name] = p
        self.latest: dict[str, float] = {}
        self.memory: dict[str, dict[str, float]] = {r.name: {} for r in self.rules if r.memory}
        self.firing: set[str] = set()  # rules whose last evaluation fired
        self.started: list[str] = []   # rules of the last check that fired after not firing
        self.cleared: list[str] = []   # rules of the last check that stopped firing

    def state_dict(self) -> dict:
        return {"latest": {k: float(v) for k, v in self.latest.items() if isinstance(v, (int, float))},
                "firing": sorted(self.firing), "memory": {k: dict(m) for k, m in self.memory.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.latest = dict(state.get("latest", {}))
        self.firing = set(state.get("firing", []))
        for name, mem in state.get("memory", {}).items():
            if name in self.memory:  # a rule disabled since the checkpoint has no memory to restore
                self.memory[name] = dict(mem)

    def check(self, step: int, values: Mapping[str, float]) -> tuple[dict[str, float], list[tuple[Rule, str]]]:
        """Flags for the rules whose inputs appear in ``values`` (others read their latest logged value)."""
        self.latest.update(values)
        flags, fired = {}, []
        self.started, self.cleared = [], []
        for r in self.rules:
            p = self.params[r.name]
            if step < p["after_step"] or not any(m in values for m in r.metrics):
                continue
            if not all(m in self.latest for m in r.metrics):
                continue
            v = {m: float(self.latest[m]) for m in r.metrics}
            if r.finite_only and not all(math.isfinite(x) for x in v.values()):
                continue
            hit = bool(r.check(v, p, self.memory[r.name]) if r.memory else r.check(v, p))
            flags[f"health/{r.name}"] = float(hit)
            if hit != (r.name in self.firing):
                (self.started if hit else self.cleared).append(r.name)
                (self.firing.add if hit else self.firing.discard)(r.name)
            if hit:
                shown = ", ".join(f"{m}={x:.4g}" for m, x in [*v.items(), *self.memory.get(r.name, {}).items()])
                limits = ", ".join(f"{k}={x:.4g}" for k, x in p.items()
                                   if k not in ("enabled", "after_step") and not math.isnan(x))
                fired.append((r, f"health/{r.name} at step {step}: {r.description} ({shown}"
                                 f"{'; ' + limits if limits else ''})"))
        return flags, fired


def nonfinite_rule(metric: str = "train/loss") -> Rule:
    """The stop rule every trainer has: the logged training loss is NaN or ±Inf."""
    return Rule("nonfinite_loss", "training loss is NaN or Inf; stopping", (metric,), f"{metric} is NaN or ±Inf",
                lambda v, p: not math.isfinite(v[metric]), stop=True, finite_only=False)
