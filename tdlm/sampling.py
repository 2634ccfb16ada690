"""Sampling from a trained masked-diffusion model (and, for the baseline, from an autoregressive one).

Samplers (``SamplerConfig.method``), both over a canvas whose ``[MASK]`` positions are generated and whose other
positions are fixed (a prompt prefix, or any infilling pattern) and never changed:

- ``ancestral`` (MDLM, Sahoo et al. 2024, eq. 7): from step tau to tau' every still-masked position is revealed
  with probability (m(tau) - m(tau')) / m(tau), m the expected masked fraction; revealed tokens never change
  (carry-over of absorbing diffusion). With ``use_cache`` the network is skipped when the previous step revealed
  nothing: the model has no time input, so its output for an unchanged canvas is unchanged (MDLM ``ddpm_cache``).
  The cache is kept per row (rows never attend to each other): a call recomputes only the rows that changed, so
  a batch gains as much as one sequence does (at 1000 steps and L=128 about 1 row in 8 changes per step).
- ``low_confidence`` / ``random`` (LLaDA ``generate.py``): each step commits a fixed number of tokens, the
  most confident predictions (probability of the sampled token) or random ones, and leaves the rest masked.

Step schedules give m(tau), the masked fraction after a fraction tau of the steps: always a noise schedule's,
m(tau) = 1 - alpha(1 - tau), named as in training (``tdlm/diffusion.py``): ``linear`` 1 - tau, ``cosine``
1 - sin(pi tau / 2), ``loglinear``; one name, one curve everywhere, and a checkpoint samples on the schedule it
was trained under unless told otherwise (``eval/generate.py``). ``block_length`` > 0 runs semi-autoregressive
blocks left to right (LLaDA), each with its share of the steps. Tokens are drawn by Gumbel-max in float64 after
temperature, top-k and top-p: float32 Gumbel noise visibly lowers sample entropy (Zheng et al. 2024,
arXiv:2409.02908). ``generator`` may be one ``torch.Generator`` or one per row: with one per row a sample depends
only on its own generator, so it is the same whatever the batch or process it is drawn in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .diffusion import NoiseSchedule, make_schedule
from .engine.randomness import keyed_generator

METHODS = ("ancestral", "low_confidence", "random")
STEP_SCHEDULES = ("linear", "cosine", "loglinear")  # the noise schedules of tdlm.diffusion.make_schedule


@dataclass
class SamplerConfig:
    steps: int = 64
    method: str = "ancestral"
    step_schedule: str | NoiseSchedule | None = None
    """None = the noise schedule the model was trained under (its config's ``schedule``)."""
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_k: int = 0
    """0 = off."""
    top_p: float = 1.0
    """1 = off."""
    block_length: int = 0
    """0 = one block over the whole canvas; otherwise semi-autoregressive blocks of this many positions."""
    use_cache: bool = True
    forbidden_token_ids: tuple = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        if isinstance(self.step_schedule, str) and self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"--step-schedule: {self.step_schedule!r} is not one of {', '.join(STEP_SCHEDULES)}")
        if self.steps < 1:
            raise ValueError(f"--steps: must be >= 1, got {self.steps}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or self.block_length < 0:
            raise ValueError(f"sampler: need temperature >= 0, top_k >= 0, 0 < top_p <= 1, block_length >= 0; got "
                             f"{self.temperature}, {self.top_k}, {self.top_p}, {self.block_length}")


@dataclass
class SampleOutput:
    ids: torch.Tensor          # (B, L)
    network_calls: int
    steps_run: int
    rows_computed: int = 0     # sequences the network processed over all calls (the cache recomputes changed rows)


def masked_fraction(schedule: str | NoiseSchedule, tau: float) -> float:
    """Expected fraction of the generated positions still masked after a fraction tau of the steps."""
    if tau >= 1.0:
        return 0.0
    if not isinstance(schedule, NoiseSchedule):
        schedule = make_schedule(schedule)
    return float(schedule.mask_prob(torch.tensor(1.0 - tau, dtype=torch.float64)))


class RowRandom:
    """Uniforms from one generator for the batch, or from one generator per row (batch-independent samples)."""

    def __init__(self, generator, batch_size: int, device):
        self.per_row = isinstance(generator, (list, tuple))
        if self.per_row and len(generator) != batch_size:
            raise ValueError(f"generator: {len(generator)} generators for {batch_size} rows")
        self.g, self.device = generator, device

    def rows(self, counts: list[int], width: int) -> torch.Tensor:
        """(sum(counts), width) float64 uniforms; the first counts[0] rows belong to batch row 0, and so on."""
        if not self.per_row:
            return torch.rand(sum(counts), width, generator=self.g, dtype=torch.float64, device=self.device)
        parts = [torch.rand(c, width, generator=g, dtype=torch.float64, device=self.device)
                 for c, g in zip(counts, self.g) if c]
        return torch.cat(parts) if parts else torch.empty(0, width, dtype=torch.float64, device=self.device)

    def grid(self, B: int, L: int) -> torch.Tensor:
        return self.rows([1] * B, L)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Float64 logits / temperature with everything outside the top-k and the top-p nucleus set to -inf."""
    x = logits.double() / (temperature if temperature > 0 else 1.0)
    if top_k and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        x = x.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return x


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Categorical sample of softmax(logits / temperature) via Gumbel-max in float64; argmax at temperature 0.

    ``uniforms`` (logits' shape, float64) are used when given, else drawn from ``generator``.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    u = uniforms if uniforms is not None else torch.rand(logits.shape, generator=generator, dtype=torch.float64,
                                                         device=logits.device)
    # -log(-log u); the inner clamp keeps u -> 1 finite (a bracket misplaced here makes every draw NaN).
    gumbel = -torch.log((-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300))
    return (logits.double() / temperature + gumbel).argmax(-1)


def _draw(logits: torch.Tensor, positions: torch.Tensor, cfg: SamplerConfig, rng: RowRandom, banned=()):
    """Tokens and model probabilities of them at ``positions`` (B, L) bool: (N,) ids, (N,) float64 probs.

    ``banned`` ids ([MASK], forbidden tokens) get probability 0; the network's logits are never written to.
    """
    sel = logits[positions].double()  # (N, V)
    if banned:
        sel[:, list(banned)] = -math.inf
    if cfg.temperature > 0:
        filtered = filter_logits(sel, cfg.temperature, cfg.top_k, cfg.top_p)  # already divided by temperature
        tokens = gumbel_argmax(filtered, 1.0, uniforms=rng.rows(positions.sum(1).tolist(), sel.shape[-1]))
    else:
        tokens = sel.argmax(-1)
    probs = sel.softmax(-1).gather(-1, tokens[:, None]).squeeze(1)  # LLaDA's confidence: the model's p(token)
    return tokens, probs


def _blocks(to_fill: torch.Tensor, block_length: int) -> list[tuple[int, int]]:
    L = to_fill.shape[1]
    cols = to_fill.any(0).nonzero().squeeze(1)
    if not block_length or cols.numel() == 0:
        return [(0, L)]
    start = int(cols[0])  # blocks start at the first generated column (after a prompt), as in LLaDA
    return [(s, min(s + block_length, L)) for s in range(start, L, block_length)]


@torch.no_grad()
def generate(model, canvas: torch.Tensor, mask_token_id: int, cfg: SamplerConfig, generator=None,
             attention_mask: torch.Tensor | None = None) -> SampleOutput:
    """Fill the ``[MASK]`` positions of ``canvas`` (B, L); every other position is fixed and returned unchanged."""
    z = canvas.clone()
    to_fill = z == mask_token_id
    B, L = z.shape
    rng = RowRandom(generator, B, z.device)
    blocks = _blocks(to_fill, cfg.block_length)
    if cfg.steps < len(blocks):
        raise ValueError(f"--steps: {cfg.steps} steps cannot cover {len(blocks)} blocks of {cfg.block_length}")
    cols = torch.arange(L, device=z.device)
    banned = (mask_token_id, *cfg.forbidden_token_ids)
    calls = steps_run = rows_computed = 0
    cached_input = cached_logits = None
    schedule = cfg.step_schedule
    if schedule is None:
        schedule = getattr(getattr(model, "config", None), "schedule", "linear")
    for j, (lo, hi) in enumerate(blocks):
        in_block = to_fill & (cols >= lo) & (cols < hi)  # (B, L)
        total = in_block.sum(1)  # (B,) positions this block generates per row
        n_steps = cfg.steps // len(blocks) + (j < cfg.steps % len(blocks))
        for i in range(n_steps):
            still = (z == mask_token_id) & in_block
            if not still.any():
                break
            steps_run += 1
            if not (cfg.use_cache and cached_input is not None):
                cached_logits = model(z, attention_mask) if attention_mask is not None else model(z)
                if cfg.use_cache:  # rows are written into it later: our own copy, not the model's tensor
                    cached_logits = cached_logits.clone()
                cached_input = z.clone()
                calls, rows_computed = calls + 1, rows_computed + B
            else:
                changed = (z != cached_input).any(1).nonzero().squeeze(1)
                if changed.numel():
                    sub = z.index_select(0, changed)
                    cached_logits[changed] = model(sub, attention_mask.index_select(0, changed)) \
                        if attention_mask is not None else model(sub)
                    cached_input[changed] = sub
                    calls, rows_computed = calls + 1, rows_computed + changed.numel()
            m_now, m_next = masked_fraction(schedule, i / n_steps), masked_fraction(schedule, (i + 1) / n_steps)
            if cfg.method == "ancestral":
                p_reveal = (m_now - m_next) / m_now if m_now > 0 else 1.0
                commit = still & (rng.grid(B, L) < p_reveal)
                tokens, _ = _draw(cached_logits, commit, cfg, rng, banned)
            else:
                tokens_all, conf = _draw(cached_logits, still, cfg, rng, banned)
                if cfg.method == "random":
                    conf = rng.rows(still.sum(1).tolist(), 1).squeeze(1)
                # Commit round(total * (1 - m_next)) tokens by the end of this step, in confidence order.
                target = (total.double() * (1.0 - m_next)).round().long()
                n_now = (target - (total - still.sum(1))).clamp(min=0)  # (B,)
                score = torch.full((B, L), -math.inf, dtype=torch.float64, device=z.device)
                score[still] = conf
                rank = torch.sort(score, dim=1, descending=True, stable=True).indices.argsort(1)
                commit = still & (rank < n_now[:, None])
                tokens = tokens_all[commit[still]]
            z[commit] = tokens
    return SampleOutput(z, calls, steps_run, rows_computed)


@torch.no_grad()
def ancestral_sample(model, schedule: NoiseSchedule, num_samples: int, seq_len: int, mask_token_id: int,
                     steps: int = 64, temperature: float = 1.0, generator: torch.Generator | None = None,
                     forbidden_token_ids: tuple = (), device=None) -> torch.Tensor:
    """Draw ``num_samples`` sequences of ``seq_len`` tokens in ``steps`` reverse steps from all-[MASK]."""
    device = device or next(model.parameters()).device
    canvas = torch.full((num_samples, seq_len), mask_token_id, dtype=torch.long, device=device)
    cfg = SamplerConfig(steps=steps, method="ancestral", step_schedule=schedule, temperature=temperature,
                        forbidden_token_ids=tuple(forbidden_token_ids))
    return generate(model, canvas, mask_token_id, cfg, generator).ids


@torch.no_grad()
def ar_generate(model, prompt: torch.Tensor, length: int, cfg: SamplerConfig, generator=None) -> torch.Tensor:
    """Left-to-right sampling from a causal model: (B, P) prompt -> (B, length) with the prompt as its prefix."""
    z, B = prompt.clone(), prompt.shape[0]
    rng = RowRandom(generator, B, z.device)
    take_last = torch.zeros(B, 1, dtype=torch.bool, device=z.device)
    take_last[:, -1] = True
    while z.shape[1] < length:
        logits = model(z)[:, -1:]  # (B, 1, V)
        tokens, _ = _draw(logits, take_last, cfg, rng, cfg.forbidden_token_ids)
        z = torch.cat([z, tokens[:, None]], 1)
    return z


def sample_generators(seed: int, indices, device="cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, the sample's global index): the same sample on any process."""
    return [keyed_generator(seed, int(i), salt=1, device=device) for i in indices]


def build_canvas(tokenizer, seq_len: int, prompt: str = "", template: str = "") -> torch.Tensor:
    """(L,) canvas: a template with ``[MASK]`` wherever text is to be generated (any infilling pattern), or a
    prompt prefix followed by masks up to ``seq_len``, or all masks."""
    mask = tokenizer.mask_token_id
    if template:
        ids = tokenizer(template, add_special_tokens=False)["input_ids"]
        if mask not in ids:
            raise ValueError(f"--template: no {tokenizer.mask_token} in {template!r}; nothing to generate")
        return torch.tensor(ids)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if len(ids) >= seq_len:
        raise ValueError(f"--prompt: {len(ids)} tokens leave nothing to generate in --seq-len {seq_len}")
    return torch.tensor(ids + [mask] * (seq_len - len(ids)), dtype=torch.long)


@torch.no_grad()
def sample_checkpoint(model, tokenizer, indices: list[int], cfg: SamplerConfig, seed: int, canvas: torch.Tensor,
                      batch_size: int = 8, first_tokens: list[int] | None = None) -> tuple[list[dict], int]:
    """Samples ``indices`` of a run (diffusion or, with ``model.config.causal``, AR) as
    [{index, ids, text}], plus the number of network calls made (AR: one per generated token).

    An AR model trained on packed rows never learns p(first token of a row): without a prompt, AR sample i starts
    from ``first_tokens[i % len]`` (the first tokens of validation rows), else from BOS, which is out of
    distribution for corpora packed without one (the Markov corpus).
    """
    device = next(model.parameters()).device
    out, calls = [], 0
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo:lo + batch_size]
        gens = sample_generators(seed, idx, device)
        rows = canvas.to(device).expand(len(idx), -1).clone()
        if model.config.causal:
            fixed = int((rows[0] != tokenizer.mask_token_id).long().cumprod(0).sum())  # the prompt prefix
            if (rows[0, fixed:] != tokenizer.mask_token_id).any():
                raise ValueError("an autoregressive checkpoint can only continue a prefix, not fill a template")
            if fixed:
                prompt = rows[:, :fixed]
            elif first_tokens:
                prompt = torch.tensor([[first_tokens[i % len(first_tokens)]] for i in idx], device=device)
            else:
                prompt = torch.full((len(idx), 1), tokenizer.bos_token_id, device=device)
            special = (tokenizer.mask_token_id, tokenizer.bos_token_id)
            ar_cfg = replace(cfg, forbidden_token_ids=tuple(cfg.forbidden_token_ids) + special)
            ids = ar_generate(model, prompt, rows.shape[1], ar_cfg, gens)
            calls += rows.shape[1] - prompt.shape[1]
        else:
            res = generate(model, rows, tokenizer.mask_token_id, cfg, gens)
            ids, calls = res.ids, calls + res.network_calls
        for i, row in zip(idx, ids.tolist()):
            out.append({"index": i, "ids": row, "text": tokenizer.decode(row, skip_special_tokens=True)})
    return out, calls


