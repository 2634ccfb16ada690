"""Data pipeline at scale: peak resident memory of preparation and of a short training run at 1x and 8x corpus size,
and tokenize + pack throughput with 1 and 2 processes on the 8x corpus; JSON out.

    python eval/bench_data.py                       # 25 MB and 200 MB of text, seq_len 128, BPE vocab 4096
    python eval/bench_data.py --size-mb 40 --steps 20   # a quicker, smaller run

The corpus is generated on disk (``--work``, a temporary directory by default, removed afterwards): the stdlib
docstrings repeated into .txt files of blank-line-separated documents, ``--size-mb / 8`` for 1x and ``--size-mb``
for 8x. The 8x data are also trained with ``data.streaming: true`` (tokens/s of both, in the same run). Every
measurement is a fresh child process; peak RSS is its ``ru_maxrss`` (from ``wait4``, so it includes
pages of memory-mapped files that it touched) and the largest anonymous RSS (``RssAnon``, sampled every 0.1 s).
Target: 8x / 1x <= 1.2 for both preparation and training. Throughput counts non-pad tokens written per second of
``tdlm.data.pack_documents`` (tokenize, pack, write the shards) on the 8x training split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_common import emit, machine_state

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(where: Path, megabytes: float) -> dict:
    """Stdlib docstrings, repeated in order until the files hold ``megabytes`` of text (16 MB per file)."""
    from tdlm.data import stdlib_docstrings

    docs, target, written, files = stdlib_docstrings(), int(megabytes * 2**20), 0, 0
    where.mkdir(parents=True, exist_ok=True)
    while written < target:
        with open(where / f"part-{files:04d}.txt", "w", encoding="utf-8") as f:
            part = 0
            while part < 16 * 2**20 and written < target:
                for doc in docs:
                    f.write(doc + "\n\n")
                    part += len(doc) + 2
                    written += len(doc) + 2
                    if written >= target:
                        break
        files += 1
    return {"megabytes": round(written / 2**20, 1), "files": files}


def measure(cmd: list[str], env: dict) -> dict:
    """Run a child to its end: wall time, its ru_maxrss (MB, from ``wait4``: the child and the workers it waited
    for) and the largest RssAnon sampled (MB); its last line of stdout parsed as JSON when it is one."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=ROOT)
        done, peak_anon = threading.Event(), [0]

        def sample():  # never waitpid here: wait4 below must be the one that reaps the child
            while not done.is_set():
                try:
                    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
                except OSError:
                    pass
                time.sleep(0.1)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    last = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
    result = json.loads(last) if last.startswith("{") else {}
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_rss_anon_mb": round(peak_anon[0] / 1024, 1), **result}


def child_prepare(corpus: str, out: str, num_proc: int) -> None:
    from tdlm.config import DataSection
    from tdlm.data import prepare_dataset

    cfg = DataSection(source="files", paths=[corpus], vocab_size=4096, seq_len=128, num_proc=num_proc)
    prepare_dataset(cfg, out, log=lambda *a: None)
    info = json.loads((Path(out) / "info.json").read_text())
    print(json.dumps({"train_tokens": info["num_train_tokens"],
                      "train_rows": info["num_train_blocks"], "documents": info["num_train_documents"]}))


def child_pack(corpus: str, prepared: str, out: str, num_proc: int) -> None:
    from transformers import AutoTokenizer

    from tdlm.config import DataSection
    from tdlm.data import _write_documents, iter_split, pack_documents

    cfg = DataSection(source="files", paths=[corpus])
    tok = AutoTokenizer.from_pretrained(str(Path(prepared) / "tokenizer"))
    docs = Path(out) / "documents.arrow"
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_documents(iter_split(cfg, "train"), docs)
    t0 = time.perf_counter()
    packed = pack_documents(docs, Path(out) / "rows", tok, 128, True, True, num_proc)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": round(seconds, 1), "tokens": packed["tokens"],
                      "tokens_per_s": round(packed["tokens"] / seconds)}))


