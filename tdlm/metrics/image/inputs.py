"""The FSDiT metric registry ``IMAGE``: the inputs a collector can need, and the objects the trainer feeds in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tdlm.metrics import functional as Fm
from tdlm.metrics.common import ENGINE_NEEDS
from tdlm.metrics.core import GradView, Need, Registry  # noqa: F401 (GradView: re-exported)


@dataclass
class FlowBatch:
    """One micro-batch of flow-matching training, as the loss computed it."""

    loss: torch.Tensor  # (B,) per-sample velocity MSE (may carry grad)
    t: torch.Tensor  # (B,) in [0, 1]
    x: torch.Tensor  # (B, C, H, W) clean data in model space (pixels in [-1, 1], or scaled VAE latents)
    noise: torch.Tensor  # (B, C, H, W) ε
    x_t: torch.Tensor  # (B, C, H, W)
    v_pred: torch.Tensor  # (B, C, H, W) predicted velocity, detached
    v_target: torch.Tensor  # (B, C, H, W) x − ε
    cond: torch.Tensor  # (B, cond_dim) pooled support embedding given to the model
    labels: torch.Tensor  # (B,) class of each episode
    drop: torch.Tensor  # (B,) bool, True = trained with the null condition (CFG)
    t_emb: torch.Tensor  # (B, D)
    y_emb: torch.Tensor  # (B, D) after the CFG drop (null vector on dropped rows)
    c: torch.Tensor  # (B, D) the condition every block's adaLN reads
    context_scale: torch.Tensor  # (D,) or () the learnable gate on y_emb


@dataclass
class PerfTimes:
    """Seconds of one iteration's phases (device-synchronised) and SigLIP cache counters of that iteration."""

    data_time: float
    siglip_encode_time: float
    vae_time: float
    train_step_time: float
    total_iter_time: float
    cache_hits: int
    cache_lookups: int
    cache_items: int


@dataclass
class ValResult:
    """Per-episode losses of the fixed held-out sets (this process's share), with the t of each val episode."""

    loss: torch.Tensor  # (N,) live model, eval mode, validation-class episodes
    t: torch.Tensor  # (N,)
    train_classes_loss: torch.Tensor  # (M,) same model and protocol, training-class episodes
    ema_loss: torch.Tensor | None = None  # (N,) the EMA model on the validation episodes
    fid: dict | None = None  # on few-shot FID steps: tdlm.fsdit.fewshot.FewShotFID's result (the same everywhere)

    @property
    def loss_sum(self) -> torch.Tensor:  # what the shared Validation collector adds up
        return self.loss.double().sum()

    @property
    def count(self) -> torch.Tensor:
        return torch.tensor(float(self.loss.numel()), dtype=torch.float64, device=self.loss.device)


@dataclass
class SampleRequest:
    """How to draw the sample grids; the collector runs it on its due steps only."""

    model: torch.nn.Module  # the EMA (or live) model, in eval mode
    cond: torch.Tensor  # (S, cond_dim) pooled embedding of each of S fixed support sets
    support_images: torch.Tensor  # (S, K, 3, H, W) in [-1, 1], shown beside the conditional samples
    shape: tuple[int, int, int]  # (C, H, W) of the model space
    per_set: int
    steps: int
    method: str
    cfg_scale: float
    seed: int
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # model space -> images in [-1, 1] (VAE)


IMAGE = Registry("image", needs={**ENGINE_NEEDS,
    "flow": Need(("batch",), "per-sample loss and t (B,), clean x, noise ε, x_t, predicted and target velocity "
                 "(B, C, H, W) of the micro-batch"),
    "condition": Need(("batch",), "pooled support embedding given to the model (B, cond_dim), class labels and "
                      "the CFG drop mask (B,)"),
    "embeddings": Need(("batch",), "t_emb, y_emb (after the CFG drop) and c (B, D) from the training forward, "
                       "and the context_scale it used"),
    "timing": Need(("perf",), "device-synchronised timers of the iteration and SigLIP cache counters"),
    "probe": Need(("batch", "model"), "one extra no-grad eval-mode forward of the step's noised batch with "
                  "explicit-softmax attention and forward hooks on every block", expensive=True),
    "samples": Need(("sampler",), "sample sets generated from the EMA model: conditional (s = 1), guided "
                    "(s = sample.cfg_scale) and unconditional, same starting noise", expensive=True),
})

ENCODER_PREFIXES = ("y_embedder", "null_y", "context_scale")
"""Trainable parameters on the encoder side of the condition (the frozen SigLIP has none): the support projector,
the CFG null vector and the context_scale gate. Everything else is the DiT."""


def _zeros(*shape):
    return torch.zeros(shape, dtype=torch.float64)


def _std(n, s, ss):
    return Fm.std_from_moments(n, s, ss)
