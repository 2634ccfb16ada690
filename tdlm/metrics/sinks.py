"""Where logged metrics go: the local JSONL file (always), wandb (online or offline) and the console.

Each sink has ``log(metrics: dict, step: int)`` and ``close()``; only the main process creates sinks. Media values
(``tdlm.metrics.media``) are written as JSON histograms and PNG files, or as wandb media.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tdlm.metrics.media import Histogram, Image


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class JsonlSink:
    """One JSON object per logged step, appended and flushed, so a killed run keeps everything it logged."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run re-logs the steps after its checkpoint: drop the stale tail first.
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.f = open(self.path, "a")

    def log(self, metrics: dict, step: int) -> None:
        rec = {"step": step}
        for k, v in metrics.items():
            if isinstance(v, Histogram):
                rec[k] = v.to_json()
            elif isinstance(v, Image):
                rec[k] = self._save_image(k, v, step)
            elif not _is_media(v):
                rec[k] = _jsonable(v)
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def _save_image(self, key: str, image: Image, step: int) -> str:
        """PNG beside the JSONL file, ``media/<key with / as _>_step<N>.png``; returns its relative path."""
        rel = Path("media") / f"{key.replace('/', '_')}_step{step:07d}.png"
        (self.path.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save_png(self.path.parent / rel)
        return str(rel)

    def close(self) -> None:
        self.f.close()


def _is_media(v) -> bool:
    return isinstance(v, (Histogram, Image)) or type(v).__module__.startswith("wandb")


def _to_wandb(v):
    import wandb

    if isinstance(v, Histogram):
        return wandb.Histogram(np_histogram=(list(v.counts), list(v.edges)))
    if isinstance(v, Image):
        return wandb.Image(v.pixels, caption=v.caption or None)
    return _jsonable(v)


def wandb_mode(requested: str) -> str:
    """auto: online only when an API key is configured (env or netrc), else offline; never fails for lack of one."""
    if requested in ("offline", "disabled"):
        return requested
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if requested == "online" and not has_key:
        print("warning: wandb.mode=online but no wandb API key is configured; logging offline instead",
              file=sys.stderr)
    return "online" if has_key else "offline"


class ConsoleSink:
    """One line per logged step on stdout (through tqdm, so a progress bar stays intact)."""

    def __init__(self, stream=None):
        self.stream = stream

    def log(self, metrics: dict, step: int) -> None:
        parts = [f"{k} {_fmt(v)}" for k, v in metrics.items() if not _is_media(v)]
        line = f"step {step} | " + " | ".join(parts)
        try:
            from tqdm.auto import tqdm
            tqdm.write(line, file=self.stream or sys.stdout)
        except ImportError:
            print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def _fmt(v) -> str:
    v = _jsonable(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class WandbSink:
    """wandb run. Every panel uses ``trainer/global_step`` as its x-axis and panels group by prefix
    (``train/``, ``research/``, ...): ``define_metric("<prefix>/*", step_metric=...)``. ``specs`` (MetricSpec)
    with a ``goal`` get a min/max summary instead of the last value."""

    def __init__(self, cfg, run_dir: Path, config: dict, run_id: str | None = None, specs=()):
        import wandb

        mode = wandb_mode(cfg.mode)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=run_dir.name, dir=str(run_dir),
                              config=config, mode=mode, id=run_id, resume="allow" if run_id else None,
                              tags=list(cfg.tags) or None, settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("trainer/global_step")
        for prefix in sorted({s.name.split("/")[0] for s in specs} | {"health"}):
            self.run.define_metric(f"{prefix}/*", step_metric="trainer/global_step")
        self.run.define_metric("*", step_metric="trainer/global_step")  # anything else logged
        for spec in specs:
            if spec.goal and "{" not in spec.name:
                self.run.define_metric(spec.name, step_metric="trainer/global_step", summary=spec.goal)
        self.id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({"trainer/global_step": step, **{k: _to_wandb(v) for k, v in metrics.items()}})

    def close(self) -> None:
        self.run.finish()


def run_sinks(cfg, resume_step: int, run_id: str | None, specs) -> tuple[list, str | None]:
    """The main process's sinks for a run: ``metrics.jsonl`` (a resumed run drops what the interrupted one logged
    after its checkpoint, all of it if there was none), the console when ``metrics.console``, wandb when enabled.
    Returns them and the wandb run id, which checkpoints keep so that a resume continues the same wandb run."""
    sinks: list = [JsonlSink(cfg.run_dir / "metrics.jsonl", truncate_after_step=resume_step)]
    if cfg.metrics.console:
        sinks.append(ConsoleSink())
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        wandb_sink = WandbSink(cfg.wandb, cfg.run_dir, cfg.to_dict(), run_id=run_id, specs=specs)
        sinks.append(wandb_sink)
        run_id = wandb_sink.id
    return sinks, run_id
