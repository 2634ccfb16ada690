"""Tokenize and pack a corpus into fixed-length blocks, saved as Arrow token shards that training memory-maps
(docs/data.md: the streamed pipeline, its memory, the checks on load).

    python data_prep/prepare.py --source stdlib --out data/stdlib --seq-len 128 --vocab-size 4096
    python data_prep/prepare.py --source files --paths a.txt b.jsonl --out data/mine --num-proc 2
    python data_prep/prepare.py --source hub --hub-name wikitext --hub-config wikitext-103-raw-v1 --out data/wt

Train on the result with ``data.source=prepared data.paths=[data/stdlib]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.config import ConfigError, DataSection  # noqa: E402
from tdlm.data import prepare_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", choices=["stdlib", "markov", "files", "hub"])
    p.add_argument("--paths", nargs="*", default=[])
    p.add_argument("--hub-name", default="")
    p.add_argument("--hub-config", default="")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", default="train", help="'train' (byte-level BPE) or a pretrained name/path")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--markov-tokens", type=int, default=400000)
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cfg = DataSection(source=a.source, paths=a.paths, hub_name=a.hub_name, hub_config=a.hub_config,
                      text_column=a.text_column, tokenizer=a.tokenizer, vocab_size=a.vocab_size, seq_len=a.seq_len,
                      packing=not a.no_packing, val_fraction=a.val_fraction, num_proc=a.num_proc,
                      markov_tokens=a.markov_tokens)
    try:
        out = prepare_dataset(cfg, a.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), **json.loads((Path(out) / "info.json").read_text())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
