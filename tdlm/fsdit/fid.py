"""Frechet distance and KID for FSDiT samples: our own float64 Frechet distance behind a pluggable feature
extractor, a streaming (mergeable) mean/covariance accumulator and cached reference statistics. The few-shot
protocol around it is ``tdlm.fsdit.fewshot``; the command lines are ``eval/fsdit_sample.py`` and ``eval/fid.py``.

FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), where tr((S1 S2)^(1/2)) is the sum of the square
roots of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2; numerically the square roots are taken in
complex and the real part kept), all in float64. This is torchmetrics' and torch-fidelity's form; it avoids
``scipy.linalg.sqrtm(..., disp=False)``, whose ``disp`` argument SciPy 1.18 removed (pytorch-fid, clean-fid break).

The distance is biased upwards roughly like 1/N and the covariance of N < d samples is rank-deficient (600
samples vs 2048 Inception features): compare values only at the same N, reference set and extractor, which is why
every result carries ``n_gen``, ``n_ref`` and ``extractor``. KID (unbiased MMD^2 with the cubic polynomial
kernel, averaged over random subsets) is reported beside it because it has no such bias.

Extractors take images in [-1, 1], (N, 3, H, W); only Inception features give an *FID* (``metric_name``):
- ``inception``: Inception-v3 pool3 from a local TorchScript file (``--inception-path`` / ``eval.inception_path``;
  NVIDIA's ``inception-2015-12-05.pt`` as used by stylegan2-ada and clean-fid); nothing is ever downloaded.
- ``siglip``: the pooled SigLIP vision tower FSDiT conditions on (a second, offline feature space); a Frechet
  distance in SigLIP features, not comparable with any FID.
- ``randconv``: a fixed random CNN, for tests only; its numbers are not FIDs and not comparable with anything.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Distances


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, clipped at 0 (round-off can go below)."""
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    eigvals = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = np.sqrt(eigvals.astype(np.complex128)).real.sum()  # tiny negative eigenvalues contribute 0
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean, 0.0))


