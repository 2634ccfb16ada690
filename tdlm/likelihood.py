"""Likelihood of a checkpoint on a dataset: the masked-diffusion NELBO with three Monte-Carlo estimators, or the
exact next-token NLL of an autoregressive checkpoint.

All three diffusion estimators are unbiased for the quantity the trainer reports as ``val/loss``,

    N(x) = E_{t ~ U[t_min, 1]} [ w(t) * sum_{i masked} -log p(x_i | z_t) ],   w = -alpha'/(1 - alpha),

summed over sequences and divided by the number of valid tokens:

- ``iid``: t ~ U[t_min, 1] per sequence; every valid token masked independently with probability m = 1 - alpha(t).
- ``stratified``: as iid, but in each pass the N evaluated sequences get one t from each of N equal strata of
  [t_min, 1] (a random permutation assigns strata), so the spread of t over the set is the same every pass.
- ``exact-k`` (LLaDA ``get_log_likelihood.py``; RADD's k-DCE): k ~ U{1..L} with L the sequence's valid tokens,
  exactly k of them masked uniformly at random, weight (L / k) * c_k. Substituting m = 1 - alpha(t) gives
  N = 1/(1 - t_min) * int_{m(t_min)}^{m(1)} (1/m) E_{M ~ Bern(m)^L}[ sum_{i in M} l_i ] dm, and integrating
  m^(k-1) (1-m)^(L-k) over m for every mask set of size k yields
  N = sum_k (1/k) c_k E_{|M|=k}[ sum_{i in M} l_i ],  c_k = (I_{m(1)}(k, L-k+1) - I_{m(t_min)}(k, L-k+1)) / (1 - t_min)
  with I the regularised incomplete beta function. For t_min = 0 and the linear schedule c_k = 1: LLaDA's L/k.
  Because the same truncation is applied, all three estimators target exactly the same number.

A block-diffusion checkpoint (``block_size`` L' in its config) is scored on the block NELBO: every block of L'
tokens is one row of the estimator (its own t or k, strata over sequences x blocks; exact-k with the c_k of a
block of L' tokens), and ``tdlm.objective.block_diffusion_outputs`` is the objective.

Noise never depends on the process or the batch: each sequence's draws come from a generator seeded by
(seed, pass, the sequence's global index ``idx``), and stratum assignments from (seed, pass). Per-sequence sums
are gathered across processes and summed in index order, so any number of processes gives the same result.

The reported standard error is the Monte-Carlo one: the spread of the K per-pass estimates over the whole set,
std / sqrt(K) (K >= 2; it is the only form valid for stratified t, whose sequences are not independent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .diffusion import NoiseSchedule, noise_mask
from .engine.randomness import keyed_generator
from .noise import exact_k_mask, exact_k_weight
from .objective import (autoregressive_outputs, block_diffusion_outputs, effective_block_size,
                        masked_diffusion_outputs, sequence_sums)
from .sequences import batch_positions, resolve_never_mask

ESTIMATORS = ("stratified", "iid", "exact-k")


def noise_generator(seed: int, pass_idx: int, index: int) -> torch.Generator:
    """The generator for one (pass, sequence): a function of the global index only, never of the rank."""
    return keyed_generator(seed, index, salt=pass_idx * 998_244_353 + 17)


class NelboEstimator:
    """Draws the masking noise and the per-sequence weight for one of ``ESTIMATORS``."""

    def __init__(self, name: str, schedule: NoiseSchedule, t_min: float, seed: int, num_sequences: int,
                 block_size: int = 0):
        if name not in ESTIMATORS:
            raise ValueError(f"--estimator: unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"--t-min: must be in [0, 1), got {t_min}")
        if name != "exact-k" and t_min == 0.0:
            # With iid masks, P(any token masked) ~ L t while w = 1/t: the variance diverges like log(1/t_min).
            raise ValueError(f"--t-min: the {name} estimator needs t_min > 0 (infinite variance at 0); "
                             f"exact-k works with t_min = 0")
        self.name, self.schedule, self.t_min, self.seed, self.n = name, schedule, t_min, seed, num_sequences
        self.block_size = block_size  # block diffusion: every block of a sequence is one row of the estimator
        self._perms: dict[int, torch.Tensor] = {}

    def _strata(self, pass_idx: int, units: int) -> torch.Tensor:
        """Stratum of every sequence (or block) in this pass: one permutation of 0..units-1, the same on every
        process."""
        if pass_idx not in self._perms:
            g = keyed_generator(self.seed, 0, salt=pass_idx * 998_244_353 + 424_242)
            self._perms[pass_idx] = torch.randperm(units, generator=g)
        return self._perms[pass_idx]

    def exact_k_weight(self, k: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """(L / k) * c_k in float64 (see the module docstring); exactly L / k for t_min = 0, linear schedule.
        The same function the training estimator uses (``tdlm.noise.exact_k_weight``)."""
        return exact_k_weight(k, length, self.schedule, self.t_min)

    def noise(self, valid: torch.Tensor, index: torch.Tensor, pass_idx: int):
        """Masked positions (B, L) bool (never on pads) and per-sequence weights (B,) float64; with ``block_size``
        per-block weights (B, L / L'): each block draws its own t (or k), strata over sequences x blocks."""
        B, L = valid.shape
        nb = L // self.block_size if self.block_size else 1
        valid_cpu = valid.cpu()
        # One draw of L + nb uniforms per sequence from its own generator: u[:, :nb] pick t (or k) of each block,
        # u[:, nb:] the mask (nb = 1 without blocks).
        u = torch.stack([torch.rand(L + nb, generator=noise_generator(self.seed, pass_idx, i), dtype=torch.float64)
                         for i in index.tolist()]) if B else torch.empty(0, L + nb, dtype=torch.float64)
        if nb > 1:
            width = self.block_size
            strata = index.cpu()[:, None] * nb + torch.arange(nb)  # (B, nb) unit of each block in 0..N*nb-1
            masked, weight = self._rows_noise(u[:, :nb].reshape(-1), u[:, nb:].reshape(-1, width),
                                              valid_cpu.reshape(-1, width), strata.reshape(-1), pass_idx, self.n * nb)
            return masked.view(B, L).to(valid.device), weight.view(B, nb).to(valid.device)
        masked, weight = self._rows_noise(u[:, 0], u[:, 1:], valid_cpu, index.cpu(), pass_idx, self.n)
        return masked.to(valid.device), weight.to(valid.device)

    def _rows_noise(self, u_first, u_mask, valid_cpu, unit, pass_idx: int, units: int):
        """(masked, weight) of rows (sequences, or blocks) with uniforms ``u_first`` (N,), ``u_mask`` (N, L)."""
        if self.name == "exact-k":  # k ~ U{1..L_valid}, a uniformly random k-subset of the valid positions
            masked, k = exact_k_mask(u_first, u_mask, valid_cpu)
            weight = self.exact_k_weight(k, valid_cpu.sum(1))
        else:
            u_t = u_first
            if self.name == "stratified":
                u_t = (self._strata(pass_idx, units)[unit].double() + u_t) / units
            t = self.t_min + (1.0 - self.t_min) * u_t  # (N,) float64
            masked = noise_mask(t, u_mask, self.schedule, valid_cpu)
            weight = self.schedule.weight(t)
        return masked, weight


@torch.no_grad()
def sequence_nelbo(model, ids: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, mask_token_id: int,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   block_size: int = 0) -> torch.Tensor:
    """Per-sequence weighted CE over masked positions, (B,) float64: ``tdlm.objective``, as in training (the
    block NELBO with ``block_size``, ``weight`` then per block)."""
    positions = masked.flatten().nonzero().squeeze(1)
    # ``valid`` only sets the outputs' token count, which the NELBO column does not use
    if block_size:
        out = block_diffusion_outputs(model, ids, masked, masked, positions, weight, mask_token_id, block_size,
                                      attention_mask)
    else:
        out = masked_diffusion_outputs(model, ids, masked, masked, positions, weight, mask_token_id,
                                       attention_mask, position_ids=position_ids)
    return sequence_sums(out)[:, 0]


@torch.no_grad()
def sequence_ar_nll(model, ids: torch.Tensor, valid: torch.Tensor, attention_mask=None, position_ids=None):
    """Exact next-token NLL per sequence (B,) float64 and its number of targets (B,)."""
    sums = sequence_sums(autoregressive_outputs(model, ids, valid, attention_mask, position_ids))
    return sums[:, 0], sums[:, 1]


@dataclass
class LikelihoodResult:
    nelbo_per_token: float
    stderr: float | None
    num_tokens: int
    num_sequences: int
    per_pass: list = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nelbo_per_token)


