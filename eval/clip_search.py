"""BD3-LM's clipped-schedule search for a block-diffusion checkpoint: which t bounds (``diffusion.t_clip``) give
the lowest variance of the training loss on validation batches (the criterion of BD3-LM's
``_clipped_schedule_search``, a proxy for the gradient variance). The search does not change the bound: the
reported NELBO always integrates over [t_min, 1].

    python eval/clip_search.py --checkpoint runs/block_interpolation/block_4 --bounds 0.3,0.8 0.45,0.95 0.1,0.9 --json

Each candidate (and the unclipped [t_min, 1]) is scored on the same rows with ``--passes`` noise draws per batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.likelihood import clipped_loss_spread, eval_split
from tdlm.model import noise_schedule
from tdlm.objective import effective_block_size
from tdlm.runs import load_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--which", default="latest", choices=["best", "latest"])
    p.add_argument("--bounds", nargs="+", default=["0.3,0.8", "0.45,0.95", "0.1,0.9", "0.2,1.0"],
                   help="candidates lo,hi with t_min <= lo < hi <= 1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-sequences", type=int, default=256)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    ck = load_checkpoint(a.checkpoint, a.which)
    mc, seq_len = ck.model.config, ck.config.data.seq_len
    block_size = effective_block_size(getattr(mc, "block_size", 0), seq_len)
    candidates = [tuple(float(v) for v in b.split(",")) for b in a.bounds]
    if not block_size or any(len(c) != 2 or not mc.t_min <= c[0] < c[1] <= 1.0 for c in candidates):
        print(f"error: need a block-diffusion checkpoint and --bounds lo,hi in [{mc.t_min}, 1]", file=sys.stderr)
        return 2
    rows = eval_split("validation", ck.tokenizer, seq_len, ck.config, max_sequences=a.max_sequences)[:]["input_ids"]
    tok = ck.tokenizer
    results = [clipped_loss_spread(ck.model, rows, tok.pad_token_id, tok.mask_token_id, block_size, noise_schedule(mc),
                                   mc.t_min, c, a.batch_size, a.passes) for c in [None, *candidates]]
    best = min(results[1:], key=lambda r: r["var"])
    out = {"checkpoint": str(ck.path), "block_size": block_size, "candidates": results, "best": best["bounds"]}
    print(json.dumps(out) if a.json else "\n".join(f"{r['bounds']}: loss {r['mean']:.4f} var {r['var']:.3e}"
                                                     for r in results) + f"\nlowest variance: {best['bounds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
