"""The gen-PPL / entropy frontier of one or more checkpoints: sample at several temperatures (or step counts),
score every batch with one local causal scorer, and plot gen-PPL against unigram entropy.

A single gen-PPL is easy to lower by lowering entropy (repetition); "Generative Frontiers" (arXiv:2604.02718)
argues that the pair is two parts of one KL to a reference and should be read as a curve. Each point is one
setting's samples under ``tdlm.gen_metrics`` (token-level gen-PPL, mean per-sample unigram entropy, repeated
4-grams); samples are drawn with ``tdlm.sampling`` (Gumbel-max in float64, recorded as ``sampling_precision``:
float32 Gumbel lowers entropy, Zheng et al. 2024, arXiv:2409.02908), sample i seeded by (seed, i) as in
eval/generate.py, so the settings differ only in temperature or steps.
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError
from .gen_metrics import aggregate, score_samples
from .sampling import SamplerConfig, build_canvas, sample_checkpoint

SAMPLING_PRECISION = "float64 Gumbel-max (tdlm.sampling.gumbel_argmax)"


def frontier_points(ck, scorer, temperatures=(1.0,), steps_list=(64,), num_samples: int = 16, seed: int = 0,
                    method: str = "ancestral", batch_size: int = 8, seq_len: int = 0) -> list[dict]:
    """One point per (temperature, steps): gen-PPL, entropy, repetition and the recipe."""
    if not temperatures or not steps_list or num_samples < 1:
        raise ConfigError("--frontier: need at least one temperature, one step count and one sample")
    if any(t <= 0 for t in temperatures):
        raise ConfigError(f"--temperatures: must be > 0 (0 is greedy: one sample, no frontier), got {temperatures}")
    tok = ck.tokenizer
    seq_len = seq_len or (ck.config.data.seq_len if ck.config else ck.model.config.max_seq_len)
    first = None
    if ck.causal and ck.config is not None:  # AR samples start from validation rows' first tokens (generate.py)
        from .likelihood import eval_split

        first = [int(r[0]) for r in eval_split("validation", tok, seq_len, ck.config)["input_ids"]]
    points = []
    for steps in (steps_list if not ck.causal else steps_list[:1]):  # AR: one token per step, steps unused
        for temp in temperatures:
            cfg = SamplerConfig(steps=steps, method=method, temperature=temp, forbidden_token_ids=(tok.pad_token_id,))
            samples, calls = sample_checkpoint(ck.model, tok, list(range(num_samples)), cfg, seed,
                                               build_canvas(tok, seq_len), batch_size, first)
            agg = aggregate(score_samples([s["text"] for s in samples], scorer))
            points.append({**agg, "temperature": temp, "steps": None if ck.causal else steps,
                           "method": "autoregressive" if ck.causal else method, "seq_len": seq_len,
                           "network_calls": calls, "seed": seed, "sampling_precision": SAMPLING_PRECISION,
                           "example": samples[0]["text"][:160]})
    return points


def plot_frontier(curves: dict, path: Path) -> str:
    """``curves`` {label: points}: gen-PPL (log scale) against unigram entropy, one line per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in curves.items():
        pts = [p for p in pts if p["gen_ppl"] is not None]
        ax.plot([p["unigram_entropy"] for p in pts], [p["gen_ppl"] for p in pts], marker="o", label=label)
        for p in pts:
            ax.annotate(f"T={p['temperature']:g}" + (f",{p['steps']}st" if p["steps"] else ""),
                        (p["unigram_entropy"], p["gen_ppl"]), fontsize=7)
    ax.set_xlabel("unigram entropy per sample (nats)")
    ax.set_ylabel("gen-PPL (scorer)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name
