"""The text objectives, written once: the masked-diffusion NELBO, the block-diffusion NELBO (BD3-LM, below) and
the autoregressive NLL of a batch.

Training (``tdlm.tasks``), validation (the same tasks' ``evaluate``) and the likelihood estimators
(``tdlm.likelihood``, ``eval/perplexity.py``) all call these functions; they differ only in the noise they
pass (the masked positions and each sequence's weight):

    NELBO(x) = E_t [ w(t) * sum_{i masked} -log p_theta(x_i | z_t) ],   w(t) = -alpha'(t) / (1 - alpha(t))

(``tdlm/diffusion.py``); per token it is the sum over sequences divided by their valid tokens, so exp() of it is
a perplexity upper bound comparable with the AR model's exact perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdlm.diffusion import ar_token_losses, diffusion_token_losses


@dataclass
class StepOutputs:
    """Everything one batch's loss was computed from; the text metric collectors read these tensors."""

    loss_sum: torch.Tensor       # sum of w*CE over masked tokens (AR: sum of NLL), with grad
    num_tokens: torch.Tensor     # valid tokens in the NELBO denominator (AR: valid targets)
    input_ids: torch.Tensor
    valid: torch.Tensor          # (B, L) bool
    masked: torch.Tensor | None = None   # (B, L) bool
    t: torch.Tensor | None = None        # (B,); block diffusion (B, L / L'), one per block
    weight: torch.Tensor | None = None   # (B,) NELBO weight of each sequence (w(t); exact-k: (L/k) c_k), unclipped;
    #                                      block diffusion (B, L / L'), one per block (``token_weight``)
    token_ce: torch.Tensor | None = None     # (M,) CE of masked tokens (AR: (B, L-1) NLL)
    logits: torch.Tensor | None = None       # (M, V) logits of masked tokens (AR: (B, L, V))
    positions: torch.Tensor | None = None    # (M,) flat index b * L + i of each masked token, row-major
    t_ratio: torch.Tensor | None = None      # (B,) p(t) / q(t) of an importance-sampled t (None: 1); blocks as t
    attention_mask: torch.Tensor | None = None   # what the model attended with: (B, L) keys or (B, L, L) pairs
    # (all True when it attended everything; None: not recorded, read as ``valid``)
    position_ids: torch.Tensor | None = None     # (B, L) RoPE positions of document-masked rows (None: 0..L-1)


