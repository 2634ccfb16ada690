"""Frozen SigLIP image encoder for FSDiT's support-set condition, loaded offline, plus the two embedding caches:
a precompute-once file for a whole dataset and an in-memory LRU for online (e.g. augmented) supports.

The condition of a target is mean_k SigLIP(support_k): the MAP-head ``pooler_output`` of each support image
(big_vision ``pool_type='map'``, what the original code uses), averaged over the set. Because the mean is taken
after the encoder, per-image embeddings can be cached and pooled later with no loss.

Weights come only from a local directory written by ``save_pretrained`` (``config.json`` + ``model.safetensors``;
a full ``SiglipModel`` checkpoint such as google/siglip-base-patch16-224 also loads, its text tower is ignored).
Nothing is downloaded: ``local_files_only=True``. Tests and the demo build a tiny random encoder from a
``SiglipVisionConfig`` instead.

Preprocessing: SigLIP's processor resizes bicubically to ``image_size`` and normalises with mean = std = 0.5, i.e.
maps [0, 1] to [-1, 1]. Our images are already in [-1, 1], so only the resize remains (torch bicubic, a = -0.75,
versus PIL's a = -0.5: a small, fixed difference), followed by a clamp of the bicubic overshoot.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

# ----------------------------------------------------------------------------------------------------------------
# Building and loading


def siglip_base_config() -> SiglipVisionConfig:
    """SigLIP ViT-B/16 at 224 px with every hyper-parameter spelled out: old transformers versions defaulted to
    patch 32 and quick_gelu, so relying on defaults can silently build a different network."""
    return SiglipVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
        vision_use_head=True,
    )  # fmt: skip


def tiny_siglip_config(image_size: int = 16) -> SiglipVisionConfig:
    """A 2-layer, 32-wide encoder (after HF's SiglipVisionModelTester) for tests and the CPU demo."""
    return SiglipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_channels=3,
        image_size=image_size, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        attention_dropout=0.0, vision_use_head=True,
    )  # fmt: skip


def load_siglip(path: str | Path | None, key: str = "fsdit.siglip.path") -> SiglipVisionModel:
    """Load a SigLIP vision tower from a local directory, offline. A missing path raises a one-line error that
    names the config ``key`` to set."""
    if not path or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}: no SigLIP checkpoint at '{path}' (need a local directory with config.json and model weights "
            f"from save_pretrained; nothing is downloaded)"
        )
    return SiglipVisionModel.from_pretrained(str(path), local_files_only=True)


def encoder_fingerprint(model: nn.Module) -> str:
    """16 hex digits identifying an encoder by its config and weights (about 1 s for ViT-B), for cache keys."""
    h = hashlib.sha1()
    config = getattr(model, "config", None)
    if config is not None:
        d = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class SiglipEncoder(nn.Module):
    """Frozen SigLIP vision tower: images in [-1, 1] (N, 3, H, W) -> pooled embeddings (N, D) float32."""

    def __init__(self, model: SiglipVisionModel):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim: int = model.config.hidden_size
        self.image_size: int = model.config.image_size
        self._id: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path | None, key: str = "fsdit.siglip.path") -> "SiglipEncoder":
        return cls(load_siglip(path, key))

    @classmethod
    def from_config(cls, config: SiglipVisionConfig, seed: int = 0) -> "SiglipEncoder":
        """Random weights from ``config`` (tests, demo); seeded so that its embeddings and id are reproducible."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(SiglipVisionModel(config))

    def train(self, mode: bool = True) -> "SiglipEncoder":
        return super().train(False)  # frozen: stay in eval mode even inside a module that calls .train()

    @property
    def encoder_id(self) -> str:
        if self._id is None:
            self._id = encoder_fingerprint(self.model)
        return self._id

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (N, 3, h, w) -> [-1, 1] (N, 3, S, S), S = the encoder's image_size (bicubic)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic")
        return images.clamp(-1.0, 1.0)

    @torch.no_grad()  # not inference_mode: its tensors cannot enter the trainable projector's autograd graph
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Per-image pooled embeddings (N, D) float32 on the encoder's device, without grad."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = []
        for chunk in images.split(batch_size):
            pixels = self.preprocess(chunk.to(device)).to(dtype)
            result = self.model(pixel_values=pixels)
            pooled = result.pooler_output
            if pooled is None:  # vision_use_head=False: no MAP head, fall back to the token mean
                pooled = result.last_hidden_state.mean(dim=1)
            out.append(pooled.float())
        return torch.cat(out)

    def encode_support(self, support: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) support sets -> (B, D): the mean of the K per-image embeddings."""
        B, K = support.shape[:2]
        return pool_support(self.encode(support.flatten(0, 1)).view(B, K, -1))


