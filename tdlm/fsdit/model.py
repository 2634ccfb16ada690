"""FSDiT backbone: a DiT with adaLN-Zero blocks that predicts a flow-matching velocity from a noisy image,
a time t in [0, 1] and a pooled support-set embedding (few-shot conditioning).

Reads top to bottom like nanoGPT's ``model.py``: helpers (modulate, sincos pos-embed), embedders, attention, MLP,
block, final layer, ``FSDiTConfig``, ``FSDiT``. The block is the DiT one (Peebles & Xie, arXiv 2212.09748;
facebookresearch/DiT ``models.py``) written without timm. Differences from DiT, each on purpose:

- t in [0, 1] is multiplied by ``t_scale`` = 1000 before the 256-d sinusoid; raw t with max_period 10000 gives
  nearly constant embeddings (SiT #24, REPA #40), and the original code's x10000 drives the arguments to 1e4 rad.
- The condition is a pooled SigLIP embedding of a support set, projected by an MLP (the original code's
  ``SupportProjector``: cond_dim -> 2D -> GELU -> D), not a class label. c = t_emb + context_scale * y_emb, with a
  learnable ``context_scale`` (per channel by default, the vfsddpm_jax ``context_scale``; or one scalar, the
  original code's ``cond_scale``). ``cond_layernorm=True`` applies the original code's LN (no affine) to t_emb
  and y_emb first.
- Classifier-free guidance replaces y_emb by a learned null vector, per sample, where ``drop`` is True.
- Attention uses ``F.scaled_dot_product_attention``; a diagnostic path computes the softmax explicitly (in fp32)
  and hands the probabilities back, since SDPA never materialises them (pytorch #98505).
- Each block's forward returns the residual stream as a plain tensor, so ``register_forward_hook`` on
  ``model.blocks[k]`` sees the activations after block k.
- The fixed 2-D sincos position embedding is a buffer, not a frozen Parameter, so EMA and optimizers never see it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, N, D) scaled and shifted by per-sample (B, D) vectors, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE/DiT layout): (grid_size**2, dim), row-major over (h, w).

    The first half of the channels encodes the column coordinate, the second half the row; each half is
    [sin, cos] of the coordinate times frequencies 1/10000^(i/n). DiT asserts dim % 4 == 0, but our D=450 gives
    halves of 225 channels, so a half of odd size d uses n = ceil(d/2) frequencies and drops the last cosine.
    Computed in float64 and returned as float32.
    """
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # each (G, G); w first, as DiT, so tables match for dim % 4 == 0

    def embed_1d(d: int, pos: np.ndarray) -> np.ndarray:
        n = (d + 1) // 2
        omega = 1.0 / 10000 ** (np.arange(n, dtype=np.float64) / n)  # (n,)
        out = np.outer(pos.reshape(-1), omega)  # (G*G, n)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)[:, :d]  # (G*G, d)

    table = np.concatenate([embed_1d(dim // 2, grid_w), embed_1d(dim - dim // 2, grid_h)], axis=1)  # (G*G, dim)
    return torch.from_numpy(table).float()


class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] (shape (B,)) as MLP(sinusoid(t_scale * t)) -> (B, D)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, t_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.t_scale, self.max_period = freq_dim, t_scale, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (self.t_scale * t.float())[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
        if self.freq_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention (qkv with bias, as timm's Attention). ``probs_out`` is the diagnostic path."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, probs_out: list | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        if probs_out is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Explicit softmax in fp32 so that entropies are not computed from bf16 probabilities.
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, N, N)
            probs = scores.softmax(dim=-1)
            probs_out.append(probs)
            out = (probs @ v.float()).to(v.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, as in DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: c -> 6 vectors (shift, scale, gate for attention and for the MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, probs_out: list | None = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (B, D)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), probs_out)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x  # (B, N, D): a plain tensor, so forward hooks see the residual stream after this block


class FinalLayer(nn.Module):
    """LN (no affine) modulated by c (shift, scale), then a Linear to p*p*C values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class FSDiTConfig:
    """Backbone hyper-parameters. Defaults are the CIFAR-100 depth-6 config (few-shot-diffusion-models-jax)."""

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 450
    depth: int = 6
    num_heads: int = 9
    """450 / 9 = head_dim 50."""
    mlp_ratio: float = 3.0
    cond_dim: int = 768
    """Size of the pooled support embedding: the SigLIP encoder's hidden size (768 for ViT-B/16)."""
    projector: Literal["mlp", "linear"] = "mlp"
    """mlp = the original code's SupportProjector, cond_dim -> 2D -> GELU -> D; linear = one Linear cond_dim -> D."""
    context_scale: Literal["channel", "scalar"] = "channel"
    """Learnable gate on y_emb: one value per channel (vfsddpm_jax) or one scalar (the original code's cond_scale)."""
    context_scale_init: float = 1.0
    """The original code initialises its scalar cond_scale to 2.0 together with cond_layernorm=True."""
    cond_layernorm: bool = False
    """True: c = LN(t_emb) + context_scale * LN(y_emb) (LN without affine), the original code's magnitude balancing."""
    class_dropout: float = 0.1
    """Per-sample probability, in training mode, of replacing y_emb by the learned null vector (CFG)."""
    freq_dim: int = 256
    t_scale: float = 1000.0
    """t in [0, 1] is multiplied by this before the sinusoid (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"fsdit.model.image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"fsdit.model.hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"fsdit.model.class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.projector not in ("mlp", "linear"):
            raise ValueError(f"fsdit.model.projector must be 'mlp' or 'linear', got {self.projector!r}")
        if self.context_scale not in ("channel", "scalar"):
            raise ValueError(f"fsdit.model.context_scale must be 'channel' or 'scalar', got {self.context_scale!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class FSDiT(nn.Module):
    """Velocity network v(x_t, t, support) for flow matching; x (B, C, H, W), t (B,), cond (B, cond_dim)."""

    def __init__(self, config: FSDiTConfig):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.image_size // p).unsqueeze(0), persistent=False)
        self.t_embedder = TimestepEmbedder(D, cfg.freq_dim, cfg.t_scale)
        if cfg.projector == "mlp":
            self.y_embedder = nn.Sequential(nn.Linear(cfg.cond_dim, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        else:
            self.y_embedder = nn.Linear(cfg.cond_dim, D)
        self.null_y = nn.Parameter(torch.zeros(D))
        scale_shape = (D,) if cfg.context_scale == "channel" else ()
        self.context_scale = nn.Parameter(torch.full(scale_shape, cfg.context_scale_init))
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears, zero biases, N(0, 0.02) t-MLP, then zero adaLN and final Linear (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data  # the patch embed is a Linear over flattened patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_y, std=0.02)
        # Zero adaLN: every block starts as the identity; zero final layer: the initial velocity is exactly 0.
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        C, p = self.config.in_channels, self.config.patch_size
        g = self.config.image_size // p
        x = x.view(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def condition(
        self, t: torch.Tensor, cond: torch.Tensor | None, drop: torch.Tensor | None = None, aux: dict | None = None
    ) -> torch.Tensor:
        """c = t_emb + context_scale * y_emb, (B, D). cond None means fully unconditional (null vector).

        ``aux``, when given, receives the detached ``t_emb``, ``y_emb`` (after the CFG drop, before any LN) and
        ``c`` (B, D) for the debug metrics; no extra computation.
        """
        t_emb = self.t_embedder(t)  # (B, D)
        B = t_emb.shape[0]
        if cond is None:
            y_emb = self.null_y.expand(B, -1)
        else:
            y_emb = self.y_embedder(cond.to(t_emb.dtype))  # (B, D)
            if drop is None and self.training and self.config.class_dropout > 0:
                drop = torch.rand(B, device=t_emb.device) < self.config.class_dropout
            if drop is not None:
                y_emb = torch.where(drop.view(B, 1), self.null_y.to(y_emb.dtype), y_emb)
        if aux is not None:
            aux.update(t_emb=t_emb.detach(), y_emb=y_emb.detach())
        if self.config.cond_layernorm:
            t_emb, y_emb = F.layer_norm(t_emb, (t_emb.shape[-1],)), F.layer_norm(y_emb, (y_emb.shape[-1],))
        c = t_emb + self.context_scale * y_emb
        if aux is not None:
            aux["c"] = c.detach()
        return c

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
        return_attn: bool = False,
        aux: dict | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Predict the velocity (B, C, H, W).

        Args:
            x: noisy images x_t, (B, C, H, W).
            t: times in [0, 1], (B,) or a scalar (broadcast to the batch).
            cond: pooled support embeddings (B, cond_dim); None = unconditional.
            drop: bool (B,), True = use the null vector for that sample. None: in training mode each sample is
                dropped with probability ``config.class_dropout``; in eval mode nothing is dropped.
            return_attn: also return the attention probabilities, one (B, H, N, N) fp32 tensor per block
                (explicit softmax; slower, for diagnostics under ``torch.no_grad()``).
            aux: optional dict that receives the detached t_emb, y_emb and c of ``condition`` (debug metrics).
        """
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        t = t.expand(B) if t.dim() == 0 else t
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.condition(t, cond, drop, aux)  # (B, D)
        probs: list[torch.Tensor] | None = [] if return_attn else None
        for block in self.blocks:
            h = block(h, c, probs)
        out = self.unpatchify(self.final_layer(h, c))  # (B, C, H, W)
        return (out, probs) if return_attn else out


    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """``config.json`` (the FSDiTConfig fields) and ``model.safetensors``, the layout checkpoints export."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1))
        state = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "FSDiT":
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(FSDiTConfig(**json.loads((path / "config.json").read_text())))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Normalised attention entropy per head, H / ln(N_keys) averaged over batch and queries: (B, H, N, N) -> (H,).

    1 means uniform attention, 0 means each query attends to one key.
    """
    h = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (B, H, N)
    return h.mean(dim=(0, 2)) / math.log(probs.shape[-1])


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as the fixed pos-embed are not parameters and are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
