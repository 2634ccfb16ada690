"""The domain-free metric core: collectors with torchmetrics-style state, a registry, tier cadences, the runner.

A ``Collector`` declares its tier, the metrics it emits (``MetricSpec``: name, unit, one-line description) and
what it needs. It holds tensor states declared with ``add_state(name, default, reduce)``; ``update`` only
accumulates on the device (no ``.item()``), ``compute`` only derives values, ``reset`` restores the defaults.
Across processes states are combined by ``sum`` (or ``max``/``min``; ``None`` marks a value that is identical
on every process), never by averaging per-process ratios, so N processes report what one process would over
the same global batch.

A ``Registry`` belongs to a domain (text in ``tdlm.metrics.text``, images in ``tdlm.fsdit``): it maps each
*need* (``"logits"``, ``"attention_probs"``, ...) to the update-call *sources* that carry it (``"batch"``,
``"model"``, ``"step"``) and says which needs are expensive. Collectors with an expensive need update only on
the steps their tier is due, so extra forwards/backwards happen only there. ``MetricRunner`` dispatches the
trainer's ``update(step, **sources)`` calls, and on due steps syncs, computes, resets, runs the health rules
and writes the sinks. Nothing here knows about text or images. A domain plugs in like this::

    IMAGE = Registry("image", {"velocity": Need(("batch",), "predicted and true velocity, (B, C, H, W)")})

    @IMAGE.register
    class VelocityCosine(Collector):
        tier, needs = "essential", ("velocity",)
        metrics = (MetricSpec("diffusion/cos_eps_mean", "1", "cosine of predicted and true velocity"),)

        def __init__(self, **ctx):
            super().__init__()
            self.add_state("total", torch.zeros((), dtype=torch.float64))  # reduce="sum" by default
            self.add_state("count", torch.zeros((), dtype=torch.float64))

        def update(self, inputs):
            out = inputs["batch"]
            self.total += F.cosine_similarity(out.v_pred.flatten(1), out.v.flatten(1)).double().sum()
            self.count += out.v.shape[0]

        def compute(self):
            return {"diffusion/cos_eps_mean": functional.ratio(self.total, self.count)}

    runner = MetricRunner(IMAGE.build(enabled_tiers, ctx), tier_cadences(cfg.metrics), max_steps,
                          health=HealthMonitor(IMAGE_RULES, cfg.metrics.health), sinks=sinks, device=device)
    runner.update(step, batch=out, model=model)        # each micro-batch (before backward)
    runner.update(step, step=StepInfo(...))            # each optimizer step
    if runner.due(step): stops = runner.log(step, runner.compute(step))
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
import torch.distributed as dist

TIERS = ("essential", "research", "advanced")
REDUCTIONS = ("sum", "max", "min", None)


@dataclass(frozen=True)
class MetricSpec:
    """One logged metric. ``name`` may hold ``{i}``/``{h}`` for a family (``act/layer{i}_rms``)."""

    name: str
    unit: str
    description: str
    goal: str | None = None
    """'min' / 'max': the wandb summary keeps the best value instead of the last."""


@dataclass(frozen=True)
class Need:
    """An input a collector can ask for, and which ``update`` call(s) carry it."""

    sources: tuple[str, ...]
    description: str
    expensive: bool = False


class Collector:
    """Base class. Subclasses set the class attributes and implement ``update`` and ``compute``."""

    tier: ClassVar[str] = "essential"
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    window: ClassVar[bool] = True
    """True: updated on every step and reported over the tier's window. False: updated on due steps only."""
    required: ClassVar[bool] = False
    """On even when its tier is off (e.g. the loss that the NaN/Inf stop rule reads)."""
    final: ClassVar[bool] = False
    """When its tier is off, still built and run once, at the last step (e.g. end-of-training sample grids)."""
    sources: ClassVar[frozenset[str]] = frozenset()  # filled in by Registry.register

    def __init__(self, **context: Any):
        self._defaults: dict[str, torch.Tensor] = {}
        self._reduce: dict[str, str | None] = {}
        self.final_only = False  # set by Registry.build: on only because of ``final``, so due at the last step only

    @classmethod
    def applies(cls, context: Mapping[str, Any]) -> bool:
        """Whether this collector makes sense for the run (e.g. diffusion-only metrics in an AR run)."""
        return True

    def add_state(self, name: str, default: torch.Tensor, reduce: str | None = "sum") -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}.{name}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self._defaults[name] = default.detach().clone()
        self._reduce[name] = reduce
        setattr(self, name, default.detach().clone())

    def update(self, inputs: "Inputs") -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        """Metric name -> scalar (a 0-d tensor or a number) or a media object the sinks take as it is."""
        raise NotImplementedError

    def pending(self) -> bool:
        """Holds a value of the current step that is reported on that step whatever the cadence (a validation)."""
        return False

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, default.clone())

    def states(self) -> Iterable[tuple[str, str | None]]:
        return self._reduce.items()

    def to(self, device) -> "Collector":
        for name in self._defaults:
            self._defaults[name] = self._defaults[name].to(device)
            setattr(self, name, getattr(self, name).to(device))
        return self


