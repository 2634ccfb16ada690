"""The text objectives, written once: the masked-diffusion NELBO and the autoregressive NLL of a batch.

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
    t: torch.Tensor | None = None        # (B,)
    weight: torch.Tensor | None = None   # (B,) NELBO weight of each sequence (w(t); exact-k: (L/k) c_k), unclipped
    token_ce: torch.Tensor | None = None     # (M,) CE of masked tokens (AR: (B, L-1) NLL)
    logits: torch.Tensor | None = None       # (M, V) logits of masked tokens (AR: (B, L, V))
    positions: torch.Tensor | None = None    # (M,) flat index b * L + i of each masked token, row-major
    t_ratio: torch.Tensor | None = None      # (B,) p(t) / q(t) of an importance-sampled t (None: 1)
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
    nelbo.index_add_(0, rows, out.weight[rows].double() * out.token_ce.double())
    return torch.stack([nelbo, out.valid.double().sum(1)], 1)


def reported_sum(out: StepOutputs, clip_weight: float = 0.0) -> torch.Tensor:
    """float64, detached: the batch's objective as reported (``train/loss``), with the true weight even when
    ``clip_weight`` clipped it in ``loss_sum``."""
    if clip_weight > 0 and out.weight is not None:
        return sequence_sums(out)[:, 0].detach().sum()
    return out.loss_sum.detach().double()
