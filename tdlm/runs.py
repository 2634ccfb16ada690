"""Reading what a training run left on disk: checkpoints, the resolved config, and the logged metric history.

A run directory (``<output_dir>/<run_name>/``) holds ``config.yaml``, ``metrics.jsonl``, ``tokenizer/``,
``checkpoints/step_NNNNNNN/{model,tokenizer,trainer_state.json}`` and, with wandb on, ``wandb/*-run-*/``.
Offline wandb runs are read straight from their ``run-<id>.wandb`` file (LevelDB-log framing of
``wandb_internal_pb2.Record`` protobufs); wandb 0.31 ships no reader for it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .engine.checkpoint import read_state, resolve_checkpoint  # noqa: F401 (resolve_checkpoint: re-exported)
from .config import ConfigError, RunConfig, config_from_dict


def run_dir_of(ckpt: Path) -> Path:
    return Path(ckpt).resolve().parent.parent


def load_run_config(run_dir: Path) -> RunConfig | None:
    """The resolved config a run wrote (``world_size`` is run metadata, not a config key); None if absent."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("world_size", None)
    data.pop("resolved_max_steps", None)
    return config_from_dict(data)


def run_world_size(run_dir: Path) -> int:
    path = Path(run_dir) / "config.yaml"
    return int((yaml.safe_load(path.read_text()) or {}).get("world_size", 1)) if path.is_file() else 1


@dataclass
class LoadedCheckpoint:
    path: Path
    model: object            # TdlmForMaskedOrCausalLM or HFBackbone, in eval mode
    tokenizer: object
    state: dict              # trainer_state.json
    config: RunConfig | None  # the run's config.yaml, when the checkpoint sits in a run dir

    @property
    def causal(self) -> bool:
        return bool(self.model.config.causal)


def load_checkpoint(path: str | Path, which: str = "best") -> LoadedCheckpoint:
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar per load
    ckpt = resolve_checkpoint(path, which)
    if not (ckpt / "model" / "config.json").is_file():
        raise ConfigError(f"--checkpoint: {ckpt} has no model/ (written by save_pretrained)")
    model = load_model_dir(ckpt / "model")
    tok_dir = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else run_dir_of(ckpt) / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").is_file():  # else transformers would try the hub with the path
        raise ConfigError(f"--checkpoint: {ckpt} has no tokenizer (neither {ckpt / 'tokenizer'} nor the run's)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return LoadedCheckpoint(ckpt, model, tokenizer, read_state(ckpt), load_run_config(run_dir_of(ckpt)))


def load_model_dir(path: str | Path):
    """A saved ``model/`` in eval mode: tdlm's own backbone, or a Hugging Face backbone rebuilt from the flag its
    export carries (interface, attention, logit shift, mask token; ``tdlm.hf_backbone``)."""
    from .hf_backbone import is_hf_export, load_hf_export
    from .model import TdlmForMaskedOrCausalLM

    if is_hf_export(path):
        return load_hf_export(path).eval()
    return TdlmForMaskedOrCausalLM.from_pretrained(str(path)).eval()


def count_parameters(model) -> dict:
    """Total and non-embedding parameter counts (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - emb}


# ----------------------------------------------------------------------------------------------------------
# Metric histories


@dataclass
class RunHistory:
    """One run's logged metrics: rows of {step, key: value}, plus what describes the run."""

    name: str
    rows: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    source: str = ""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, finite numbers only, in step order."""
        pts = [(r["step"], r[key]) for r in self.rows if _finite(r.get(key))]
        pts.sort(key=lambda p: p[0])
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    def keys(self) -> set[str]:
        return {k for r in self.rows for k in r if k != "step"}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def numeric_items(rec: dict) -> dict:
    """The finite numbers of a logged record; booleans (a health rule logged as True/False) become 1.0/0.0."""
    out = {}
    for k, v in rec.items():
        v = float(v) if isinstance(v, bool) else v
        if _finite(v):
            out[k] = v
    return out


def read_metrics_jsonl(run_dir: Path) -> RunHistory:
    run_dir = Path(run_dir)
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            rows.append({**numeric_items(rec), "step": rec["step"]})
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return RunHistory(run_dir.name, rows, cfg or {}, str(run_dir / "metrics.jsonl"))


def _leveldb_records(data: bytes) -> list[bytes]:
    """Payloads of a LevelDB-log file: 32 KiB blocks, 7-byte headers <crc:u32, len:u16, type:u8>."""
    block, pos, out, pending = 32768, 7, [], b""  # skip the 7-byte ':W&B' file header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    return out


def _item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_wandb_file(path: Path) -> RunHistory:
    """History, config and name of an offline wandb run from its ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ConfigError(f"--runs: {path} is not a wandb run file")
    name, config, rows = path.parent.name, {}, []
    for payload in _leveldb_records(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            name = rec.run.display_name or rec.run.run_id or name
            for item in rec.run.config.update:
                if _item_key(item) != "_wandb":
                    config[_item_key(item)] = _json_or_none(item.value_json)
        elif kind == "history":
            vals = {_item_key(i): _json_or_none(i.value_json) for i in rec.history.item}
            step = vals.get("trainer/global_step", vals.get("_step"))
            if _finite(step):
                rows.append({**numeric_items({k: v for k, v in vals.items() if not k.startswith("_")}),
                             "step": int(step)})
    return RunHistory(name, rows, config, str(path))


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def find_runs(path: Path) -> list[RunHistory]:
    """Histories found at a path: a run-<id>.wandb file, a wandb run dir, a dir of wandb runs, or our run dir.

    Our run dir with both ``metrics.jsonl`` and ``wandb/`` is read from ``metrics.jsonl`` only (same numbers).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".wandb":
        return [read_wandb_file(path)]
    if (path / "metrics.jsonl").is_file():
        return [read_metrics_jsonl(path)]
    files = sorted(path.glob("run-*.wandb")) or sorted(path.glob("*-run-*/run-*.wandb")) or \
        sorted(path.glob("wandb/*-run-*/run-*.wandb"))
    if not files:
        raise ConfigError(f"--runs: {path} holds no metrics.jsonl and no wandb run (run-*.wandb)")
    return [read_wandb_file(f) for f in files]

