"""The tdlm backbone: a pre-norm transformer (RoPE, SwiGLU, RMSNorm, SDPA) as a ``transformers`` model.

Bidirectional by default (the masked-diffusion denoiser, no time conditioning, as MDLM/LLaDA/SMDM); with
``causal=True`` the same weights shape trains autoregressively for the AR baseline. Being a ``PreTrainedModel``
with its own ``TdlmConfig`` (which also records the noise schedule it was trained under), checkpoints load with
``TdlmForMaskedOrCausalLM.from_pretrained(dir)``: the class name says both uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel


class TdlmConfig(PretrainedConfig):
    model_type = "tdlm"

    def __init__(self, vocab_size: int = 4096, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 intermediate_size: int = 0, max_seq_len: int = 512, rope_theta: float = 10000.0,
                 dropout: float = 0.0, tie_embeddings: bool = True, causal: bool = False,
                 mask_token_id: int = 0, pad_token_id: int = 1, schedule: str = "linear", t_min: float = 1e-3,
                 loglinear_eps: float = 1e-3, block_size: int = 0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        # SwiGLU keeps the FFN parameter count of a 4x GELU MLP with 8/3 x hidden (LLaMA), rounded for matmuls.
        self.intermediate_size = intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64)
        self.max_seq_len = max_seq_len
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.tie_embeddings = tie_embeddings
        self.causal = causal
        self.mask_token_id = mask_token_id
        # The noise schedule the model was trained under (diffusion.*): evaluation and sampling of a checkpoint
        # read it from here, so a checkpoint scored outside its run directory still uses its own schedule.
        self.schedule = schedule
        self.t_min = t_min
        self.loglinear_eps = loglinear_eps
        self.block_size = block_size  # block diffusion's L' (0 = plain MDLM): the block NELBO and block sampling
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ----------------------------------------------------------------------------------------------------------
# CPU GEMM. PyTorch sends fp32 matmuls to MKL, which on non-Intel x86 CPUs (this project's AMD EPYC dev
# machine) takes a path about half as fast as oneDNN's AVX-512 kernels: 2048^2 ran at ~200 vs ~450 GFLOP/s
# on 2 threads (eval/bench_train.py prints both). So on CPU, in fp32, the linear layers call oneDNN's matmul
# (forward and both backward products). Same math, a different summation order: results agree to float
# tolerance. Elsewhere (CUDA, autocast, other dtypes) F.linear runs unchanged.

_ONEDNN_GEMM = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("tdlm::onednn_mm", mutates_args=())
def onednn_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w.T for w (N, K) by oneDNN; either operand may be a transposed view. Differentiable.

    A custom op, so ``torch.compile`` keeps it as one opaque call (inductor cannot lower the raw oneDNN op).
    """
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@onednn_mm.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def _onednn_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _onednn_mm_backward(ctx, grad):
    x, w = ctx.saved_tensors
    grad_x = onednn_mm(grad, w.t()) if ctx.needs_input_grad[0] else None  # (M, N) @ (N, K)
    grad_w = onednn_mm(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # (N, M) @ (M, K)
    return grad_x, grad_w


onednn_mm.register_autograd(_onednn_mm_backward, setup_context=_onednn_mm_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           cpu_gemm: str = "onednn") -> torch.Tensor:
    """F.linear, computed by oneDNN for fp32 on CPU when ``cpu_gemm == "onednn"`` (see above)."""
    if (cpu_gemm == "onednn" and _ONEDNN_GEMM and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and x.numel()):
        y = onednn_mm(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose CPU fp32 product goes through ``linear``."""

    cpu_gemm = "onednn"  # "aten" = plain F.linear; set per model with TdlmForMaskedOrCausalLM.set_cpu_gemm

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.cpu_gemm)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) (the GPT-NeoX/LLaMA-HF layout). x: (B, H, L, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys (after RoPE) and values of a finished prefix, per layer, for block-diffusion sampling: each finished
    clean block is appended once (its queries attend the cache and the block itself, BD3-LM's clean-stream mask),
    and every denoising step of the next block attends cache + noisy block without recomputing the prefix.

    ``recording``: the next forward appends its keys and values. ``rows``: the batch rows a forward computes
    (index into the cache's batch; None = all), so a sampler may recompute a subset of its rows."""

    def __init__(self):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.recording = False
        self.rows: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a layer's queries attend: the cached prefix (of ``rows``) then the new ones."""
        if layer < len(self.layers):
            pk, pv = self.layers[layer]
            if self.rows is not None:
                pk, pv = pk.index_select(0, self.rows), pv.index_select(0, self.rows)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        if self.recording:
            if self.rows is not None:
                raise ValueError("KVCache: append a block for every row (rows=None)")
            if layer < len(self.layers):
                self.layers[layer] = (k, v)
            else:
                self.layers.append((k, v))
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: TdlmConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)  # fused: one matmul
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout
        self.causal = cfg.causal

    def forward(self, x, cos, sin, attn_mask=None, return_probs: bool = False, kv_cache: KVCache | None = None,
                layer: int = 0):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # queries attend the cached prefix and every new position (no mask)
            k, v = kv_cache.extend(layer, k, v)
        probs = None
        if return_probs:  # explicit softmax for diagnostics; SDPA cannot return its weights
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if self.causal:
                scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=x.device).tril(), -math.inf)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, -math.inf)
            probs = scores.float().softmax(-1).to(q.dtype)
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=self.causal and attn_mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, L, D)), probs


