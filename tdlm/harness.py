"""lm-evaluation-harness adapter (``lm_eval`` >= 0.4, the optional ``eval`` extra): a tdlm checkpoint as an lm-eval
model, registered as ``tdlm`` (``lm_eval --model tdlm --model_args checkpoint=RUN,mc_passes=32``) and driven by
``eval/harness.py``.

Every request is ``[BOS] context continuation`` in the checkpoint's tokenizer (the trainer's document framing);
the continuation's tokens are those of context+continuation after the context's (lm-eval's own split), and a
context too long for the model is cut from the left.

- ``loglikelihood``, masked diffusion: minus the conditional NELBO of the continuation given the context,
      -log p(c | x) <= E_{k ~ U{1..n}, |M| = k} [ (n/k) c_k sum_{i in M} -log p(c_i | x, c_{not M}) ]
  with only the n continuation positions ever masked and the context always visible: the exact-k estimator of
  ``tdlm.likelihood`` (``mc_passes`` passes, its stderr std/sqrt(K) kept in ``records``), the checkpoint's
  schedule and t_min. ``is_greedy``: one forward with the whole continuation masked; greedy iff the denoiser's
  argmax equals the continuation at every position (a parallel decode of all n tokens at once).
  A continuation longer than the model's length (n > L - 1) is an error: use ``loglikelihood_rolling``.
- ``loglikelihood_rolling``: the document as the trainer tokenizes it (``[BOS] text [EOS]``), cut into windows of
  the model's length (``tdlm.zero_shot.pack_blocks``, per document), each window scored as eval/perplexity.py
  scores a row (the NELBO bound of all its tokens; AR: exact NLL of each token after the window's first).
- ``generate_until``: tdlm's samplers on ``[BOS] context [MASK] * max_gen_toks`` (``steps``, ``method``,
  ``block_length`` for semi-AR blocks; lm-eval's ``temperature``, else greedy), cut at the first stop sequence
  (``until``) or EOS.
- AR checkpoints: exact log-likelihoods (stderr 0) and left-to-right sampling.

Noise never depends on the batch or the process: each request's masks come from a generator keyed by a hash of
its token ids (and the pass), so batching and any number of processes give the same numbers.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .accel import gather_objects
from .config import ConfigError
from .likelihood import NelboEstimator, sequence_ar_nll, sequence_nelbo
from .objective import autoregressive_outputs
from .runs import load_checkpoint
from .sampling import METHODS, SamplerConfig, sample_checkpoint
from .zero_shot import document_ids, pack_blocks


def content_key(*seqs: list[int]) -> int:
    """A 62-bit key from token ids: the same request gets the same noise wherever it is evaluated."""
    h = hashlib.blake2b(repr(seqs).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


@register_model("tdlm")
class TdlmLM(LM):
    def __init__(self, checkpoint=None, which: str = "best", mc_passes: int = 32, batch_size: int = 16,
                 seed: int = 0, steps: int = 0, method: str = "low_confidence", block_length: int = 0,
                 max_gen_toks: int = 64, accelerator=None, loaded=None, **_):
        super().__init__()
        mc_passes, batch_size, steps = int(mc_passes), int(batch_size), int(steps)
        if mc_passes < 1:
            raise ConfigError(f"--mc-passes: must be >= 1, got {mc_passes}")
        if batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
        if method not in METHODS:
            raise ConfigError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
        if accelerator is None:
            from .accel import eval_accelerator

            accelerator = eval_accelerator()
        self.accelerator = accelerator
        self.ck = loaded or load_checkpoint(checkpoint, which)
        self.model = self.ck.model.to(accelerator.device).eval()
        self.tok = self.ck.tokenizer
        self.causal, self.max_len = self.ck.causal, self.model.config.max_seq_len
        self.mc_passes, self.batch_size, self.seed = mc_passes, batch_size, int(seed)
        self.steps, self.method, self.block_length = steps, method, int(block_length)
        self.max_gen_toks = int(max_gen_toks)
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.records: list[dict] = []   # per request: type, loglikelihood, stderr, passes, tokens
        self.seconds = 0.0
        if not self.causal:
            from .model import noise_schedule

            mc = self.model.config
            self.estimator = NelboEstimator("exact-k", noise_schedule(mc), mc.t_min, self.seed, 1)

    # --- lm-eval's distributed hooks (evaluator.py gathers metrics through these) ---
    @property
    def device(self):
        return self.accelerator.device

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor.reshape(1) if tensor.dim() == 0 else tensor)

    def gather_object(self, obj, dst=0):
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self):
        self.accelerator.wait_for_everyone()

    # --- tokenization ---
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval's convention: trailing spaces of the context belong to the continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = self.tok(context, add_special_tokens=False)["input_ids"] if context else []
        return [self.tok.bos_token_id] + whole[:len(ctx)], whole[len(ctx):]

    def _batches(self, items: list, length):
        """Items in batches of ``batch_size``, longest first (less padding); yields (positions, items)."""
        order = sorted(range(len(items)), key=lambda i: -length(items[i]))
        for lo in range(0, len(order), self.batch_size):
            pos = order[lo:lo + self.batch_size]
            yield pos, [items[i] for i in pos]

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows], device=self.device)
        attn = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=self.device)
        return ids, attn

    # --- the three request types ---
    @torch.no_grad()
    def conditional_loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, float, bool]]:
        """(log-likelihood estimate, its stderr, is_greedy) of each (context ids, continuation ids)."""
        out = [None] * len(pairs)
        for pos, batch in self._batches(pairs, lambda p: len(p[0]) + len(p[1])):
            rows, cont = [], []
            for ctx, c in batch:
                if len(c) > self.max_len - 1:
                    raise ValueError(f"loglikelihood: a continuation of {len(c)} tokens does not fit the model's "
                                     f"length {self.max_len} after [BOS]; score long texts with loglikelihood_rolling")
                if not c:
                    raise ValueError("loglikelihood: an empty continuation has no likelihood to estimate")
                ctx = ctx[-(self.max_len - len(c)):]  # cut the context from the left
                rows.append(ctx + c)
                cont.append((len(ctx), len(c)))
            ids, attn = self._pad(rows)
            cmask = torch.zeros_like(attn)
            for b, (s, n) in enumerate(cont):
                cmask[b, s:s + n] = True
            if self.causal:
                o = autoregressive_outputs(self.model, ids, attn, attn)
                tgt = cmask[:, 1:]  # token j is predicted at j - 1
                ll = -(o.token_ce.double() * tgt).sum(1)
                greedy = ((o.logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~tgt).all(1)
                res = [(float(v), 0.0, bool(g)) for v, g in zip(ll, greedy)]
            else:
                keys = torch.tensor([content_key(r[:s], r[s:]) for r, (s, _) in zip(rows, cont)])
                sums = torch.stack([sequence_nelbo(self.model, ids, *self.estimator.noise(cmask, keys, p),
                                                   self.tok.mask_token_id, attn)
                                    for p in range(self.mc_passes)], 1)  # (B, K) NELBO per pass
                noisy = torch.where(cmask, torch.full_like(ids, self.tok.mask_token_id), ids)
                pred = self.model(noisy, attn).argmax(-1)
                greedy = ((pred == ids) | ~cmask).all(1)
                K = self.mc_passes
                se = sums.std(1) / math.sqrt(K) if K > 1 else torch.full((len(rows),), float("nan"))
                res = [(-float(m), float(s), bool(g)) for m, s, g in zip(sums.mean(1), se, greedy)]
            for i, r in zip(pos, res):
                out[i] = r
        return out

    @torch.no_grad()
    def rolling_loglikelihood(self, texts: list[str]) -> list[tuple[float, float, int]]:
        """(log-likelihood estimate, stderr, tokens scored) of each whole document, in windows of the model's
        length: the sum over windows (the bound of each window; AR exact)."""
        windows, owner = [], []
        for d, text in enumerate(texts):
            blocks = pack_blocks(document_ids(self.tok, [text]), self.max_len, self.tok.pad_token_id, "per-document")
            windows += [(b, content_key(b, [w])) for w, b in enumerate(blocks)]
            owner += [d] * len(blocks)
        per_window = [None] * len(windows)
        for pos, batch in self._batches(windows, lambda w: len(w[0])):
            ids = torch.tensor([b for b, _ in batch], device=self.device)
            valid = ids != self.tok.pad_token_id
            attn = None if bool(valid.all()) else valid
            if self.causal:
                nll, n = sequence_ar_nll(self.model, ids, valid, attn)
                sums = nll[:, None]
            else:
                keys = torch.tensor([k for _, k in batch])
                sums = torch.stack([sequence_nelbo(self.model, ids, *self.estimator.noise(valid, keys, p),
                                                   self.tok.mask_token_id, attn)
                                    for p in range(self.mc_passes)], 1)
                n = valid.sum(1)
            for i, s, t in zip(pos, sums, n):
                per_window[i] = (s, int(t))
        out = []
        for d in range(len(texts)):
            mine = [per_window[i] for i in range(len(windows)) if owner[i] == d]
            passes = torch.stack([s for s, _ in mine]).sum(0)  # (K,) the document's NELBO per pass
            K = passes.numel()
            se = float(passes.std() / math.sqrt(K)) if K > 1 else (0.0 if self.causal else float("nan"))
            out.append((-float(passes.mean()), se, sum(t for _, t in mine)))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        start = time.perf_counter()
        pairs = [self._encode_pair(*r.args) for r in requests]
        res = self.conditional_loglikelihood(pairs)
        for r, (ctx, c), (ll, se, g) in zip(requests, pairs, res):
            self.records.append({"type": "loglikelihood", "args": list(r.args), "loglikelihood": ll, "stderr": se,
                                 "is_greedy": g, "passes": 1 if self.causal else self.mc_passes, "tokens": len(c)})
        self.seconds += time.perf_counter() - start
        return [(ll, g) for ll, _, g in res]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        start = time.perf_counter()
        res = self.rolling_loglikelihood([r.args[0] for r in requests])
        for r, (ll, se, n) in zip(requests, res):
            self.records.append({"type": "loglikelihood_rolling", "args": [r.args[0][:80]], "loglikelihood": ll,
                                 "stderr": se, "passes": 1 if self.causal else self.mc_passes, "tokens": n})
        self.seconds += time.perf_counter() - start
        return [ll for ll, _, _ in res]

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        start = time.perf_counter()
        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_gen = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0
            if n_gen < 1 or n_gen > self.max_len - 1:
                raise ValueError(f"generate_until: max_gen_toks {n_gen} must be in [1, the model's length - 1 = "
                                 f"{self.max_len - 1}]")
            ctx = [self.tok.bos_token_id] + self.tok(context, add_special_tokens=False)["input_ids"]
            ctx = ctx[-(self.max_len - n_gen):]
            canvas = torch.tensor(ctx + [self.tok.mask_token_id] * n_gen)
            steps = self.steps or n_gen  # one token per step by default
            cfg = SamplerConfig(steps=steps, method=self.method, temperature=temperature,
                                block_length=self.block_length, forbidden_token_ids=(self.tok.pad_token_id,))
            samples, _ = sample_checkpoint(self.model, self.tok, [content_key(ctx, [n_gen])], cfg, self.seed, canvas, 1)
            gen = samples[0]["ids"][len(ctx):]
            if self.tok.eos_token_id in gen:
                gen = gen[:gen.index(self.tok.eos_token_id)]
            text = self.tok.decode(gen, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
            self.records.append({"type": "generate_until", "args": [context[-80:]], "text": text, "steps": steps})
        self.seconds += time.perf_counter() - start
        return out


def _summary(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": sum(vals) / len(vals), "max": max(vals), "n": len(vals)} if vals else None


def run_tasks(accelerator, checkpoint: str, tasks: list[str], include_path: str | None = None,
              mc_passes: int = 32, batch_size: int = 16, seed: int = 0, limit=None, steps: int = 0,
              method: str = "low_confidence", block_length: int = 0, max_gen_toks: int = 64,
              which: str = "best", loaded=None) -> tuple[dict, list[dict]]:
    """lm-eval's results for ``tasks`` plus the recipe and timing (the same dict on every process's return; only
    the main process gets lm-eval's results), and the per-request records of all processes."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path: {include_path} is not a directory")
    manager = None
    if include_path:  # indexing lm-eval's thousands of built-in tasks takes long: only when a task is not local
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)} (lm-eval's registry"
                          f"{' and ' + include_path if include_path else ''})")
    lm = TdlmLM(checkpoint, which, mc_passes, batch_size, seed, steps, method, block_length, max_gen_toks,
                accelerator=accelerator, loaded=loaded)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    # every process's distinct requests, in one order whatever the sharding. lm-eval pads the shorter shards with
    # copies of a request; a request's estimate is keyed by its tokens, so copies are identical and kept once.
    unique = {(r["type"], repr(r["args"])): r for r in gather_objects(accelerator, lm.records)}
    records = [unique[k] for k in sorted(unique)]
    n = len(records)
    out = {"checkpoint": str(lm.ck.path), "causal": lm.causal, "tasks": tasks,
           "results": (res or {}).get("results"), "mc_passes": 1 if lm.causal else mc_passes,
           "estimator": "exact-autoregressive" if lm.causal else "exact-k conditional NELBO",
           "distinct_requests": n, "seconds": lm.seconds,
           "seconds_per_100_requests": 100 * lm.seconds / max(1, len(lm.records)),  # this process's
           "loglikelihood_stderr": _summary([r["stderr"] for r in records if r["type"] == "loglikelihood"]),
           "rolling_stderr": _summary([r["stderr"] for r in records if r["type"] == "loglikelihood_rolling"]),
           "sampler": {"steps": steps or "one per generated token", "method": method, "block_length": block_length,
                       "gumbel": "float64"},
           "num_processes": accelerator.num_processes}
    return out, records
