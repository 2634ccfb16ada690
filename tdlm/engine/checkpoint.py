"""Checkpoints: ``accelerator.save_state`` plus trainer state, written atomically, pruned to last N + best.

Layout: ``<run>/checkpoints/step_000123/`` holds Accelerate's state (model, optimizer, RNG of every process,
registered objects such as the LR scheduler and EMA), ``trainer_state.json`` (step, data position, best
validation loss, wandb run id: ``tdlm.engine.state``) and ``model/`` in ``save_pretrained`` form for
evaluation, beside what the task exports (the text tasks' ``tokenizer/``).
A checkpoint is written to a temporary sibling directory and renamed into place, so a crash mid-write leaves
the previous checkpoint intact and no half-written directory ever looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import yaml

from tdlm.engine.config import ConfigError

STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (those with a trainer state) in step order; temporaries are ignored."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def check_run_dir(run_dir: Path, ckpt_root: Path, trainer_section) -> bool:
    """Refuse to train over another run unless told to (``trainer.resume`` or ``trainer.overwrite``), and fail
    on a full disk before training rather than at the first save. True when the old run is to be replaced
    (the caller does it once everything else has checked out)."""
    t = trainer_section
    has_run = (run_dir / "metrics.jsonl").exists() or bool(list_checkpoints(ckpt_root))
    if has_run and not t.resume and not t.overwrite:
        raise ConfigError(f"trainer.output_dir: {run_dir} already holds a run; set trainer.resume=auto "
                          f"to continue it or trainer.overwrite=true to replace it")
    check_free_disk(run_dir.parent, t.min_free_disk_mb)
    return has_run and t.overwrite and not t.resume


def prepare_run_dir(accelerator, cfg, replace_old_run: bool) -> None:
    """Remove the run being overwritten (``check_run_dir`` said so), then, on the main process, create the run
    directory and write the resolved ``config.yaml`` (with the world size, which an exact resume must match)."""
    if replace_old_run and accelerator.is_main_process:
        shutil.rmtree(cfg.run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        data = {**cfg.to_dict(), "world_size": accelerator.num_processes}
        if data["trainer"].get("max_epochs"):  # the config as given (epochs), and the steps they made (metadata)
            data["resolved_max_steps"], data["trainer"]["max_steps"] = data["trainer"]["max_steps"], None
        (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def check_free_disk(root: Path, min_free_mb: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(root).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigError(f"trainer.min_free_disk_mb: only {free_mb:.0f} MiB free in {root}, "
                          f"need {min_free_mb} MiB to write a checkpoint")


def _agreed_free_disk(accelerator, root: Path, min_free_mb: int) -> None:
    """The free-disk check, raised on every process together (one process raising alone would hang the rest)."""
    import torch

    error = None
    if accelerator.is_main_process:
        try:
            check_free_disk(root, min_free_mb)
        except ConfigError as exc:
            error = exc
    if accelerator.num_processes > 1:
        votes = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), "sum")
        if error is None and float(votes[0]) > 0:
            error = ConfigError(f"trainer.min_free_disk_mb: the main process has less than {min_free_mb} MiB free "
                                f"in {root}")
    if error is not None:
        raise error


def save_checkpoint(accelerator, root: Path, step: int, trainer_state: dict, export_model=None,
                    export_files: Callable[[Path], None] | None = None, min_free_mb: int = 0) -> Path:
    """Collective: every process calls it. ``export_files(dir)`` (main process) writes the task's files beside
    ``model/`` (a tokenizer, say). Returns the final checkpoint directory."""
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    _agreed_free_disk(accelerator, root, min_free_mb)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if export_model is not None:  # every process: ZeRO-3 gathers the full weights collectively
        state_dict = accelerator.get_state_dict(export_model)
        if accelerator.is_main_process:
            accelerator.unwrap_model(export_model).save_pretrained(str(tmp / "model"), state_dict=state_dict)
    # Every process writes its own files (RNG state, ZeRO shards) with no barrier at the end of save_state:
    # they must all be on disk before the main process marks the checkpoint complete and renames it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if export_files is not None:
            export_files(tmp)
        state_path = tmp / STATE_FILE
        with open(state_path, "w") as f:
            json.dump(trainer_state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        old = root / f".old_{final.name}"
        if final.exists():  # re-saving a step: move the old one aside first, so a complete one always exists
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(root: Path, keep_last: int, best: str | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one (main process only)."""
    ckpts = list_checkpoints(root)
    keep = {p.name for p in ckpts[-keep_last:]} | ({best} if best else set())
    for p in ckpts:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:  # leftovers of a crash mid-write
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, root: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"trainer.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint directory from a checkpoint path, or from a run dir (its ``best`` or ``latest`` checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    root = path / "checkpoints"
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise ConfigError(f"--checkpoint: {path} is neither a checkpoint (no trainer_state.json) nor a run dir "
                          f"with checkpoints")
    if which == "best":
        best = read_state(ckpt).get("best_ckpt")
        if best and (root / best / "trainer_state.json").is_file():
            return root / best
    return ckpt