class Inputs(dict):
    """The sources of one ``update`` call, the step number, and a per-call cache for derived tensors.

    Collectors that share a derived tensor (an argmax over the logits, say) compute it through ``cached`` so
    it is computed once per micro-batch whichever collectors are on.
    """

    def __init__(self, step: int, sources: Mapping[str, Any]):
        super().__init__(sources)
        self.step = step
        self._cache: dict[str, Any] = {}

    def cached(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]


@dataclass
class StepInfo:
    """Once per optimizer step (source ``"step"``): what the step did outside the micro-batches."""

    grad_norm: torch.Tensor | float | None  # global norm before clipping
    lr: float
    tokens: int  # rows x units (token positions, episodes) processed by all processes in this step
    seconds: float  # wall time of the step: data, forward, backward, optimizer, EMA (never evaluation)
    epoch: int
    model: torch.nn.Module
    data_seconds: float = 0.0  # of which waiting for the micro-batches
    update_seconds: float = 0.0  # of which the micro-batches' forward/backward and the optimizer step
    flops: float = 0.0  # model training FLOPs of the run up to and including this step (0: the task counts none)


@dataclass
class GradView:
    """Once per optimizer step (source ``"grads"``), after backward and before clipping."""

    model: torch.nn.Module  # unwrapped, .grad set
    lr: float  # the LR this step uses


class Registry:
    """A domain's collectors, its need table and its externally produced metrics (for the reference page)."""

    def __init__(self, name: str, needs: Mapping[str, Need]):
        self.name = name
        self.needs = dict(needs)
        self.collectors: list[type[Collector]] = []
        self.external: list[tuple[str, str, MetricSpec]] = []  # (tier, producer, spec)

    def register(self, cls: type[Collector]) -> type[Collector]:
        """Class decorator; checks the declaration and derives the update sources from the needs."""
        if cls.tier not in TIERS:
            raise ValueError(f"{cls.__name__}: tier {cls.tier!r} is not one of {TIERS}")
        unknown = [n for n in cls.needs if n not in self.needs]
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown needs {unknown}; {self.name} knows {sorted(self.needs)}")
        if cls.window and any(self.needs[n].expensive for n in cls.needs):
            raise ValueError(f"{cls.__name__}: an expensive need requires window = False (due steps only)")
        taken = {s.name for s in self.specs()} & {s.name for s in cls.metrics}
        if taken:
            raise ValueError(f"{cls.__name__}: metric names already registered in {self.name}: {sorted(taken)}")
        cls.sources = frozenset(s for n in cls.needs for s in self.needs[n].sources)
        self.collectors.append(cls)
        return cls

    def add_external(self, tier: str, producer: str, *specs: MetricSpec) -> None:
        """Metrics a trainer produces itself (validation, run summary): documented and given wandb summaries."""
        self.external.extend((tier, producer, s) for s in specs)

    def specs(self) -> list[MetricSpec]:
        return [s for c in self.collectors for s in c.metrics] + [s for _, _, s in self.external]

    def build(self, enabled: Mapping[str, bool], context: Mapping[str, Any]) -> list[Collector]:
        out = []
        for cls in self.collectors:
            on = enabled.get(cls.tier, False) or cls.required
            if (on or cls.final) and cls.applies(context):
                collector = cls(**context)
                collector.final_only = not on
                out.append(collector)
        return out


def tier_cadences(metrics_cfg) -> dict[str, int]:
    """Steps between reports per tier, from the ``metrics`` config section."""
    return {"essential": metrics_cfg.logging_steps, "research": metrics_cfg.detailed_metrics_steps,
            "advanced": metrics_cfg.attention_analysis_steps}


