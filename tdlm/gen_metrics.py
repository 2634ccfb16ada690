"""Quality of generated text: generative perplexity under a causal scorer, unigram entropy and repetition.

gen-PPL = exp(sum of scorer NLL / number of scored tokens) over all samples, in float64 (MDLM/DUO's
token-level aggregation; SEDD's mean of per-sample perplexities gives other numbers). Texts are re-tokenized with
the scorer's tokenizer; for a HF scorer a BOS is prepended (GPT-2 style: its EOS when it has no BOS) so that the
first token is scored too, for an AR checkpoint of ours the first token is context only (as in its exact val loss);
texts longer than the scorer's context are scored in consecutive windows. Low gen-PPL with low
entropy means repetition, so entropy (per-sample unigram entropy of the token counts, averaged, as DUO's
``record_entropy``) and the repeated n-gram rate are always reported beside it, on the same tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError


@dataclass
class Scorer:
    model: object
    tokenizer: object
    bos_id: int | None
    context: int
    name: str

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def load_scorer(path: str | Path | None) -> Scorer:
    """A causal LM from a local HF model directory, or one of our AR checkpoints (or AR run dir).

    Never downloads: a missing or non-causal scorer is an error, because gen-PPL without one is meaningless.
    """
    if not path:
        raise ConfigError("--scorer: gen-PPL needs a causal scorer (a local HF causal-LM directory or an AR "
                          "checkpoint of ours); refusing to report it without one")
    path = Path(path)
    if (path / "trainer_state.json").is_file() or (path / "checkpoints").is_dir():
        from .runs import load_checkpoint

        ck = load_checkpoint(path, "best")
        if not ck.causal:
            raise ConfigError(f"--scorer: {ck.path} is a masked-diffusion checkpoint; a scorer must be causal "
                              f"(model.causal=true)")
        # No BOS: our packed rows start mid-document (and Markov rows never hold one), so the prediction after a
        # leading BOS is untrained; like the trainer's exact AR loss, the first token of a window is not scored.
        return Scorer(ck.model, ck.tokenizer, None, ck.model.config.max_seq_len, str(ck.path))
    if not (path / "config.json").is_file():
        raise ConfigError(f"--scorer: {path} is neither a local HF model directory (config.json) nor a checkpoint")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # missing weights/tokenizer files, unknown architecture
        raise ConfigError(f"--scorer: cannot load a causal LM from {path}: {str(exc).splitlines()[0]}") from None
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    cfg = model.config
    context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
    return Scorer(model, tok, bos, int(context), str(path))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def score_text(scorer: Scorer, ids: list[int]) -> tuple[float, int]:
    """(sum of NLL in nats, number of scored tokens) of one tokenized text, float64.

    Consecutive windows of the scorer's context are scored independently (MDLM's chunking), each after the BOS;
    without a BOS the first token of every window has no context and is not scored.
    """
    prefix = [scorer.bos_id] if scorer.bos_id is not None else []
    width = scorer.context - len(prefix)
    nll, count = 0.0, 0
    for s in range(0, len(ids), width):
        x = torch.tensor([prefix + ids[s:s + width]])
        if x.shape[1] < 2:
            continue
        logp = _logits(scorer.model, x)[0, :-1].double().log_softmax(-1)  # (T-1, V)
        lp = logp.gather(1, x[0, 1:, None]).squeeze(1)
        nll -= float(lp.sum())
        count += lp.numel()
    return nll, count


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the token frequencies of one sample."""
    if not ids:
        return 0.0
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values())


def repetition_rate(ids: list[int], n: int = 4) -> float:
    """Fraction of the sample's n-grams that repeat an earlier one: 1 - distinct / total (0 = no repetition)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class SampleScore:
    index: int
    nll: float
    tokens: int
    entropy: float
    repetition: float


def score_samples(texts: list[str], scorer: Scorer, indices: list[int] | None = None, rep_n: int = 4) -> list:
    out = []
    for i, text in zip(indices if indices is not None else range(len(texts)), texts):
        ids = scorer.encode(text)
        nll, count = score_text(scorer, ids)
        out.append(SampleScore(i, nll, count, unigram_entropy(ids), repetition_rate(ids, rep_n)))
    return out


def aggregate(scores: list[SampleScore], rep_n: int = 4) -> dict:
    """gen-PPL over all scored tokens and the mean per-sample entropy / repetition, in index order."""
    scores = sorted(scores, key=lambda s: s.index)
    nll = math.fsum(s.nll for s in scores)
    tokens = sum(s.tokens for s in scores)
    n = max(1, len(scores))
    return {"gen_ppl": math.exp(nll / tokens) if tokens else None, "gen_nll_per_token": nll / tokens if tokens
            else None, "scored_tokens": tokens, "num_samples": len(scores),
            "unigram_entropy": math.fsum(s.entropy for s in scores) / n,
            f"repetition_rate_{rep_n}gram": math.fsum(s.repetition for s in scores) / n,
            "aggregation": "exp(sum NLL / sum tokens) over all samples"}
