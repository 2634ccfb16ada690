"""What each position of a text batch is: attended, eligible (noised and in the loss), its document and its RoPE
position. One function, ``batch_positions``, used by training, validation and ``tdlm/likelihood.py``, so the three
agree on which tokens the NELBO (or the AR NLL) is over.

A batch is ``{input_ids, idx}`` plus, when the data carry them:
- ``attention_mask`` (B, L) bool: real tokens (the collator adds it when a row holds padding);
- ``loss_mask`` (B, L) bool: the tokens the objective is over (SFT: the response and its EOS; ``tdlm/sft.py``).
  The rest (the prompt) is attended, never masked and never in the loss: the conditional NELBO of LLaDA's SFT;
- ``document_ids`` (B, L) int: the document of each position of a packed row (``data.document_mask``); attention
  is then block-diagonal per document and positions restart at 0 in each.

``never_mask`` token ids (``diffusion.never_mask``) are attended but never eligible. Eligible positions are the
bound's denominator: exp(NELBO / eligible tokens) is the perplexity bound of the eligible tokens given the rest.

Variable length (``data.random_length_prob``, LLaDA's 1% stochastic length): ``RandomLength`` wraps the training
split and cuts a drawn share of rows to a uniform random length; the tail becomes padding, so it is never
attended, masked or in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdlm.engine.randomness import keyed_generator

RANDOM_LENGTH_SALT = 616161  # the cut-length stream, apart from the masking noise and the validation noise


@dataclass
class BatchPositions:
    eligible: torch.Tensor                  # (B, L) bool: masked by the noise and scored (diffusion); AR targets
    attention_mask: torch.Tensor | None     # None, (B, L) key mask, or (B, L, L) pair mask [query, key]
    position_ids: torch.Tensor | None       # (B, L) RoPE positions, or None for 0..L-1
    all_eligible: bool                      # no padding, prompt, never-masked token or document mask: the fast path


def document_attention(document_ids: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair mask (B, L, L), position ids (B, L)) of packed rows: query q attends key k iff both are in the same
    document and k is a real token; every query attends itself (a query with no key makes SDPA return NaN, which
    the next layer would spread through its zero-weighted values). Positions count from 0 at each document start."""
    B, L = document_ids.shape
    pair = (document_ids[:, :, None] == document_ids[:, None, :]) & real[:, None, :]
    pair = pair | torch.eye(L, dtype=torch.bool, device=pair.device)
    index = torch.arange(L, device=document_ids.device).expand(B, L)
    starts = torch.ones_like(real)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_of_mine = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    return pair, index - start_of_mine


def batch_positions(batch: dict, pad_id: int, never_mask_ids: tuple[int, ...] = (),
                    causal: bool = False) -> BatchPositions:
    """The roles of a batch's positions (see the module docstring). ``causal``: the first token of a document is
    not a target (its predictor, the token before, is in another document)."""
    ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    real = attn.bool() if attn is not None else ids != pad_id
    eligible = real
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None:
        eligible = eligible & loss_mask.bool()
    if never_mask_ids:
        eligible = eligible & ~torch.isin(ids, torch.tensor(never_mask_ids, device=ids.device))
    docs = batch.get("document_ids")
    position_ids = None
    if docs is not None:
        attn, position_ids = document_attention(docs, real)
        if causal:
            eligible = eligible.clone()
            eligible[:, 1:] &= docs[:, 1:] == docs[:, :-1]
    simple = batch.get("attention_mask") is None and loss_mask is None and not never_mask_ids and docs is None
    return BatchPositions(eligible, attn, position_ids, simple)


def resolve_never_mask(names: list, tokenizer) -> tuple[int, ...]:
    """Token ids of ``diffusion.never_mask``: bos / eos / sep / cls / unk name the tokenizer's special token, any
    other entry is a token of the vocabulary. One clear error for a name the tokenizer does not have."""
    from tdlm.config import ConfigError

    out = []
    for name in names:
        if name in ("bos", "eos", "sep", "cls", "unk"):
            tid = getattr(tokenizer, f"{name}_token_id", None)
            if tid is None:
                raise ConfigError(f"diffusion.never_mask: the tokenizer has no {name} token")
        else:
            tid = tokenizer.convert_tokens_to_ids(str(name))
            if tid is None or tid == tokenizer.unk_token_id and name != tokenizer.unk_token:
                raise ConfigError(f"diffusion.never_mask: {name!r} is not a token of the tokenizer (or bos, eos, "
                                  f"sep, cls, unk)")
        if tid in (tokenizer.pad_token_id, tokenizer.mask_token_id):
            raise ConfigError(f"diffusion.never_mask: {name!r} is the pad or mask token, never masked anyway")
        out.append(int(tid))
    return tuple(sorted(set(out)))


class RandomLength(torch.utils.data.Dataset):
    """A training split whose rows are cut, each with probability ``prob``, to a length ~ U{1..L}; the tail becomes
    ``pad_id`` (and leaves the loss mask). Each row's draw comes from a generator keyed by (seed, epoch, row), so
    it does not depend on the batch size, the processes or a resume (the engine calls ``set_epoch``)."""

    def __init__(self, rows, prob: float, pad_id: int, seed: int):
        self.rows, self.prob, self.pad_id, self.seed, self.epoch = rows, prob, pad_id, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = dict(self.rows[i])
        g = keyed_generator(self.seed, int(i), salt=RANDOM_LENGTH_SALT + self.epoch)  # one stream per (epoch, row)
        cut, length = torch.rand(2, generator=g, dtype=torch.float64)
        if cut < self.prob:
            L = row["input_ids"].shape[0]
            keep = int(length * L) + 1  # U{1..L}
            row["input_ids"] = row["input_ids"].clone()
            row["input_ids"][keep:] = self.pad_id
            if "loss_mask" in row:
                row["loss_mask"] = row["loss_mask"].clone()
                row["loss_mask"][keep:] = False
        return row
