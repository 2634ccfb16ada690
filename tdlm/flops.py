"""Model FLOPs of training, the compute axis of scaling and data-constrained comparisons.

Kaplan et al. 2020 (arXiv 2001.08361, table 1) count a transformer's forward pass at 2 N + 2 n_layer n_ctx d_attn
FLOPs per token (N: the parameters in matrix products; the second term the attention scores and their weighted
sum); training (forward and backward) is three times that:

    C = 6 N D + 6 n_layer n_ctx d D,   counted here as 12 n_layer n_ctx d per token for QK^T and AV together,

as PaLM's MFU (Chowdhery et al. 2022, appendix B) and nanoGPT's ``estimate_mfu`` count it. A masked-diffusion step
runs the backbone over every position, like an AR step, so both objectives spend the same FLOPs per token; padding
positions are computed too and counted. Block diffusion runs [x_t ; x] (2L positions, context 2L) per row of L
tokens, so its tasks count twice the tokens at twice the context. Embedding lookups are not matrix products and
are not counted."""

from __future__ import annotations

from torch import nn


def matmul_params(model: nn.Module) -> int:
    """Parameters used in matrix products: every Linear weight once (a tied head is the embedding, counted once)."""
    seen = {}
    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":  # transformers' GPT-2 layers are Conv1D
            seen[id(m.weight)] = m.weight.numel()
    return sum(seen.values())


def training_flops_per_token(n_matmul: int, num_layers: int, seq_len: int, hidden: int) -> int:
    """6 N + 12 n_layer n_ctx d: model FLOPs of one training token (forward and backward)."""
    return 6 * n_matmul + 12 * num_layers * seq_len * hidden