# ------------------------------------------------------------------------------------------------ block diffusion
# BD3-LM sampling: blocks of L' tokens left to right; inside a block any sampler above fills an all-[MASK] block
# given the clean blocks before it. With the KV cache each finished block is run once through the model to append
# its keys and values (its queries attend the cache and the block: the training mask's clean stream), and every
# denoising step runs over the L' block positions only; without it every step reruns the whole prefix under
# ``tdlm.objective.prefix_block_mask``. Both compute the same attention, so they give the same samples.


@dataclass
class BlockSampleOutput:
    ids: torch.Tensor          # (B, N) generated tokens; a stopped row's tokens after its stop are pad_token_id
    lengths: torch.Tensor      # (B,) tokens kept per row (up to and including its EOS)
    network_calls: int         # forwards, the cache appends included
    blocks_run: int


class _BlockDenoiser:
    """What ``generate`` calls for one block: logits (n, L', V) of the noisy block given the clean prefix.
    ``generate`` passes its per-row second argument index-selected to the rows it recomputes (its no-change
    cache); the block sampler passes the row indices there, so the prefix of the right rows is attended."""

    def __init__(self, model, prefix: torch.Tensor, cache, block_size: int):
        self.model, self.prefix, self.cache, self.block_size = model, prefix, cache, block_size
        self.config = model.config  # generate reads the step schedule from it

    def __call__(self, block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows[:, 0]
        P, n, device = self.prefix.shape[1], block.shape[0], block.device
        if self.cache is not None:
            self.cache.rows = rows
            try:
                return self.model(block, position_ids=torch.arange(P, P + self.block_size, device=device),
                                  kv_cache=self.cache)
            finally:
                self.cache.rows = None
        from .objective import prefix_block_mask

        x = torch.cat([self.prefix.index_select(0, rows), block], 1)
        last = (torch.arange(n, device=device)[:, None] * x.shape[1] + torch.arange(P, x.shape[1], device=device))
        logits = self.model(x, prefix_block_mask(P, self.block_size, device)[None], logits_index=last.flatten())
        return logits.view(n, self.block_size, -1)


@torch.no_grad()
def block_generate(model, num_samples: int, max_tokens: int, block_size: int, mask_token_id: int,
                   cfg: SamplerConfig, generator=None, use_kv_cache: bool = True, eos_token_id: int | None = None,
                   min_entropy: float = 0.0, entropy_window: int = 256, pad_token_id: int = 0,
                   prompt: torch.Tensor | None = None) -> BlockSampleOutput:
    """Block-by-block generation of rows of up to ``max_tokens`` tokens (the model's max_seq_len bounds them),
    ``cfg.steps`` denoising steps per block with ``cfg.method``.

    ``prompt`` (B, P) starts every row: its whole blocks enter the clean prefix block by block (as in training,
    blocks sit at multiples of L'), and its tail is the fixed start of the first generated block, which ``generate``
    never changes. The returned rows include the prompt.

    Variable length (BD3-LM ``_check_stop_conds``): a row stops at its first ``eos_token_id`` (kept), or, with
    ``min_entropy`` > 0, when the unigram entropy of its last ``entropy_window`` tokens falls below
    ``min_entropy`` nats (a degenerate, repeating sample; BD3-LM uses 4 nats over 256 GPT-2 tokens). Generation
    ends when every row has stopped; a stopped row's later tokens are returned as ``pad_token_id``.

    A backbone without ``supports_kv_cache`` (the Hugging Face ones) samples uncached: the same samples, slower."""
    device = next(model.parameters()).device
    use_kv_cache = use_kv_cache and getattr(model, "supports_kv_cache", False)
    cfg = replace(cfg, block_length=0)
    blocks = math.ceil(max_tokens / block_size)
    if blocks * block_size > model.config.max_seq_len:
        raise ValueError(f"--seq-len: {blocks * block_size} tokens exceed the model's max_seq_len "
                         f"{model.config.max_seq_len}")
    from .gen_metrics import unigram_entropy  # the sample entropy eval/gen_ppl.py reports
    from .model import KVCache

    cache = KVCache() if use_kv_cache else None
    prompt = torch.empty(num_samples, 0, dtype=torch.long, device=device) if prompt is None else prompt.to(device)
    full = prompt.shape[1] // block_size
    z = prompt[:, :full * block_size]
    stop = torch.full((num_samples,), max_tokens, dtype=torch.long, device=device)  # tokens kept per row
    rows = torch.arange(num_samples, device=device)[:, None]
    calls = blocks_run = 0

    def append(block: torch.Tensor, end: int) -> int:
        """A finished (clean) block into the KV cache, its queries attending the cache and itself; no logits."""
        if cache is None:
            return 0
        cache.recording = True
        model(block, position_ids=torch.arange(end - block_size, end, device=device), kv_cache=cache,
              logits_index=torch.empty(0, dtype=torch.long, device=device))
        cache.recording = False
        return 1

    for b in range(full):
        calls += append(prompt[:, b * block_size:(b + 1) * block_size], (b + 1) * block_size)
    for b in range(full, blocks):
        canvas = torch.full((num_samples, block_size), mask_token_id, dtype=torch.long, device=device)
        tail = prompt[:, z.shape[1]:z.shape[1] + block_size]
        canvas[:, :tail.shape[1]] = tail
        res = generate(_BlockDenoiser(model, z, cache, block_size), canvas, mask_token_id, cfg, generator, rows)
        z, calls, blocks_run = torch.cat([z, res.ids], 1), calls + res.network_calls, blocks_run + 1
        calls += append(res.ids, z.shape[1])
        end = z.shape[1]
        if eos_token_id is not None:
            is_eos = (res.ids == eos_token_id) & (canvas == mask_token_id)  # generated tokens only
            first = is_eos.long().argmax(1) + end - block_size + 1
            stop = torch.where(is_eos.any(1) & (stop == max_tokens), first, stop)
        if min_entropy > 0 and end >= entropy_window:
            low = torch.tensor([unigram_entropy(row) < min_entropy for row in z[:, end - entropy_window:].tolist()],
                               device=device)
            stop = torch.where(low & (stop == max_tokens), torch.full_like(stop, end), stop)
        if (stop < max_tokens).all():
            break
    z, stop = z[:, :max_tokens], stop.clamp(max=min(z.shape[1], max_tokens))
    kept = torch.arange(z.shape[1], device=device)[None] < stop[:, None]
    return BlockSampleOutput(torch.where(kept, z, pad_token_id), stop, calls, blocks_run)


@torch.no_grad()
def block_sample_checkpoint(model, tokenizer, indices: list[int], cfg: SamplerConfig, seed: int, max_tokens: int,
                            block_size: int, batch_size: int = 8, use_kv_cache: bool = True,
                            stop_at_eos: bool = False, min_entropy: float = 0.0, entropy_window: int = 256,
                            prompt: torch.Tensor | None = None) -> tuple[list[dict], int]:
    """``sample_checkpoint`` for block diffusion: samples ``indices`` by ``block_generate`` (sample i from its own
    generator, so batch- and process-independent) after ``prompt`` (P,), [{index, ids, text}] cut at each row's
    stop, and the network calls made."""
    device = next(model.parameters()).device
    out, calls = [], 0
    for lo in range(0, len(indices), batch_size):
        idx = indices[lo:lo + batch_size]
        res = block_generate(model, len(idx), max_tokens, block_size, tokenizer.mask_token_id, cfg,
                             sample_generators(seed, idx, device), use_kv_cache,
                             tokenizer.eos_token_id if stop_at_eos else None, min_entropy, entropy_window,
                             tokenizer.pad_token_id, None if prompt is None else prompt.expand(len(idx), -1))
        calls += res.network_calls
        for i, row, n in zip(idx, res.ids.tolist(), res.lengths.tolist()):
            out.append({"index": i, "ids": row[:n], "text": tokenizer.decode(row[:n], skip_special_tokens=True)})
    return out, calls
