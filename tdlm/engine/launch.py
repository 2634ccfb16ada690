"""Starting a run: the Accelerator (with the checks that keep a launch from silently not being what was asked),
and the command-line shell every entry script shares (``--help``, exit codes, closing whatever happens)."""

from __future__ import annotations

import os
import shlex
import sys

import torch

from tdlm.engine.config import ConfigError
from tdlm.engine.faults import TrainingStopped


def quiet_libraries() -> None:
    """Drop per-save progress bars and the tied-weights notice (a tied LM head shares the embedding on purpose)."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())


def make_accelerator(cfg):
    """The Accelerator for this launch; refuses launches that would silently not be distributed as asked."""
    from accelerate import Accelerator
    from accelerate.utils import (DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin,
                                  InitProcessGroupKwargs)

    kwargs = {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if deepspeed and os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true"):
        raise ConfigError("launch: ACCELERATE_USE_CPU is set, so Accelerate would silently run plain DDP instead of "
                          "DeepSpeed; unset it (DeepSpeed on a CPU needs no flag)")
    if fsdp and not torch.cuda.is_available():
        # Measured with Accelerate 1.15: without CUDA an FSDP launch either runs plain DDP (cpu=True) or forms no
        # process group (gloo), so it would silently not shard.
        raise ConfigError("launch: FSDP needs CUDA GPUs here (on a CPU Accelerate would run plain DDP instead); use "
                          "configs/accelerate/multi_cpu.yaml or deepspeed_zero2/3.yaml on CPU")
    if world > 1 and not torch.cuda.is_available():
        if deepspeed:
            # Accelerate picks no backend for DeepSpeed without CUDA and then miscounts processes; gloo fixes it.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            # A --multi_gpu launch without CUDA otherwise trains N unsynchronised copies over the same data.
            kwargs["cpu"] = True
    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if os.environ.get("ACCELERATE_MIXED_PRECISION") not in (None, "", "no"):
        mp = os.environ["ACCELERATE_MIXED_PRECISION"]
    acc = Accelerator(
        mixed_precision=mp,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.trainer.grad_accum_steps, sync_with_dataloader=False),
        # on a GPU, batches go over by asynchronous copies from pinned memory (the DataLoaders pin): no host sync
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
        step_scheduler_with_optimizer=False, **kwargs)
    if acc.num_processes != world:
        raise ConfigError(f"launch: {world} processes were started but they formed a group of {acc.num_processes}; "
                          f"use a config from configs/accelerate/ (see README, Distributed)")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        if cfg.trainer.compile:
            raise ConfigError("trainer.compile: not supported with DeepSpeed (its engine wraps the model); set it "
                              "to false")
        _match_deepspeed_config(acc.state.deepspeed_plugin, cfg)
    return acc


def _match_deepspeed_config(plugin, cfg) -> None:
    """Fill DeepSpeed's 'auto' accumulation/clipping from the run's config; refuse numbers that disagree."""
    ds = plugin.deepspeed_config
    for key, name, want in (("gradient_accumulation_steps", "trainer.grad_accum_steps", cfg.trainer.grad_accum_steps),
                            ("gradient_clipping", "optim.grad_clip", cfg.optim.grad_clip)):
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
            setattr(plugin, key, want)
        elif float(have) != float(want):
            raise ConfigError(f"{name}: {want} but the DeepSpeed config sets {key}={have}; set it to auto there")
    if ds["zero_optimization"].get("stage") == 3:
        if cfg.trainer.ema_decay > 0:
            raise ConfigError("trainer.ema_decay: EMA is not supported under ZeRO-3 (parameters are sharded); "
                              "set it to 0 or use ZeRO-2")
        # Every checkpoint exports a consolidated save_pretrained model, which needs the gathered weights.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True


def resume_command(argv: list[str]) -> str:
    """How to continue a run stopped by SIGTERM: the same command with trainer.resume=auto."""
    args = [a for a in argv if not a.startswith(("trainer.resume=", "trainer.overwrite="))]
    launcher = "accelerate launch <same launch options>" if "LOCAL_RANK" in os.environ else "python"
    return f"{launcher} " + " ".join(shlex.quote(a) for a in [sys.argv[0], *args, "trainer.resume=auto"])


def run_cli(argv: list[str] | None, doc: str, load, make_task) -> int:
    """What an entry script's ``main`` does: ``--help``; config -> ``Engine(cfg, make_task)`` -> fit -> the task's
    report. Bad input (``ConfigError``) is one ``error:`` line and exit code 2, a run stopped by a health rule or
    a NaN (``TrainingStopped``) one line and 3; the engine is closed (wandb finished, process group torn down)
    whatever happens."""
    from tdlm.engine.loop import Engine

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return 0 if argv else 2
    engine = None
    try:
        cfg = load(argv[0], argv[1:])
        engine = Engine(cfg, make_task)
        result = engine.fit()
        if engine.preempted:
            if engine.accelerator.is_main_process:
                print(f"stopped by SIGTERM after step {engine.state.step}; checkpoint "
                      f"{engine.latest_checkpoint_name()} written. Resume with: {resume_command(argv)}", flush=True)
        elif engine.accelerator.is_main_process:
            engine.task.report(result, engine.inference_model)
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if engine is not None:
            engine.close()