def summarize(rows: torch.Tensor) -> LikelihoodResult:
    """rows (N, 2 + K) float64 = [idx, tokens, sum_pass_1 .. sum_pass_K] of every sequence, any order."""
    rows = rows[rows[:, 0].argsort()]  # index order: the float64 sums do not depend on the sharding
    tokens = rows[:, 1].sum()
    per_pass = rows[:, 2:].sum(0) / tokens  # (K,)
    K = per_pass.numel()
    stderr = float(per_pass.std(unbiased=True) / math.sqrt(K)) if K > 1 else None
    return LikelihoodResult(float(per_pass.mean()), stderr, int(tokens), rows.shape[0], per_pass.tolist())


@torch.no_grad()
def evaluate(model, dataloader, accelerator, pad_token_id: int, mask_token_id: int, causal: bool,
             estimator: NelboEstimator | None = None, passes: int = 1,
             never_mask_ids: tuple[int, ...] = ()) -> LikelihoodResult:
    """NELBO (or exact AR NLL) per eligible token over a prepared dataloader of {input_ids, idx[, attention_mask,
    loss_mask, document_ids]}: the positions ``tdlm.sequences.batch_positions`` makes eligible, as in training
    (an SFT row's response: the conditional bound).

    Every process evaluates its shard; per-sequence sums are gathered (``gather_for_metrics`` drops the rows
    Accelerate repeats to even out shards) and every process returns the same result.
    """
    model.eval()
    gathered = []
    for batch in dataloader:
        ids, idx = batch["input_ids"], batch["idx"]
        pos = batch_positions(batch, pad_token_id, never_mask_ids, causal)
        attn, valid, where = pos.attention_mask, pos.eligible, pos.position_ids
        if causal:
            nll, n_tgt = sequence_ar_nll(model, ids, valid, attn, where)
            sums, tokens = nll[:, None], n_tgt
        else:
            sums = torch.stack([sequence_nelbo(model, ids, *estimator.noise(valid, idx, p), mask_token_id, attn,
                                               where, estimator.block_size) for p in range(passes)], 1)  # (B, K)
            tokens = valid.double().sum(1)
        rows = torch.cat([idx.double()[:, None], tokens[:, None], sums], 1)  # (B, 2 + K)
        gathered.append(accelerator.gather_for_metrics(rows).cpu())
    return summarize(torch.cat(gathered))