def kernel_inception_distance(
    feats1: np.ndarray | torch.Tensor,
    feats2: np.ndarray | torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over ``num_subsets`` random
    subsets of ``min(subset_size, N1, N2)`` rows of each set, drawn without replacement. Returns (mean, std).

    As in torchmetrics and clean-fid, KID of a set with itself is not exactly 0 but about
    2 (mean off-diagonal k - mean diagonal k) / N: an element never meets itself within one subset, but can
    across the two. It vanishes like 1/N; two independent samples of one distribution give about 0.
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    d, m = f1.shape[1], min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"kernel_inception_distance: need at least 2 samples per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        # Unbiased: the diagonals k(x_i, x_i) are left out of the within-set means.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------------------------
# Streaming statistics


class GaussianStats:
    """Running float64 sum, sum of outer products and count of feature vectors: mean and covariance at any time,
    mergeable across batches, processes or files (add the three states; never average means)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None  # (d,)
        self.outer: torch.Tensor | None = None  # (d, d)

    def update(self, feats: torch.Tensor | np.ndarray) -> "GaussianStats":
        f = torch.as_tensor(feats).detach().to(torch.float64)  # (N, d)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.n += f.shape[0]
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        if other.sum is not None:
            if self.sum is None:
                self.sum, self.outer = other.sum.clone(), other.outer.clone()
            else:
                self.sum += other.sum.to(self.sum.device)
                self.outer += other.outer.to(self.outer.device)
            self.n += other.n
        return self

    def mean(self) -> np.ndarray:
        return (self.sum / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by N - 1, as np.cov)."""
        if self.n < 2:
            raise ValueError(f"GaussianStats.cov: need at least 2 samples, got {self.n}")
        mu = self.sum / self.n
        return ((self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(Protocol):
    """Images in [-1, 1], float (N, 3, H, W) -> features (N, d). ``id`` names the network and its weights: cached
    reference statistics are only reused for the same id."""

    id: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class RandomConvExtractor(nn.Module):
    """NOT Inception. A fixed, seeded random 3-layer CNN with mean pooling, for tests and the CPU demo only: it
    makes the FID/KID machinery runnable offline; its distances are not comparable with published FIDs."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        self.id, self.dim = f"randconv-v1-d{dim}-s{seed}-NOT-INCEPTION", dim
        self.convs = nn.ModuleList([nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, dim, 3, 1, 1)])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:  # He-normal weights so activations keep their scale through the ReLUs
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))  # (N, dim)


class InceptionExtractor:
    """Inception-v3 pool3 features (2048-d) from a local TorchScript file with NVIDIA's calling convention:
    ``model(x, return_features=True)``, x float in [0, 255], any size (the network resizes to 299 itself)."""

    def __init__(self, weights_path: str | Path | None, key: str = "fid.inception_path", device: str = "cpu"):
        if not weights_path or not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"{key}: no Inception TorchScript file at '{weights_path}' (e.g. inception-2015-12-05.pt from "
                f"stylegan2-ada-pytorch; weights are never downloaded, copy the file and pass its path)"
            )
        h = hashlib.sha1()
        with open(weights_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.id = f"inception-torchscript-{h.hexdigest()[:12]}"
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript, but the reference Inception weights only exist in that format.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            self.model = torch.jit.load(str(weights_path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x255 = (images.to(self.device).float() + 1.0) * 127.5
        return self.model(x255, return_features=True).flatten(1)


class SiglipExtractor:
    """Pooled SigLIP features (the MAP head's ``pooler_output``, what FSDiT's condition averages) of each image:
    a Frechet distance in this space says how far the samples are in the encoder's own view. NOT Inception."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.id = f"siglip-{encoder.encoder_id}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(images)


EXTRACTORS = ("inception", "siglip", "randconv")
METRIC_NAMES = {"inception": "FID", "siglip": "Fréchet distance (SigLIP features)",
                "randconv": "Fréchet distance (random-CNN features, not an FID)"}


def metric_name(extractor_id: str) -> str:
    """What a result may be called in a report: only Inception features give an FID."""
    kind = extractor_id.split("-", 1)[0]  # ids start with the extractor's name
    return METRIC_NAMES.get(kind, f"Fréchet distance ({kind} features)")


def make_extractor(name: str, inception_path: str | None = None, device: str = "cpu", siglip_encoder=None,
                   key: str = "fid.inception_path") -> FeatureExtractor:
    """``siglip`` needs the encoder (``tdlm.fsdit.pipeline.build_encoder``); ``key`` names the setting that gives
    ``inception_path`` in the error when the file is missing."""
    if name == "inception":
        return InceptionExtractor(inception_path, key=key, device=device)
    if name == "siglip":
        if siglip_encoder is None:
            raise ValueError("fid: the siglip extractor needs the SigLIP encoder of the run")
        return SiglipExtractor(siglip_encoder.to(device))
    if name == "randconv":
        return RandomConvExtractor().to(device)
    raise ValueError(f"fid.extractor must be one of {', '.join(EXTRACTORS)}, got {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction and cached reference statistics


def quantize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images pass through; float images in [-1, 1] are rounded to uint8 the way a saved PNG would be, so
    generated and real images reach the extractor through the same pipeline. Returns uint8 (N, 3, H, W)."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def iter_features(
    extractor: FeatureExtractor, images: np.ndarray | torch.Tensor, batch_size: int = 256
) -> Iterable[torch.Tensor]:
    """Features of ``images`` (uint8, or float in [-1, 1]; (N, 3, H, W)) one batch at a time, as float64 on CPU."""
    for start in range(0, len(images), batch_size):
        batch = quantize(images[start : start + batch_size]).float().div(127.5).sub(1.0)
        yield extractor(batch).detach().to("cpu", torch.float64)


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor_id: str
    ref_id: str
    features: np.ndarray
    """A seeded random subset (at most ``kid_features`` rows) of the reference features, for KID."""


def reference_stats(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    ref_id: str,
    cache_path: str | Path | None = None,
    batch_size: int = 256,
    kid_features: int = 10_000,
) -> ReferenceStats:
    """Mean, covariance and a KID subset of the reference set's features, cached in an ``.npz``.

    The cache is reused only if its extractor id, reference id and N all match; otherwise it is recomputed and
    overwritten. ``ref_id`` should identify the images (e.g. ``tdlm.fsdit.data.fingerprint`` plus the class list).
    """
    n = len(images)
    if cache_path is not None and Path(cache_path).is_file():
        with np.load(cache_path, allow_pickle=False) as z:
            if (str(z["extractor_id"]), str(z["ref_id"]), int(z["n"])) == (extractor.id, ref_id, n):
                return ReferenceStats(z["mu"], z["sigma"], n, extractor.id, ref_id, z["features"])
    keep = np.sort(np.random.default_rng(0).choice(n, min(n, kid_features), replace=False))
    stats, kept, start = GaussianStats(), [], 0
    for feats in iter_features(extractor, images, batch_size):
        stats.update(feats)
        rows = keep[(keep >= start) & (keep < start + len(feats))] - start
        kept.append(feats[rows].numpy())
        start += len(feats)
    ref = ReferenceStats(stats.mean(), stats.cov(), n, extractor.id, ref_id, np.concatenate(kept).astype(np.float32))
    if cache_path is not None:
        path = Path(cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, mu=ref.mu, sigma=ref.sigma, n=n, extractor_id=extractor.id, ref_id=ref_id, features=ref.features)
        os.replace(tmp, path)  # atomic: concurrent evaluators never read a half-written file
    return ref


def fid_kid(
    extractor: FeatureExtractor,
    generated: np.ndarray | torch.Tensor,
    ref: ReferenceStats,
    batch_size: int = 256,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict:
    """FID and KID of ``generated`` images against ``ref``, with the sample sizes and the extractor id."""
    if ref.extractor_id != extractor.id:
        raise ValueError(f"fid: reference stats were computed with {ref.extractor_id}, not {extractor.id}")
    stats, feats = GaussianStats(), []
    for f in iter_features(extractor, generated, batch_size):
        stats.update(f)
        feats.append(f)
    kid_mean, kid_std = kernel_inception_distance(
        torch.cat(feats), ref.features, num_subsets=kid_subsets, subset_size=kid_subset_size
    )
    return {
        "fid": frechet_distance(stats.mean(), stats.cov(), ref.mu, ref.sigma),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "n_gen": stats.n,
        "n_ref": ref.n,
        "extractor": extractor.id,
        "metric": metric_name(extractor.id),
        "ref_id": ref.ref_id,
    }


