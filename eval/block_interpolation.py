"""The block-diffusion interpolation experiment: one config trained at several L', scored and sampled the same way.

    python eval/block_interpolation.py                                     # configs/block_interpolation.yaml
    python eval/block_interpolation.py --block-sizes 1 4 16 64 --max-steps 300 --out docs/bench/block_interpolation.json

For each L' (``diffusion.block_size``; L' = seq_len is plain MDLM) and for the AR baseline (``model.causal=true``):
train (``tdlm/train.py``), score the validation split (``eval/perplexity.py``: the block NELBO bound, exact-k,
``--mc-passes`` passes; AR: exact), draw ``--num-samples`` samples of seq_len tokens with seq_len denoising steps in
all (L' per block; ``eval/generate.py``, KV cache) and score them under the AR run (``eval/gen_ppl.py``: gen-PPL,
unigram entropy). Each step is the CLI a user would run, in a subprocess; one JSON object is printed (and written
to ``--out``). Existing runs are reused, so a second call only re-scores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def cli(script: str, *args: str) -> dict:
    """Run ``script`` with ``--json`` style output and return its last stdout line as JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"error: {script} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: dict, seq_len: int, path: Path) -> None:
    """Bound (AR: exact) perplexity, gen-PPL and sampling speed against L' (AR drawn as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = {r["block_size"]: r for r in rows.values() if r["block_size"]}
    xs = sorted(blocks)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("perplexity", "gen_ppl", "sampling_tokens_per_s"),
                              ("validation perplexity (bound; AR exact)", "gen-PPL under the AR run",
                               "sampling tokens/s")):
        ax.plot(xs, [blocks[x][key] for x in xs], "o-", label="block diffusion")
        if "ar" in rows and rows["ar"][key] is not None:
            ax.axhline(rows["ar"][key], ls="--", color="gray", label="AR")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"block size L' (L = {seq_len}: MDLM)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "block_interpolation.yaml"))
    p.add_argument("--block-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-steps", type=int, default=0, help="0 = the config's")
    p.add_argument("--seed", type=int, default=None, help="trainer.seed of every run (runs under <output_dir>/seed_N)")
    p.add_argument("--mc-passes", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--out", help="JSON file for the table; a PNG plot is written beside it")
    a = p.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    seq_len, out_dir = cfg["data"]["seq_len"], ROOT / cfg["trainer"]["output_dir"]
    steps = [f"trainer.max_steps={a.max_steps}"] if a.max_steps else []
    if a.seed is not None:
        out_dir = out_dir / f"seed_{a.seed}"
        steps += [f"trainer.seed={a.seed}", f"trainer.output_dir={out_dir}"]
    arms = [("ar", ["model.causal=true"])] + [(f"block_{b}", [f"diffusion.block_size={b}"]) for b in a.block_sizes]
    rows = {}
    for name, extra in arms:
        run_dir = out_dir / name
        if not (run_dir / "checkpoints").is_dir():
            train = subprocess.run([sys.executable, str(ROOT / "tdlm" / "train.py"), a.config,
                                    f"trainer.run_name={name}", *extra, *steps], cwd=ROOT, capture_output=True,
                                   text=True)
            if train.returncode:
                sys.exit(f"error: training {name} failed:\n{train.stderr[-2000:]}")
        ppl = cli("eval/perplexity.py", "--checkpoint", str(run_dir), "--which", "latest", "--estimator", "exact-k",
                  "--mc-passes", str(a.mc_passes), "--json")
        samples = run_dir / "samples.jsonl"
        block = 0 if name == "ar" else min(int(name.split("_")[1]), seq_len)
        per_block = block if 0 < block < seq_len else seq_len
        gen = cli("eval/generate.py", "--checkpoint", str(run_dir), "--which", "latest", "--num-samples",
                  str(a.num_samples), "--steps", str(per_block), "--out", str(samples), "--json")
        quality = cli("eval/gen_ppl.py", "--samples", str(samples), "--scorer", str(out_dir / "ar"), "--json")
        rows[name] = {"block_size": block or None, "perplexity": ppl["perplexity"], "stderr": ppl["stderr"],
                      "kind": ppl["kind"], "gen_ppl": quality.get("gen_ppl"), "entropy": quality.get("unigram_entropy"),
                      "sampling_tokens_per_s": a.num_samples * seq_len / gen["seconds"],
                      "network_calls": gen["network_calls"]}
        print(name, json.dumps(rows[name]), file=sys.stderr)
    result = {"config": a.config, "max_steps": a.max_steps or cfg["trainer"]["max_steps"], "seed": a.seed,
              "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        plot(rows, seq_len, Path(a.out).with_suffix(".png"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
