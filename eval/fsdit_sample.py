"""Few-shot samples from an FSDiT checkpoint, for ``eval/fid.py --gen DIR``: one support set per held-out class
(drawn with --seed and recorded), --per-class images of each class from the checkpoint's exported model (the EMA
weights when the run kept an EMA).

    python eval/fsdit_sample.py --checkpoint runs/fsdit --classes test --per-class 30 --out samples/
    python eval/fsdit_sample.py --checkpoint runs/fsdit --which latest --classes 3 17 --per-class 8 --cfg-scale 2 \
        --steps 50 --method heun --out samples/
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no eval/fsdit_sample.py --checkpoint runs/fsdit --per-class 30 --out samples/  # same images

--classes: ``val`` or ``test`` (the run's class split) or class ids, none of them a training class. The data,
class split, SigLIP and support size come from the run's ``config.yaml``; the sampler settings default to its
``sample`` section and the batch to ``eval.fid_batch_size``, so ``--classes val`` with the run's settings
reproduces its in-training ``val/fid``. Image i starts from noise keyed by (--seed, i) and batches are dealt to
the processes by their global index: 1 and N processes write the same images.

Writes to --out: ``images.npy`` (uint8 (N, 3, 32, 32), class-major), ``labels.npy`` (class of each image),
``supports.json`` (each class's support indices into the dataset, train split then test split, as
``tdlm.fsdit.data.load_cifar100_all``), ``grid_class<c>.png`` (the support set, then the samples) and
``settings.json``. Bad input is one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tdlm.accel import gather_objects, run_script  # noqa: E402
from tdlm.engine.checkpoint import resolve_checkpoint  # noqa: E402
from tdlm.engine.config import ConfigError  # noqa: E402
from tdlm.fsdit.config import fsdit_config_from_dict  # noqa: E402
from tdlm.fsdit.data import to_unit_range  # noqa: E402
from tdlm.fsdit.fewshot import assemble, draw_plan, generate, read_model_dir  # noqa: E402
from tdlm.fsdit.pipeline import VaeCodec, build_embedder, load_data  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (see --which)")
    p.add_argument("--which", default="best", choices=["best", "latest"])
    p.add_argument("--classes", nargs="+", default=["test"], help="val, test, or held-out class ids")
    p.add_argument("--per-class", type=int, required=True, help="images per class")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the run's sample.cfg_scale")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    p.add_argument("--method", choices=["euler", "heun"], default=None, help="default: the run's sample.method")
    p.add_argument("--seed", type=int, default=None, help="supports and noise; default: the run's sample.seed")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.fid_batch_size")
    p.add_argument("--data-root", default=None, help="default: the run's data.root")
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def run_config(ckpt: Path):
    """The resolved config of the run the checkpoint belongs to."""
    path = ckpt.resolve().parent.parent / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--checkpoint: {ckpt} is not inside a run directory with config.yaml (the data, class "
                          f"split and SigLIP come from it)")
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("world_size", None)
    data.pop("resolved_max_steps", None)
    return fsdit_config_from_dict(data)


def pick_classes(spec: list[str], split: dict[str, list[int]]) -> list[int]:
    if spec in (["val"], ["test"]):
        return list(split[spec[0]])
    try:
        classes = [int(c) for c in spec]
    except ValueError:
        raise ConfigError(f"--classes: expected val, test or class ids, got {' '.join(spec)}") from None
    for c in classes:
        if c in split["train"]:
            raise ConfigError(f"--classes: class {c} is a training class of this run; few-shot evaluation uses "
                              f"held-out classes (val: {split['val']}, test: {split['test']})")
        if c not in split["val"] + split["test"]:
            raise ConfigError(f"--classes: class {c} is not in this run's dataset")
    return classes


def run(args, accelerator) -> dict:
    t0 = time.perf_counter()
    if args.per_class < 1:
        raise ConfigError(f"--per-class: must be >= 1, got {args.per_class}")
    ckpt = resolve_checkpoint(args.checkpoint, args.which)
    model = read_model_dir(ckpt / "model")  # refuses a text checkpoint
    cfg = run_config(ckpt)
    if args.data_root:
        cfg.data.root = args.data_root
    s = cfg.sample
    cfg_scale = s.cfg_scale if args.cfg_scale is None else args.cfg_scale
    steps, method = args.steps or s.steps, args.method or s.method
    seed = s.seed if args.seed is None else args.seed
    batch_size = args.batch_size or cfg.eval.fid_batch_size
    device = accelerator.device
    images, labels, split = load_data(cfg)
    classes = pick_classes(args.classes, split)
    plan = draw_plan(labels, classes, cfg.data.support_size, args.per_class, seed)
    embedder = build_embedder(cfg, images, labels, device, accelerator.main_process_first)
    vae = VaeCodec(cfg.model.vae_path, cfg.model.vae_scale, device) if cfg.model.use_vae else None
    m = model.config
    part = generate(model.to(device), embedder(torch.as_tensor(plan.supports)), plan,
                    (m.in_channels, m.image_size, m.image_size), steps=steps, method=method, cfg_scale=cfg_scale,
                    batch_size=batch_size, device=device, rank=accelerator.process_index,
                    world=accelerator.num_processes, decode=vae.decode if vae is not None else None)
    samples = assemble(gather_objects(accelerator, [part]))
    settings = {"checkpoint": str(ckpt.resolve()), "data_root": str(Path(cfg.data.root).resolve()),
                "classes": plan.classes, "class_source": " ".join(args.classes), "per_class": plan.per_class,
                "num_samples": plan.num_samples, "support_size": cfg.data.support_size, "seed": seed,
                "cfg_scale": cfg_scale, "steps": steps, "method": method, "batch_size": batch_size,
                "num_processes": accelerator.num_processes, "siglip": dataclasses.asdict(cfg.siglip),
                "use_vae": cfg.model.use_vae, "seconds": time.perf_counter() - t0}
    if accelerator.is_main_process:
        write(Path(args.out), samples, images, plan, settings)
    return settings


def write(out: Path, samples: np.ndarray, images: np.ndarray, plan, settings: dict) -> None:
    from tdlm.metrics.image.advanced import image_grid
    from tdlm.metrics.media import Image

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", samples)
    np.save(out / "labels.npy", plan.labels())
    (out / "supports.json").write_text(json.dumps(
        [{"class": c, "indices": row.tolist()} for c, row in zip(plan.classes, plan.supports)], indent=1))
    for i, c in enumerate(plan.classes):
        mine = to_unit_range(samples[i * plan.per_class:(i + 1) * plan.per_class])
        rows = [to_unit_range(images[plan.supports[i]])] + list(mine.split(10))  # supports, then 10 per row
        Image(image_grid(rows)).save_png(out / f"grid_class{c:03d}.png")
    (out / "settings.json").write_text(json.dumps(settings, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, settings, is_main = run_script(lambda acc: run(args, acc))
    if is_main and settings is not None:
        print(f"{settings['num_samples']} images of classes {settings['classes']} ({settings['per_class']} each, "
              f"{settings['method']} {settings['steps']} steps, cfg {settings['cfg_scale']:g}) in "
              f"{settings['seconds']:.1f} s -> {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