def pool_support(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, K, D) -> (B, D): mean over the support set (the set is unordered, so any symmetric pooling would do)."""
    return embeddings.mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Precompute once: every image of a dataset, one file keyed by (encoder, dataset)


def precompute_embeddings(
    encoder: SiglipEncoder,
    images: np.ndarray | torch.Tensor,
    cache_dir: str | Path,
    dataset_id: str,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embeddings (N, D) of all ``images`` (uint8 (N, 3, H, W)), computed once and cached on disk.

    The file ``siglip-<encoder_id>-<dataset_id>.pt`` stores the tensor with both ids and N; a file whose ids or N
    do not match is recomputed. CIFAR-100 (60k images) at D = 768 is 184 MB in float32 (92 MB in bfloat16).
    Use ``tdlm.fsdit.data.fingerprint`` for ``dataset_id``.
    """
    path = Path(cache_dir) / f"siglip-{encoder.encoder_id}-{dataset_id}.pt"
    n = len(images)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if (blob.get("encoder_id"), blob.get("dataset_id"), blob.get("n")) == (encoder.encoder_id, dataset_id, n):
            return blob["embeddings"]
    out = []
    for start in range(0, n, batch_size):
        chunk = torch.as_tensor(np.asarray(images[start : start + batch_size])).float().div(127.5).sub(1.0)
        out.append(encoder.encode(chunk, batch_size).to("cpu", dtype))
    embeddings = torch.cat(out)  # (N, D)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"embeddings": embeddings, "encoder_id": encoder.encoder_id, "dataset_id": dataset_id, "n": n}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a truncated cache behind
    return embeddings


# ----------------------------------------------------------------------------------------------------------------
# Online: an LRU of per-image embeddings


class LRUCache:
    """Least-recently-used map with a capacity and hit statistics (``functools.lru_cache`` memoises a function by
    its arguments, which cannot be tensors here and gives no way to insert a batch computed elsewhere)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"fsdit.siglip.cache_size must be >= 1, got {capacity}")
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self.hits = self.lookups = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:  # no statistics, no reordering
        return key in self._data

    def get(self, key: Hashable):
        """The value (now most recently used) or None; counts one lookup."""
        self.lookups += 1
        if key not in self._data:
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: Hashable, value) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)  # evict the least recently used

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def stats(self) -> dict[str, float]:
        """For perf/siglip_cache_hit_rate and perf/siglip_cache_items."""
        return {"hit_rate": self.hit_rate, "items": len(self._data), "hits": self.hits, "lookups": self.lookups}

    def reset_stats(self) -> None:
        self.hits = self.lookups = 0


class OnlineEmbedder:
    """Per-image embeddings through an LRU: only the misses of a call are loaded and encoded, in one batch.

    Keys repeated within one call count as one lookup (the original code's "hits / unique paths in batch").
    """

    def __init__(self, encoder: SiglipEncoder, capacity: int = 1024):
        self.encoder, self.cache = encoder, LRUCache(capacity)

    def embed(self, keys: Sequence[Hashable], load: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """(N, D) embeddings for ``keys``; ``load(missing_keys)`` returns their images, (M, 3, H, W) in [-1, 1]."""
        unique = list(dict.fromkeys(keys))
        found = {k: v for k in unique if (v := self.cache.get(k)) is not None}
        missing = [k for k in unique if k not in found]
        if missing:
            fresh = self.encoder.encode(load(missing))  # (M, D)
            for k, v in zip(missing, fresh):
                self.cache.put(k, v)
                found[k] = v
        return torch.stack([found[k] for k in keys])

    def embed_support(self, support_keys: torch.Tensor, load: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """(B, K) integer keys (e.g. ``FewShotDataset(return_indices=True)``) -> pooled (B, D)."""
        B, K = support_keys.shape
        flat = self.embed(support_keys.flatten().tolist(), load)  # (B*K, D)
        return pool_support(flat.view(B, K, -1))