def eval_split(split: str, tokenizer, seq_len: int, run_config=None, data_dir: str | None = None,
               text_files: list | None = None, max_sequences: int = 0):
    """The dataset to score: raw text files (tokenized with the checkpoint's tokenizer and packed to
    ``seq_len``), a directory from ``data_prep/prepare.py``, or else the run's own data config."""
    from .config import ConfigError, DataSection
    from .data import _read_files, _tokenize_and_pack, load_prepared, resolve_data

    if text_files:
        texts = _read_files(DataSection(source="files", paths=list(text_files)))
        ds = _tokenize_and_pack(texts, tokenizer, seq_len, packing=True, add_special=True, num_proc=1)
    else:
        if data_dir:
            data = load_prepared(data_dir)
        elif run_config is not None:
            data = resolve_data(run_config.data, log=lambda *a: None)
        else:
            raise ConfigError("no data: pass --data DIR (prepared) or --text FILE..., or use a checkpoint inside "
                              "its run dir (config.yaml)")
        if split not in ("train", "validation"):
            raise ConfigError(f"--split: {split!r} is not train or validation")
        ds = getattr(data, split)
    if max_sequences:
        ds = ds.select(range(min(max_sequences, len(ds))))
    return ds.with_format("torch")


def score_rows(ck, ds, accelerator, estimator: str = "stratified", passes: int = 4, seed: int = 0,
               t_min: float | None = None, batch_size: int = 16) -> tuple[LikelihoodResult, dict]:
    """Score a dataset of fixed-length rows {input_ids, idx} (torch format, pads = the tokenizer's pad) with a
    loaded checkpoint: the NELBO bound (``estimator``, ``passes``) or, for an AR checkpoint, the exact NLL.
    Returns the result and the recipe (estimator, passes, schedule, t_min) that produced it. The schedule and
    t_min are the checkpoint's own (saved in its model config), so a checkpoint scored outside its run directory
    uses them too; ``t_min`` overrides."""
    from .data import Collator
    from .model import noise_schedule

    tok = ck.tokenizer
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=Collator(tok.pad_token_id))
    model, dl = accelerator.prepare(ck.model, dl)
    mc = ck.model.config  # the schedule the checkpoint was trained under (saved with the model)
    t_min = t_min if t_min is not None else mc.t_min
    est = None
    if not ck.causal:
        block_size = effective_block_size(getattr(mc, "block_size", 0), ds[0]["input_ids"].numel())
        est = NelboEstimator(estimator, noise_schedule(mc), t_min, seed, len(ds), block_size)
    passes = 1 if ck.causal else passes
    # the run's never-masked tokens (config.yaml beside the checkpoint); none for a bare model directory
    never = resolve_never_mask(ck.config.diffusion.never_mask, tok) if ck.config is not None else ()
    res = evaluate(model, dl, accelerator, tok.pad_token_id, tok.mask_token_id, ck.causal, est, passes, never)
    del model, dl  # prepared objects must not outlive the accelerator (gloo teardown)
    recipe = {"kind": "exact" if ck.causal else "bound", "mc_passes": passes,
              "estimator": "exact-autoregressive" if ck.causal else estimator, "seed": seed,
              "schedule": None if ck.causal else mc.schedule, "t_min": None if ck.causal else t_min,
              "block_size": est.block_size if est else None}
    return res, recipe