def train_cmd(prepared: Path, work: Path, name: str, steps: int, streaming: bool = False) -> list[str]:
    """A tiny model (2 x 64) on the prepared data: ``steps`` steps of 16 x 128 tokens, two validation batches."""
    every = max(1, steps // 5)
    return [sys.executable, "tdlm/train.py", "configs/quickstart.yaml", "data.source=prepared",
            f"data.paths=[{prepared}]", f"data.streaming={str(streaming).lower()}", "model.hidden_size=64",
            "model.num_layers=2", "model.num_heads=2", f"trainer.max_steps={steps}",
            f"trainer.eval_every_n_steps={steps}", f"trainer.save_every_n_steps={steps}",
            f"metrics.logging_steps={every}", f"metrics.detailed_metrics_steps={steps}",
            f"metrics.attention_analysis_steps={steps}", "data.eval_batches=2", "sample.at_end=0",
            "wandb.enabled=false", "optim.warmup_steps=5", f"trainer.output_dir={work / 'runs'}",
            f"trainer.run_name={name}", "trainer.overwrite=true", "trainer.progress_bar=false"]


def tokens_per_s(run_dir: Path) -> float:
    """Median of the logged train/tokens_per_second after the first logging window (start-up)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["train/tokens_per_second"] for r in rows if "train/tokens_per_second" in r][1:]
    return round(sorted(values)[len(values) // 2]) if values else float("nan")


def streaming_vs_mmap(work: Path, steps: int, env: dict) -> dict:
    """The 8x data trained both ways, one after the other: shuffled memory-mapped rows and data.streaming."""
    out = {}
    for mode in ("mmap", "streaming"):
        name = f"train_x8_{mode}"
        out[mode] = measure(train_cmd(work / "prepared_x8", work, name, steps, mode == "streaming"), env)
        out[mode]["tokens_per_s"] = tokens_per_s(work / "runs" / name)
    return out


def run(a) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    me = [sys.executable, str(Path(__file__).resolve())]
    work = Path(a.work or tempfile.mkdtemp(prefix="tdlm_bench_data_"))
    result: dict = {"benchmark": "data_at_scale", "machine_before": machine_state(1), "sizes": {}}
    try:
        if a.streaming_only:  # on the prepared 8x data an earlier run left in --work
            result["streaming_vs_mmap_x8"] = streaming_vs_mmap(work, a.steps, env)
            return result
        for name, mb in (("x1", a.size_mb / 8), ("x8", a.size_mb)):
            corpus, prepared = work / f"corpus_{name}", work / f"prepared_{name}"
            entry = {"corpus": write_corpus(corpus, mb)}
            entry["prepare"] = measure(me + ["--child", "prepare", str(corpus), str(prepared)], env)
            entry["train"] = measure(train_cmd(prepared, work, f"train_{name}", a.steps), env)
            result["sizes"][name] = entry
        x1, x8 = result["sizes"]["x1"], result["sizes"]["x8"]
        result["ratio_8x_vs_1x"] = {part: round(x8[part]["peak_rss_mb"] / x1[part]["peak_rss_mb"], 3)
                                    for part in ("prepare", "train")}
        result["target_met"] = all(r <= 1.2 for r in result["ratio_8x_vs_1x"].values())
        result["streaming_vs_mmap_x8"] = streaming_vs_mmap(work, a.steps, env)
        result["throughput_x8"] = {f"num_proc_{n}": measure(me + ["--child", "pack", str(work / "corpus_x8"),
                                                                  str(work / "prepared_x8"), str(work / f"pack{n}"),
                                                                  str(n)], env) for n in (1, 2)}
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        result["machine_after"] = machine_state(1)
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=200.0, help="text at 8x; 1x is an eighth of it")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--work", default="", help="keep the corpora and prepared data here (default: a temp dir)")
    p.add_argument("--streaming-only", action="store_true",
                   help="only train the 8x data memory-mapped and streaming (prepared in --work by an earlier run)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.child:
        kind, *rest = args.child
        {"prepare": lambda c, o: child_prepare(c, o, 1), "pack": lambda c, p, o, n: child_pack(c, p, o, int(n))}[
            kind](*rest)
    else:
        emit(run(args))