def masked_diffusion_outputs(model, ids: torch.Tensor, valid: torch.Tensor, masked: torch.Tensor,
                             positions: torch.Tensor, weight: torch.Tensor, mask_token_id: int,
                             attention_mask: torch.Tensor | None = None, t: torch.Tensor | None = None,
                             clip_weight: float = 0.0, t_ratio: torch.Tensor | None = None,
                             position_ids: torch.Tensor | None = None) -> StepOutputs:
    """The weighted CE of the masked tokens. ``masked`` (B, L) bool and ``positions`` (M,) (its flat row-major
    indices, passed so a caller that built them on the host needs no device sync); ``weight`` (B,) per sequence.
    The model projects onto the vocabulary at the masked positions only. ``clip_weight`` > 0 clips the weight in
    ``loss_sum`` (a biased gradient); ``sequence_sums`` always uses the true weight. The weight is the estimator's
    (``tdlm/noise.py``): w(t), (L/k) c_k, or w(t) p(t)/q(t). ``valid`` is the eligible positions (the
    denominator; ``tdlm.sequences.batch_positions``); ``position_ids`` the RoPE positions of document-masked rows."""
    noisy = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
    logits = model(noisy, attention_mask, logits_index=positions, **_positions_kw(position_ids))  # (M, V)
    ce = diffusion_token_losses(logits, ids.flatten()[positions])
    w = weight[positions // ids.shape[1]]
    if clip_weight > 0:
        w = w.clamp(max=clip_weight)
    return StepOutputs((w * ce).sum(), valid.sum(), ids, valid, masked, t, weight, ce, logits, positions, t_ratio,
                       _attended(attention_mask, ids), position_ids)


def _attended(attention_mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """The attention a forward used, for the collectors that run the model again (all True for none)."""
    return torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask


def _positions_kw(position_ids: torch.Tensor | None) -> dict:
    """Position ids only when given: a backbone without the argument is called as before."""
    return {} if position_ids is None else {"position_ids": position_ids}


def autoregressive_outputs(model, ids: torch.Tensor, valid: torch.Tensor,
                           attention_mask: torch.Tensor | None = None,
                           position_ids: torch.Tensor | None = None) -> StepOutputs:
    """Next-token NLL: position i predicts i + 1; only ``valid`` (eligible) positions are targets, so pads, an SFT
    prompt and never-masked tokens never are."""
    logits = model(ids, attention_mask, **_positions_kw(position_ids))
    nll, tgt_valid = ar_token_losses(logits, ids, valid)
    return StepOutputs(nll.sum(), tgt_valid.sum(), ids, valid, token_ce=nll, logits=logits,
                       attention_mask=_attended(attention_mask, ids), position_ids=position_ids)


def sequence_sums(out: StepOutputs) -> torch.Tensor:
    """(B, 2) float64: each sequence's objective (NELBO with the unclipped weight; AR: NLL) and its tokens in the
    per-token denominator (valid tokens; AR: valid targets). CE is float32 as in training, summed in float64."""
    if out.masked is None:
        return torch.stack([out.token_ce.double().sum(1), out.valid[:, 1:].double().sum(1)], 1)
    rows = out.positions // out.input_ids.shape[1]
    nelbo = torch.zeros(out.input_ids.shape[0], dtype=torch.float64, device=out.input_ids.device)
    nelbo.index_add_(0, rows, token_weight(out).double() * out.token_ce.double())
    return torch.stack([nelbo, out.valid.double().sum(1)], 1)


def reported_sum(out: StepOutputs, clip_weight: float = 0.0) -> torch.Tensor:
    """float64, detached: the batch's objective as reported (``train/loss``), with the true weight even when
    ``clip_weight`` clipped it in ``loss_sum``."""
    if clip_weight > 0 and out.weight is not None:
        return sequence_sums(out)[:, 0].detach().sum()
    return out.loss_sum.detach().double()


# ------------------------------------------------------------------------------------------------ block diffusion
# BD3-LM (Arriola et al., ICLR 2025, arXiv 2503.09573): a row of L tokens is cut into L / L' blocks; block b is
# masked with its own time t_b and denoised given the *clean* blocks before it, so
#
#     -log p(x) <= sum_b NELBO_MDLM(x^b | x^{<b})
#               = sum_b E_{t_b} [ w(t_b) * sum_{i in b, masked} -log p(x_i | z^b, x^{<b}) ]
#
# Training runs all blocks in one forward over [x_t ; x] (length 2L) with the block-causal mask of
# ``block_attention_mask``; RoPE positions repeat 0..L-1 so a noisy token and its clean copy share a position.


def effective_block_size(block_size: int, length: int) -> int:
    """The block size the objective uses: 0 (plain MDLM) for 0 and for blocks as long as the row."""
    return block_size if 0 < block_size < length else 0


def token_weight(out: StepOutputs) -> torch.Tensor:
    """(M,) the NELBO weight of each masked token: its sequence's (``weight`` (B,)) or its block's (``weight``
    (B, L / L'), block diffusion); unclipped."""
    return per_token(out, out.weight)


def per_token(out: StepOutputs, values: torch.Tensor) -> torch.Tensor:
    """(M,) a per-sequence (B,) or per-block (B, L / L') quantity (weight, t, t_ratio) at each masked token."""
    B, L = out.input_ids.shape
    per_unit = values.reshape(B, -1)
    return per_unit.flatten()[out.positions // (L // per_unit.shape[1])]


def block_attention_mask(q_block: torch.Tensor, q_noisy: torch.Tensor, k_block: torch.Tensor,
                         k_noisy: torch.Tensor) -> torch.Tensor:
    """(Q, K) bool, [q, k] = q may attend k (BD3-LM's mask): a noisy token attends its own noisy block
    (bidirectionally) and the clean blocks before it; a clean token attends the clean blocks up to its own."""
    qb, kb = q_block[:, None], k_block[None, :]
    qn, kn = q_noisy[:, None], k_noisy[None, :]
    return (qn & kn & (kb == qb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb))


def paired_block_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(2L, 2L) mask of the vectorised pass over [x_t ; x]: positions 0..L-1 noisy, L..2L-1 clean."""
    block = torch.arange(length, device=device) // block_size
    noisy = torch.arange(2 * length, device=device) < length
    return block_attention_mask(block.repeat(2), noisy, block.repeat(2), noisy)


def prefix_block_mask(prefix: int, block_size: int, device=None) -> torch.Tensor:
    """(P + L', P + L') mask of one block's pass over [clean prefix of P tokens ; noisy block]: the naive loop
    and the uncached sampler (the KV-cached sampler computes the same attention from cached keys)."""
    n = prefix + block_size
    block = torch.arange(n, device=device) // block_size
    noisy = torch.arange(n, device=device) >= prefix
    return block_attention_mask(block, noisy, block, noisy)


def block_diffusion_outputs(model, ids: torch.Tensor, valid: torch.Tensor, masked: torch.Tensor,
                            positions: torch.Tensor, weight: torch.Tensor, mask_token_id: int, block_size: int,
                            attention_mask: torch.Tensor | None = None, t: torch.Tensor | None = None,
                            clip_weight: float = 0.0, t_ratio: torch.Tensor | None = None) -> StepOutputs:
    """The block NELBO's weighted CE, vectorised: one forward over [x_t ; x] with ``paired_block_mask``, logits
    at the masked noisy positions only. ``weight`` (B, L / L') per block (``t``, ``t_ratio`` likewise); the rest
    as ``masked_diffusion_outputs``. ``attention_mask`` (B, L) marks valid keys in both halves."""
    B, L = ids.shape
    noisy = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
    pair = paired_block_mask(L, block_size, ids.device)[None]
    if attention_mask is not None:  # pads are never keys; every query keeps itself so no softmax row is empty
        keys = attention_mask.bool().repeat(1, 2)
        pair = (pair & keys[:, None, :]) | torch.eye(2 * L, dtype=torch.bool, device=ids.device)
    index = positions // L * (2 * L) + positions % L  # flat b * 2L + i of the noisy copies
    logits = model(torch.cat([noisy, ids], 1), pair, logits_index=index,
                   position_ids=torch.arange(L, device=ids.device).repeat(2))
    ce = diffusion_token_losses(logits, ids.flatten()[positions])
    out = StepOutputs(ce.new_zeros(()), valid.sum(), ids, valid, masked, t, weight, ce, logits, positions, t_ratio)
    w = token_weight(out)
    if clip_weight > 0:
        w = w.clamp(max=clip_weight)
    out.loss_sum = (w * ce).sum()
    return out


def block_diffusion_loop(model, ids: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, mask_token_id: int,
                         block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float64 block NELBO per sequence by the naive loop the vectorised pass replaces: block b is one
    forward over [x^{<b} ; z^b] with ``prefix_block_mask``. A reference for tests (L / L' forwards)."""
    B, L = ids.shape
    noisy = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
    total = torch.zeros(B, dtype=torch.float64, device=ids.device)
    for b in range(L // block_size):
        lo, hi = b * block_size, (b + 1) * block_size
        pair = prefix_block_mask(lo, block_size, ids.device)[None]
        if valid is not None:
            pair = (pair & valid[:, None, :hi]) | torch.eye(hi, dtype=torch.bool, device=ids.device)
        logp = model(torch.cat([ids[:, :lo], noisy[:, lo:hi]], 1), pair)[:, lo:].double().log_softmax(-1)
        nll = -logp.gather(-1, ids[:, lo:hi, None])[..., 0]
        total += (nll * masked[:, lo:hi]).sum(1) * weight.reshape(B, -1)[:, b].double()
    return total