def checkpoint_likelihood(ck, accelerator, split: str = "validation", data_dir: str | None = None,
                          text_files: list | None = None, estimator: str = "stratified", passes: int = 4,
                          seed: int = 0, t_min: float | None = None, batch_size: int = 16,
                          max_sequences: int = 0) -> dict:
    """Perplexity of a loaded checkpoint (``tdlm.runs.load_checkpoint``) as the dict eval/perplexity.py prints:
    the NELBO bound with its Monte-Carlo stderr, or the exact AR perplexity (stderr 0), by ``score_rows``.
    ``split`` is the one scored, or "text" for ``text_files``."""
    tok, cfg = ck.tokenizer, ck.config
    seq_len = cfg.data.seq_len if cfg else ck.model.config.max_seq_len
    with accelerator.main_process_first():
        ds = eval_split(split, tok, seq_len, cfg, data_dir, text_files, max_sequences)
    res, recipe = score_rows(ck, ds, accelerator, estimator, passes, seed, t_min, batch_size)
    return {"checkpoint": str(ck.path), "step": ck.state.get("step"), "split": "text" if text_files else split,
            "text_files": [str(f) for f in text_files] if text_files else None, "kind": recipe["kind"],
            "nelbo_per_token": res.nelbo_per_token, "perplexity_bound": res.perplexity, "perplexity": res.perplexity,
            "stderr": 0.0 if ck.causal else res.stderr, "mc_passes": recipe["mc_passes"],
            "estimator": recipe["estimator"], "num_tokens": res.num_tokens,
            "num_sequences": res.num_sequences, "seed": seed, "per_pass": res.per_pass,
            "schedule": recipe["schedule"], "t_min": recipe["t_min"], "block_size": recipe["block_size"],
            "num_processes": accelerator.num_processes}


@torch.no_grad()
def clipped_loss_spread(model, rows: torch.Tensor, pad_token_id: int, mask_token_id: int, block_size: int,
                        schedule: NoiseSchedule, t_min: float, bounds: tuple[float, float] | None, batch_size: int,
                        passes: int, seed: int = 0) -> dict:
    """BD3-LM's clipped-schedule search criterion (``_clipped_schedule_search``): the spread over batches of the
    per-token training loss under t_b ~ U[bounds] (None: [t_min, 1]), a proxy for the gradient variance.
    ``rows`` (N, L) validation ids; ``passes`` noise draws per batch (generator keyed by pass and batch).
    Returns {bounds, mean, var} of the per-batch losses (the mean is the clipped objective, not the NELBO)."""
    from .noise import BlockTrainingNoise, TrainingNoise

    noise = BlockTrainingNoise(TrainingNoise("bernoulli", schedule, t_min), block_size, bounds)
    losses = []
    for p in range(passes):
        for i, lo in enumerate(range(0, rows.shape[0], batch_size)):
            ids = rows[lo:lo + batch_size]
            valid = ids != pad_token_id
            masked, t, weight, _ = noise.mask(*noise.draw(keyed_generator(seed, i, salt=p + 1), ids.shape[0],
                                                          ids.shape[1]), valid.cpu())
            masked, weight = masked.to(ids.device), weight.to(ids.device)
            out = block_diffusion_outputs(model, ids, valid, masked, masked.flatten().nonzero().squeeze(1), weight,
                                          mask_token_id, block_size, valid)
            losses.append(float(out.loss_sum) / max(int(valid.sum()), 1))
    x = torch.tensor(losses, dtype=torch.float64)
    return {"bounds": list(bounds) if bounds else [t_min, 1.0], "mean": float(x.mean()), "var": float(x.var())}
