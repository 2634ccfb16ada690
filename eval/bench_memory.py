"""Peak memory (RSS) on CPU: a 125M-parameter training step at L=1024, tdlm vs BERT, and the quickstart training.

    python eval/bench_memory.py                      # both parts, JSON out (the demo part runs all 600 steps)
    python eval/bench_memory.py --skip-demo --batch 1 2
    python eval/bench_memory.py --skip-step --demo-steps 30       # a short demo run

RSS is a property of a process, so each figure comes from a fresh child process (``ru_maxrss`` of that child,
which also reports its RSS right after imports and after building the model, to split the peak into parts). Peak
memory does not depend on the machine's load, so unlike the throughput benchmarks these need no interleaving;
the ratio is tdlm / BERT at the same shape, batch and optimizer (fused AdamW, fp32).

Step: 12 layers x 768, 12 heads, vocab 50304 (tied), L=1024 (eval/bench_train.py's gpu-125m shape, fp32 on CPU),
``--steps`` optimizer steps (the first allocates AdamW's state). Demo: ``tdlm/train.py configs/quickstart.yaml``
(what ``make demo`` launches) with ``trainer.max_steps=--demo-steps`` (600, the demo's own), wandb off, into a
temporary directory with an empty data cache, so the data preparation (BPE training, tokenization, packing)
happens in the same process as on a fresh checkout; then ``--demo-cached-steps`` more steps in a new process
reusing that cache (0 = skip), to tell the data preparation's share of the peak from the training's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, emit, machine_state, peak_rss_mb, set_threads


def _child_step(kind: str, batch: int, steps: int, threads: int) -> dict:
    import bench_train as bt

    set_threads(threads)
    rss_imports = peak_rss_mb()
    a = bt.parse(["--preset", "cpu", "--layers", "12", "--hidden", "768", "--heads", "12", "--vocab", "50304",
                  "--seq-len", "1024", "--batch", str(batch)])
    model = bt.build_tdlm(a) if kind == "tdlm" else bt.build_bert(a)
    rss_model = peak_rss_mb()
    stub = bt.SimpleNamespace(pad_id=bt.PAD_ID, mask_id=bt.MASK_ID, causal=False,
                              schedule=bt.make_schedule("linear"), cfg=bt.RunConfig())
    step = bt.make_step(model, bt.tdlm_loss(stub) if kind == "tdlm" else bt.bert_loss, bt.OptimSection(), None)
    batches = bt.make_batches(a, "cpu", n=steps)
    secs = []
    for b in batches:
        t0 = time.perf_counter()
        step(b)
        secs.append(round(time.perf_counter() - t0, 2))
    return {"params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "rss_after_imports_mb": round(rss_imports), "rss_after_model_mb": round(rss_model),
            "peak_rss_mb": round(peak_rss_mb()), "step_seconds": secs}


def _child_demo(steps: int, out_dir: str) -> dict:
    import runpy

    rss_start = peak_rss_mb()
    cache = Path(out_dir) / "data_cache"
    cached = cache.is_dir()
    sys.argv = ["tdlm/train.py", "configs/quickstart.yaml", f"trainer.max_steps={steps}", "trainer.run_name=bench",
                f"trainer.output_dir={out_dir}", "trainer.overwrite=true", "wandb.enabled=false",
                "trainer.progress_bar=false", "metrics.console=false", f"data.cache_dir={cache}"]
    t0 = time.perf_counter()
    try:
        runpy.run_path(str(ROOT / "tdlm" / "train.py"), run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
    return {"steps": steps, "data_cache_present_before": cached, "rss_at_start_mb": round(rss_start),
            "peak_rss_mb": round(peak_rss_mb()), "wall_s": round(time.perf_counter() - t0, 1)}


def child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is its JSON."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}  # as the Makefile
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(a) -> dict:
    threads = set_threads(a.threads)
    out = {"benchmark": "peak_rss", "machine_before": machine_state(threads)}
    if not a.skip_step:
        step = {}
        for b in a.batch:
            res = {k: child(["step", k, str(b), str(a.steps), str(threads)]) for k in ("tdlm", "bert")}
            res["peak_rss_ratio_tdlm_vs_bert"] = round(res["tdlm"]["peak_rss_mb"] / res["bert"]["peak_rss_mb"], 3)
            step[f"batch_{b}"] = res
        out["step_125m_L1024_fp32"] = step
    if not a.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            out["quickstart_training"] = child(["demo", str(a.demo_steps), tmp])
            if a.demo_cached_steps:
                out["quickstart_training_data_cached"] = child(["demo", str(a.demo_cached_steps), tmp])
    out["machine_after"] = machine_state(threads)
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--demo-steps", type=int, default=600)
    p.add_argument("--demo-cached-steps", type=int, default=30)
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        res = _child_step(rest[0], int(rest[1]), int(rest[2]), int(rest[3])) if kind == "step" \
            else _child_demo(int(rest[0]), rest[1])
        print(json.dumps(res))
    else:
        emit(run(parse()))
