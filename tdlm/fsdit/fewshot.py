"""Few-shot evaluation of FSDiT: one support set per held-out class drawn with a recorded seed, N samples per
class from the (EMA) model, and the reference set of the same classes with the support images left out.

The in-training FID (``FlowMatchingTask.evaluate`` on ``eval.fid_every_n_steps``) and the command lines
(``eval/fsdit_sample.py``, then ``eval/fid.py --gen DIR``) both go through this module, so they give the same
number for the same checkpoint and settings. Image i (class-major order) starts from its own noise, keyed by
(seed, i), and batches of fixed global indices are dealt round-robin to the processes: the images do not depend on
how many processes made them. A reference that contains the supports rewards copying them (the original code's
FID-600 did exactly that), hence the exclusion by default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tdlm.engine.config import ConfigError
from tdlm.engine.randomness import keyed_generator
from tdlm.fsdit.fid import fid_kid, quantize, reference_stats
from tdlm.fsdit.flow import sample

SUPPORT_SALT, NOISE_SALT = 17, 29  # keep the support draw and the starting noise apart from other seeded streams


@dataclass
class FewShotPlan:
    """What a few-shot evaluation generates: per class, its support set and how many samples."""

    classes: list[int]
    supports: np.ndarray  # (C, K) int64 indices into the dataset's images, row c for classes[c]
    per_class: int
    seed: int

    @property
    def num_samples(self) -> int:
        return len(self.classes) * self.per_class

    def labels(self) -> np.ndarray:
        """(N,) class of each generated image, class-major."""
        return np.repeat(np.asarray(self.classes, dtype=np.int64), self.per_class)


def draw_plan(labels: np.ndarray, classes: list[int], support_size: int, per_class: int, seed: int,
              key: str = "--classes", per_class_key: str = "--per-class") -> FewShotPlan:
    """One support set of ``support_size`` images per class, drawn without replacement from a generator keyed by
    (seed, class). A class needs a support set plus at least 2 other images (a reference covariance)."""
    if per_class < 1:
        raise ConfigError(f"{per_class_key}: must be >= 1, got {per_class}")
    if not classes:
        raise ConfigError(f"{key}: no class to evaluate")
    rows = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < support_size + 2:
            raise ConfigError(f"{key}: class {c} has {len(members)} images, fewer than support_size {support_size} "
                              f"+ 2 (a support set and at least 2 held-out reference images)")
        rng = np.random.default_rng((seed, SUPPORT_SALT, int(c)))
        rows.append(np.sort(rng.choice(members, support_size, replace=False)))
    return FewShotPlan([int(c) for c in classes], np.stack(rows).astype(np.int64), per_class, seed)


def reference_indices(labels: np.ndarray, classes: list[int], supports: np.ndarray,
                      include_supports: bool = False) -> np.ndarray:
    """Indices of the reference images: every image of ``classes``, without the support images unless
    ``include_supports`` (the original code's comparison, which rewards copying the supports)."""
    mask = np.isin(labels, classes)
    if not include_supports:
        mask[np.asarray(supports).ravel()] = False
    return np.flatnonzero(mask)


@torch.no_grad()
def generate(model, cond: torch.Tensor, plan: FewShotPlan, shape: tuple[int, ...], *, steps: int, method: str,
             cfg_scale: float, batch_size: int, device, rank: int = 0, world: int = 1,
             decode: Callable | None = None) -> dict[int, np.ndarray]:
    """This process's share of the samples: {first global index of a batch: uint8 images (b, 3, H, W)}.

    ``cond`` (C, D) is the pooled support embedding of each class of the plan. Batch j holds the global indices
    [j·batch_size, (j+1)·batch_size) and goes to process j mod world."""
    n, out = plan.num_samples, {}
    for start in range(rank * batch_size, n, world * batch_size):
        idx = range(start, min(start + batch_size, n))
        noise = torch.stack([torch.randn(shape, generator=keyed_generator(plan.seed, i, NOISE_SALT)) for i in idx])
        c = cond[torch.tensor([i // plan.per_class for i in idx])].to(device)
        x = sample(model, c, (len(idx), *shape), steps=steps, method=method, cfg_scale=cfg_scale, device=device,
                   noise=noise)
        images = decode(x) if decode is not None else x
        out[start] = quantize(images.cpu()).numpy()  # rounded as a saved PNG would be
    return out


def assemble(parts: list[dict[int, np.ndarray]]) -> np.ndarray:
    """The shares of every process, in global index order: (N, 3, H, W) uint8."""
    merged = {k: v for part in parts for k, v in part.items()}
    return np.concatenate([merged[k] for k in sorted(merged)])


class FewShotFID:
    """The in-training few-shot FID: a fixed plan over the validation classes, the reference statistics of their
    other images (computed once, at the first evaluation) and the extractor."""

    def __init__(self, plan: FewShotPlan, cond: torch.Tensor, images: np.ndarray, labels: np.ndarray, extractor,
                 shape: tuple[int, ...], sample_cfg, batch_size: int, device, decode: Callable | None = None):
        self.plan, self.cond, self.extractor, self.shape = plan, cond, extractor, shape
        self.sample_cfg, self.batch_size, self.device, self.decode = sample_cfg, batch_size, device, decode
        self.ref_images = images[reference_indices(labels, plan.classes, plan.supports)]
        self._ref = None

    def reference(self):
        if self._ref is None:
            self._ref = reference_stats(self.extractor, self.ref_images, ref_id="fsdit-fewshot-val")
        return self._ref

    def __call__(self, model, rank: int = 0, world: int = 1, gather: Callable | None = None) -> dict:
        """Collective when ``world`` > 1 (``gather``: every process's list of shares, on every process). Returns
        fid_kid's dict plus ``seconds`` (sampling, features and distances)."""
        t0 = time.perf_counter()
        s = self.sample_cfg
        part = generate(model, self.cond, self.plan, self.shape, steps=s.steps, method=s.method,
                        cfg_scale=s.cfg_scale, batch_size=self.batch_size, device=self.device, rank=rank,
                        world=world, decode=self.decode)
        images = assemble(gather([part]) if gather is not None else [part])
        result = fid_kid(self.extractor, images, self.reference())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {**result, "seconds": time.perf_counter() - t0}


def per_class_for(num_samples: int, num_classes: int) -> int:
    """Samples per class so that at least ``num_samples`` are generated over ``num_classes`` classes."""
    return math.ceil(num_samples / num_classes)


def read_model_dir(model_dir: Path):
    """An exported FSDiT (``checkpoints/step_N/model``); a text checkpoint or anything else is a one-line error."""
    import json

    from tdlm.fsdit.model import FSDiT, FSDiTConfig

    config = model_dir / "config.json"
    if not config.is_file():
        raise ConfigError(f"--checkpoint: {model_dir.parent} has no model/config.json (not a checkpoint)")
    data = json.loads(config.read_text())
    fields = set(FSDiTConfig.__dataclass_fields__)
    if not set(data) <= fields:
        kind = f"a text model (model_type '{data['model_type']}')" if "model_type" in data else "not an FSDiT model"
        raise ConfigError(f"--checkpoint: {model_dir.parent} holds {kind}, not an FSDiT checkpoint")
    return FSDiT.from_pretrained(model_dir).eval()