class SwiGLU(nn.Module):
    def __init__(self, cfg: TdlmConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TdlmConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, return_probs=False, kv_cache=None, layer=0):
        a, probs = self.attn(self.attn_norm(x), cos, sin, attn_mask, return_probs, kv_cache, layer)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.mlp_norm(x)))
        return x, probs


class TdlmForMaskedOrCausalLM(PreTrainedModel):
    """Token ids -> logits over the vocabulary. ``attention_mask`` (B, L) marks valid (non-pad) keys."""

    config_class = TdlmConfig
    base_model_prefix = "tdlm"
    _supports_sdpa = True
    supports_kv_cache = True  # ``KVCache``: block-diffusion sampling attends cached keys of finished blocks
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: TdlmConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rope: tuple | None = None  # computed on first use: from_pretrained leaves non-persistent buffers empty
        self.post_init()

    def _init_weights(self, module):
        # GPT-2 / nanoGPT init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "_is_residual", False):
                std /= math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def post_init(self):
        for block in self.blocks:
            block.attn.proj._is_residual = True
            block.mlp.down._is_residual = True
        super().post_init()

    def set_cpu_gemm(self, backend: str) -> "TdlmForMaskedOrCausalLM":
        """"onednn" (default) or "aten": which GEMM the linear layers use for fp32 on CPU."""
        if backend not in ("onednn", "aten"):
            raise ValueError(f"cpu_gemm: {backend!r} is not one of onednn, aten")
        for m in self.modules():
            if isinstance(m, Linear):
                m.cpu_gemm = backend
        return self

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def hidden_states(self, input_ids, attention_mask=None, return_attention: bool = False,
                      return_all_hidden: bool = False, position_ids=None, kv_cache: KVCache | None = None):
        """Final normed hidden states (B, L, D), plus per-layer attention probs / hidden states on request.

        ``attention_mask``: (B, L) valid keys (padding), or a boolean pair mask (B, L, L) / (B, 1, L, L) whose
        [q, k] entry says query q may attend key k (document-masked packing, block diffusion); a causal model
        ANDs either with the causal mask. ``position_ids`` (B, L) or (L,): RoPE positions (default 0..L-1), so
        packed documents can restart at 0 and a block-diffusion pass over [noisy; clean] can repeat them.
        ``kv_cache`` (``KVCache``, bidirectional model, no ``attention_mask``): every position also attends the
        cached prefix; ``position_ids`` then place the new tokens after it.
        """
        B, L = input_ids.shape
        if kv_cache is not None and (self.config.causal or attention_mask is not None or return_attention):
            raise ValueError("kv_cache: for a bidirectional model, without attention_mask or return_attention")
        if position_ids is None and L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds model max_seq_len {self.config.max_seq_len}")
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask if mask.dim() == 4 else mask[:, None]
            if self.config.causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        if self._rope is None or self._rope[0].device != input_ids.device:
            c = self.config
            self._rope = rope_tables(c.max_seq_len, c.hidden_size // c.num_heads, c.rope_theta, input_ids.device)
        if position_ids is None:
            cos, sin = self._rope[0][:L], self._rope[1][:L]
        else:
            if int(position_ids.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(position_ids.max())} exceeds model max_seq_len "
                                 f"{self.config.max_seq_len}")
            cos, sin = self._rope[0][position_ids], self._rope[1][position_ids]  # (L, hd/2) or (B, L, hd/2)
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]  # broadcast over heads: (B, 1, L, hd/2)
        x = self.embed(input_ids)
        probs, hiddens = [], []
        for i, block in enumerate(self.blocks):
            x, p = block(x, cos, sin, mask, return_attention, kv_cache, i)
            if return_attention:
                probs.append(p)
            if return_all_hidden:
                hiddens.append(x)
        out = {"hidden": self.norm(x)}
        if return_attention:
            out["attentions"] = probs
        if return_all_hidden:
            out["all_hidden"] = hiddens
        return out

    def forward(self, input_ids, attention_mask=None, logits_mask=None, return_attention: bool = False,
                return_all_hidden: bool = False, logits_index=None, position_ids=None,
                kv_cache: KVCache | None = None):
        """Logits (B, L, V); with ``logits_mask`` (B, L) bool, logits of the selected positions only, (M, V);
        with ``logits_index`` (M,) int64, of the positions ``b * L + i`` it lists, in its order (no host sync:
        a boolean mask's count must be read back from the device, an index's length is known).

        The diffusion loss needs logits only at masked positions, so projecting just those onto the vocabulary
        saves about half the output-layer work. With a ``return_*`` flag a dict is returned instead.
        """
        out = self.hidden_states(input_ids, attention_mask, return_attention, return_all_hidden, position_ids,
                                 kv_cache)
        h = out["hidden"]
        if logits_index is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, logits_index)
        elif logits_mask is not None:
            h = h[logits_mask]
        logits = self.lm_head(h)
        if not (return_attention or return_all_hidden):
            return logits
        out["logits"] = logits
        return out


def build_model(model_section, vocab_size: int, mask_token_id: int, pad_token_id: int,
                diffusion_section=None) -> TdlmForMaskedOrCausalLM:
    s, d = model_section, diffusion_section
    noise = ({"schedule": d.schedule, "t_min": d.t_min, "loglinear_eps": d.loglinear_eps, "block_size": d.block_size}
             if d is not None else {})
    cfg = TdlmConfig(vocab_size=s.vocab_size or vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers,
                     num_heads=s.num_heads, intermediate_size=s.intermediate_size, max_seq_len=s.max_seq_len,
                     rope_theta=s.rope_theta, dropout=s.dropout, tie_embeddings=s.tie_embeddings, causal=s.causal,
                     mask_token_id=mask_token_id, pad_token_id=pad_token_id, **noise)
    return TdlmForMaskedOrCausalLM(cfg)


def noise_schedule(config: TdlmConfig):
    """The ``NoiseSchedule`` a checkpoint was trained under (its saved ``schedule``; linear for old ones)."""
    from tdlm.diffusion import make_schedule

    return make_schedule(getattr(config, "schedule", "linear"), getattr(config, "loglinear_eps", 1e-3))
