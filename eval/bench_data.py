"""Tokenize + pack throughput of the data pipeline (``tdlm.data._tokenize_and_pack``, what ``data_prep/prepare.py``
runs per split) with 1 and with 2 processes, in one process, interleaved; JSON out.

    python eval/bench_data.py                       # stdlib docstrings x1 and x8, seq_len 128, BPE vocab 4096
    python eval/bench_data.py --repeat 1 4 16 --rounds 5

The corpus is the quickstart's (deduplicated stdlib docstrings, train split); ``--repeat k`` concatenates it k
times so that the fixed cost of starting a pool (about a second) can be told apart from throughput. The BPE
tokenizer is trained once, untimed. Timed: ``datasets.map`` tokenization, packing into seq_len blocks and the
index column; the save to disk is not (it is I/O, the same for both). tokens/s counts non-pad tokens out.
``TOKENIZERS_PARALLELISM`` is recorded: ``make`` sets it to false, so one process tokenizes on one thread.
"""

from __future__ import annotations

import argparse
import os

from bench_common import emit, interleaved, machine_state, median, ratio, set_threads, spread
from tdlm.data import _tokenize_and_pack, hash_split, stdlib_docstrings, train_bpe_tokenizer


def count_tokens(ds, pad: int) -> int:
    return sum(sum(1 for t in row if t != pad) for row in ds["input_ids"])


def run(a) -> dict:
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    threads = set_threads(a.threads)
    before = machine_state(threads)
    train, _ = hash_split(stdlib_docstrings(), 0.05)
    train = train[: a.max_documents or None]
    tok = train_bpe_tokenizer(train, a.vocab_size)
    results = {}
    for k in a.repeat:
        texts = train * k
        out: dict = {}

        def arm(nproc):
            def go(i):
                out[nproc] = _tokenize_and_pack(texts, tok, a.seq_len, True, True, nproc)
            return go

        timing = interleaved({"num_proc_1": arm(1), "num_proc_2": arm(2)}, rounds=a.rounds, warmup=1,
                             cpus=os.cpu_count() or 1)
        tokens = {n: count_tokens(out[n], tok.pad_token_id) for n in (1, 2)}
        sec = timing["seconds"]
        results[f"x{k}"] = {
            "documents": len(texts), "characters": sum(map(len, texts)), "tokens": tokens[1],
            "num_proc_1": {"tokens_per_s": round(tokens[1] / median(sec["num_proc_1"])), **spread(sec["num_proc_1"])},
            "num_proc_2": {"tokens_per_s": round(tokens[2] / median(sec["num_proc_2"])), **spread(sec["num_proc_2"])},
            "speedup_2_vs_1": ratio(sec, "num_proc_1", "num_proc_2"), "cpu_share": timing["cpu_share"],
            "blocks": {"num_proc_1": len(out[1]), "num_proc_2": len(out[2])}}
    return {"benchmark": "tokenize_and_pack", "seq_len": a.seq_len, "vocab_size": len(tok), "rounds": a.rounds,
            "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "corpus": "stdlib docstrings",
            "results": results, "machine_before": before, "machine_after": machine_state(threads)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-documents", type=int, default=0, help="0 = the whole corpus")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    emit(run(parse()))
