"""What the FSDiT trainer builds from its config around the loop: the frozen SigLIP encoder and the support
embedder in front of it, the optional VAE, and the fixed sets (held-out validation episodes, sample supports).

Every failure to open a file is a one-line ``ConfigError`` naming the config key to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tdlm.engine.config import ConfigError
from tdlm.fsdit.data import FewShotDataset, fingerprint, load_cifar100_all, split_classes, to_unit_range
from tdlm.fsdit.siglip import OnlineEmbedder, SiglipEncoder, pool_support, precompute_embeddings, tiny_siglip_config


def load_data(cfg) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """Every image of ``data.root`` (uint8 (N, 3, 32, 32)), its labels and the class-disjoint train/val/test split."""
    try:
        images, labels = load_cifar100_all(cfg.data.root)
    except FileNotFoundError:
        raise ConfigError(f"data.root: no CIFAR-100 python dataset at '{cfg.data.root}' (expected "
                          f"cifar-100-python/{{train,test,meta}}; `python -m tdlm.fsdit.data synthetic DIR` "
                          f"writes a generated one)") from None
    return images, labels, split_classes(int(labels.max()) + 1, tuple(cfg.data.class_split), cfg.data.split_seed)


def build_embedder(cfg, images: np.ndarray, labels: np.ndarray, device, main_process_first=None) -> "SupportEmbedder":
    """The frozen encoder of ``siglip`` and the support embedder over ``images`` (computed once and cached on disk;
    ``main_process_first``: the accelerator's context, so that one process encodes and the others read its file)."""
    from contextlib import nullcontext

    encoder = build_encoder(cfg.siglip).to(device)
    with (main_process_first or nullcontext)():
        return SupportEmbedder(encoder, images, fingerprint(images, labels), cfg.siglip, device)


def build_encoder(siglip_cfg) -> SiglipEncoder:
    """The frozen encoder: a local checkpoint (``siglip.path``), or a random tiny one (``siglip.tiny``)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar
    if siglip_cfg.tiny:
        return SiglipEncoder.from_config(tiny_siglip_config(siglip_cfg.tiny_image_size), seed=siglip_cfg.seed)
    try:
        return SiglipEncoder.from_pretrained(siglip_cfg.path, key="siglip.path")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, ValueError) as exc:  # a directory that is not a loadable SigLIP checkpoint
        raise ConfigError(f"siglip.path: cannot load a SigLIP vision model from '{siglip_cfg.path}': "
                          f"{_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SupportEmbedder:
    """Pooled support embedding of each episode from the (B, K) indices of its support images.

    precompute: every image of the dataset is encoded once and the table cached on disk (keyed by encoder and
    dataset content), so a step is a lookup. online: only the images not in an LRU of per-image embeddings go
    through SigLIP. ``hits``/``lookups`` count distinct images per call (the table always hits).
    """

    def __init__(self, encoder: SiglipEncoder, images: np.ndarray, dataset_id: str, siglip_cfg, device):
        self.encoder, self.images, self.device = encoder, images, device
        self.hits = self.lookups = 0
        self.table = self.online = None
        if siglip_cfg.mode == "precompute":
            self.table = precompute_embeddings(encoder, images, siglip_cfg.cache_dir, dataset_id,
                                               siglip_cfg.batch_size)  # (N, D) float32, CPU
        else:
            self.online = OnlineEmbedder(encoder, siglip_cfg.cache_size)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def items(self) -> int:
        return len(self.table) if self.table is not None else len(self.online.cache)

    def __call__(self, support_idx: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 image indices -> (B, D) float32 on the trainer's device."""
        support_idx = support_idx.cpu()
        if self.table is not None:
            distinct = int(torch.unique(support_idx).numel())
            self.hits += distinct
            self.lookups += distinct
            return pool_support(self.table[support_idx]).to(self.device)
        cache = self.online.cache
        before = (cache.hits, cache.lookups)
        pooled = self.online.embed_support(support_idx, self._load)
        self.hits += cache.hits - before[0]
        self.lookups += cache.lookups - before[1]
        return pooled.to(self.device)

    def _load(self, keys: list) -> torch.Tensor:
        return to_unit_range(self.images[np.asarray(keys)])


class VaeCodec:
    """Images in [-1, 1] <-> scaled latents through a local diffusers ``AutoencoderKL`` (``model.use_vae``).

    Encoding takes the mean of the latent distribution (deterministic), times ``model.vae_scale``.
    """

    def __init__(self, path: str | None, scale: float, device):
        if not path or not (Path(path) / "config.json").is_file():
            raise ConfigError(f"model.use_vae: true needs model.vae_path, a local diffusers AutoencoderKL directory "
                              f"(config.json + weights; nothing is downloaded), got {path!r}")
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ConfigError("model.use_vae: needs the diffusers package, which is not installed "
                              "(pip install diffusers); or set model.use_vae=false to train in pixel space") from None
        try:
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.vae_path: cannot load an AutoencoderKL from '{path}': {_first_line(exc)}") from None
        self.vae = vae.eval().requires_grad_(False).to(device)
        self.scale = scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample.clamp(-1, 1)


@dataclass
class FixedSet:
    """Fixed held-out episodes: the data x in model space, pooled support embedding, t, noise and class."""

    x: torch.Tensor  # (n, C, H, W)
    cond: torch.Tensor  # (n, D)
    t: torch.Tensor  # (n,) stratified over [0, 1)
    noise: torch.Tensor  # (n, C, H, W)
    labels: torch.Tensor  # (n,)


def fixed_set(dataset: FewShotDataset, n: int, embed, encode, seed: int) -> FixedSet:
    """``n`` episodes of ``dataset`` drawn once with ``seed`` (without replacement; all of them if fewer), each
    with its fixed support set (the dataset's epoch-0 draw), noise and t. t is stratified, t_i = (i + u_i)/n, so
    with n a multiple of 10 every tenth of [0, 1) holds the same number of episodes."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    items = [dataset[i] for i in idx]
    targets = torch.stack([it[0] for it in items])  # (n, 3, 32, 32) in [-1, 1]
    support = torch.stack([it[1] for it in items])  # (n, K) indices
    x = encode(targets).cpu()
    n = len(idx)
    t = (torch.arange(n, dtype=torch.float32) + torch.rand(n, generator=g)) / n
    return FixedSet(x, embed(support).cpu(), t, torch.randn(x.shape, generator=g),
                    torch.tensor([it[2] for it in items]))


def sample_supports(dataset: FewShotDataset, num_sets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The support images (S, K, 3, 32, 32) and indices (S, K) of the first episode of each of the first
    ``num_sets`` classes of ``dataset`` (validation classes: the model never trained on them)."""
    classes = sorted(dataset.by_class)[:num_sets]
    first = {int(dataset.labels[dataset.index[i]]): i for i in range(len(dataset) - 1, -1, -1)}
    idx = torch.stack([torch.as_tensor(dataset.support_indices(first[c])) for c in classes])  # (S, K)
    return to_unit_range(dataset.images[idx.numpy()]), idx