def loss_grad_vectors(losses: Iterable[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """(K, P) float32: the flattened gradient of each scalar loss w.r.t. ``params``, leaving ``.grad`` alone.

    One extra backward pass per loss through the retained graph (the training backward runs after).
    """
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1).float() for g in grads]))
    return torch.stack(rows)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sync_states(collectors: Iterable[Collector]) -> None:
    """All-reduce every state in place: one collective per (reduction, dtype), states flattened together."""
    if _world() == 1:
        return
    groups: dict[tuple, list[tuple[Collector, str]]] = {}
    for c in collectors:
        for name, reduce in c.states():
            if reduce is not None:
                groups.setdefault((reduce, getattr(c, name).dtype), []).append((c, name))
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    for (reduce, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        flat = torch.cat([getattr(c, n).reshape(-1) for c, n in members])
        dist.all_reduce(flat, op=ops[reduce])
        offset = 0
        for c, n in members:
            old = getattr(c, n)
            setattr(c, n, flat[offset:offset + old.numel()].view_as(old))
            offset += old.numel()


class MetricRunner:
    """Dispatches updates to the enabled collectors, and on due steps computes, checks health and logs."""

    def __init__(self, collectors: list[Collector], cadences: Mapping[str, int], last_step: int, *,
                 health=None, sinks: Iterable = (), device=None, is_main: bool = True):
        self.collectors = [c.to(device) if device is not None else c for c in collectors]
        self.cadences = dict(cadences)
        self.last_step = last_step
        self.health = health
        self.sinks = list(sinks)
        self.is_main = is_main

    def due(self, step: int, tier: str | None = None) -> bool:
        """A tier reports on multiples of its cadence and on the last step; ``tier=None``: any enabled tier."""
        tiers = [tier] if tier else {c.tier for c in self.collectors if not c.final_only}
        if any(step % self.cadences[t] == 0 or step == self.last_step for t in tiers):
            return True
        return tier is None and step == self.last_step and any(c.final_only for c in self.collectors)

    def _due(self, c: Collector, step: int) -> bool:
        return step == self.last_step if c.final_only else self.due(step, c.tier)

    def update(self, step: int, /, **sources: Any) -> None:
        """Feed one call's sources (``batch=``, ``model=``, ``step=``...) to every collector they satisfy."""
        inputs = Inputs(step, sources)
        for c in self.collectors:
            if c.sources <= inputs.keys() and (c.window or self._due(c, step)):
                c.update(inputs)

    def compute(self, step: int, extra: bool = False) -> dict[str, float]:
        """Sync, compute and reset the collectors whose tier is due at ``step`` (``extra``: and the ones holding a
        value of this very step, an evaluation off the cadence); scalars come back as floats, all in one
        device-to-host transfer."""
        due = [c for c in self.collectors if self._due(c, step) or (extra and c.pending())]
        sync_states(due)
        values: dict[str, Any] = {}
        for c in due:
            values.update(c.compute())
            c.reset()
        tensors = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        if tensors:
            host = torch.stack([values[k].detach().double().reshape(()) for k in tensors]).cpu().tolist()
            values.update(zip(tensors, host))
        # numbers become floats; anything else (a wandb.Histogram, an image) goes to the sinks as it is
        return {k: float(v) if isinstance(v, (int, float)) else v for k, v in values.items()}

    def log(self, step: int, values: Mapping[str, float]) -> list:
        """Add the health flags, write every sink; returns the fired rules that ask training to stop."""
        values = dict(values)
        stops = []
        if self.health is not None:
            flags, fired = self.health.check(step, values)
            values.update(flags)
            for rule, message in fired:
                if self.is_main and (rule.stop or rule.name in self.health.started):
                    print(f"warning: {message}", file=sys.stderr, flush=True)
                if rule.stop:
                    stops.append((rule, message))
            if self.is_main:
                for name in self.health.cleared:
                    print(f"health/{name} cleared at step {step}", file=sys.stderr, flush=True)
        for sink in self.sinks:
            sink.log(values, step)
        return stops

    def state_dict(self) -> dict:
        """Collective. The unreported windows (combined across processes) and the health monitor's memory, as
        JSON-able lists, so a resumed run logs what the uninterrupted one would have."""
        collectors = {}
        for i, c in enumerate(self.collectors):
            states = {}
            for name, reduce in c.states():
                value = getattr(c, name).detach().clone()
                if reduce is not None and _world() > 1:
                    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
                    dist.all_reduce(value, op=ops[reduce])
                states[name] = {"dtype": str(value.dtype).removeprefix("torch."), "value": value.cpu().tolist()}
            collectors[f"{i}:{type(c).__name__}"] = states
        return {"collectors": collectors, "health": self.health.state_dict() if self.health is not None else {}}

    def load_state_dict(self, state: Mapping, rank: int = 0) -> None:
        """Sums go to rank 0 only (the others start from zero, so the next sync adds up to the saved total);
        max/min and unreduced states to every rank."""
        saved = state.get("collectors", {})
        for i, c in enumerate(self.collectors):
            states = saved.get(f"{i}:{type(c).__name__}")
            if states is None:  # a different set of collectors (tiers switched on or off): fresh windows
                continue
            for name, reduce in c.states():
                if name in states and (reduce != "sum" or rank == 0):
                    old = getattr(c, name)
                    value = torch.tensor(states[name]["value"], dtype=getattr(torch, states[name]["dtype"]))
                    setattr(c, name, value.to(old.device).reshape(old.shape))
        if self.health is not None:
            self.health.load_state_dict(state.get("health", {}))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

