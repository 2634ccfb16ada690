"""Media values a collector may return beside scalars: a histogram and an image, with no sink dependency.

The runner passes them to the sinks untouched. ``JsonlSink`` writes a histogram as ``{"counts", "edges"}`` and
saves an image as a PNG under ``<run>/media/`` (the record holds its relative path); ``WandbSink`` turns them into
``wandb.Histogram`` / ``wandb.Image``; the console skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Histogram:
    """Counts over fixed bins: ``len(edges) == len(counts) + 1``."""

    counts: tuple[float, ...]
    edges: tuple[float, ...]

    @classmethod
    def from_counts(cls, counts: torch.Tensor, low: float, high: float) -> "Histogram":
        """Equal-width bins over [low, high] (``counts`` a (bins,) tensor, e.g. from ``torch.histc``)."""
        edges = np.linspace(low, high, counts.numel() + 1)
        return cls(tuple(float(c) for c in counts.double().cpu().tolist()), tuple(float(e) for e in edges))

    def to_json(self) -> dict:
        return {"counts": list(self.counts), "edges": list(self.edges)}


@dataclass(frozen=True, eq=False)
class Image:
    """An RGB picture, (H, W, 3) uint8."""

    pixels: np.ndarray
    caption: str = ""

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.uint8 or self.pixels.ndim != 3 or self.pixels.shape[-1] != 3:
            raise ValueError(f"Image: expected (H, W, 3) uint8, got {self.pixels.shape} {self.pixels.dtype}")

    def save_png(self, path) -> None:
        from PIL import Image as PILImage

        PILImage.fromarray(self.pixels).save(path)
