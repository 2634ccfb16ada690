"""GPU readiness check: training speed, MFU and memory, sampling speed and a short convergence run on one CUDA GPU,
in one call from the repository root, with no network; one JSON file per part plus a summary (docs/performance.md).

    python eval/gpu_check.py [OUT]                 # one CUDA GPU: at most 8 minutes; OUT defaults to gpu_results/
    python eval/gpu_check.py --dry-run [OUT]       # the same parts on CPU at toy shapes (tests/test_gpu_check.py)
    python eval/gpu_check.py --wheels DIR [OUT]    # first install what is missing from the wheels in DIR (no index)

Parts, in order, each a subprocess under its own time limit (printed with its time; a part that fails or runs
out of time is recorded in its JSON and the next part still runs; the limits add up to at most 8 minutes):
    install         pip install --no-index --no-deps --no-build-isolation -e .   (--dry-run: pip's own --dry-run)
    env             GPU, driver, torch, CUDA, cuDNN, bf16, flash SDPA (probed, not assumed); missing packages
    train           eval/bench_train.py --preset gpu-125m --ar --find-max-batch 1024: tdlm diffusion (eager),
                    tdlm AR, HF BertForMaskedLM of the same shape, and an HF Llama arm once bench_train.py has
                    one (``--llama``, the HF-backbone issue); tokens/s, model TFLOP/s, MFU against a bf16 matmul
                    peak measured in the same rounds, peak step memory, the largest micro-batch at L=1024
    train_compiled  the same with --compile (its own process: a compiler failure or hang cannot cost the above)
    sampling        eval/bench_sampling.py at the 125M shape, L=1024, batch 1 and 16, bf16
    convergence     tdlm/train.py configs/quickstart.yaml (stdlib corpus, built here) at 12 x 768, L=512, stopped
                    by SIGTERM at its wall budget (the trainer saves and exits); the perplexity bound exp(val/loss)
                    after N steps, and tokens/s
    fsdp            configs/accelerate/fsdp.yaml (FSDP2) on every GPU: a random 8 x 512 Llama adapted to diffusion
                    (configs/hf_adapt.yaml) for 20 steps, sharded checkpoint saved, then resumed for 10 more; its
                    consolidated export loaded back with AutoModelForCausalLM. Skipped by --dry-run: FSDP needs
                    CUDA (tdlm refuses it on CPU, docs/pretrained.md)

Needed beyond PyTorch and Accelerate (bring wheels for the machine's Python where it lacks them; ``env.json``
lists what is missing, and a part whose packages are missing is skipped with their names):
    transformers, safetensors, huggingface-hub, tokenizers  every part: tdlm's model is a transformers
        (and transformers' own: regex, typer, ...)          PreTrainedModel; the BERT arm
    pyyaml, tqdm                                            every part (tdlm.config, the trainer)
    datasets (and pyarrow, pandas, dill, multiprocess, ...) the convergence part
    setuptools (and wheel for setuptools < 70.1)            the editable install (--no-build-isolation)
Not needed: wandb (the convergence run sets wandb.enabled=false), deepspeed, scipy. For example:
    pip download -d wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        transformers datasets tokenizers safetensors pyyaml tqdm setuptools wheel
Every subprocess gets PYTHONPATH=<repository root>, so the parts run even if the editable install fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480  # the issue's limit for the whole check on the GPU

# import name -> (distribution, what needs it); the parts below name the imports they need
PACKAGES = {
    "torch": ("torch", "everything"),
    "accelerate": ("accelerate", "the trainer"),
    "transformers": ("transformers", "tdlm's model (a PreTrainedModel), the BERT arm"),
    "safetensors": ("safetensors", "transformers, checkpoints"),
    "huggingface_hub": ("huggingface-hub", "transformers, tokenizers"),
    "tokenizers": ("tokenizers", "the convergence run's BPE tokenizer"),
    "yaml": ("pyyaml", "tdlm.config"),
    "tqdm": ("tqdm", "transformers, the trainer"),
    "datasets": ("datasets", "the convergence run's data"),
    "setuptools": ("setuptools", "pip install --no-build-isolation -e ."),
    "wheel": ("wheel", "pip install --no-build-isolation -e . with setuptools < 70.1 only"),
    "wandb": ("wandb", "optional: not used here"),
    "deepspeed": ("deepspeed", "optional: not used here"),
}
BENCH = ("torch", "transformers", "safetensors", "huggingface_hub", "yaml", "tqdm")


def part_specs(dry: bool, py: str, work: Path) -> list[dict]:
    """Each part: name, command, time limit (s), the imports it needs, and an optional SIGTERM time (s).

    GPU limits: install 15 + env 15 + train 75 + train_compiled 110 + sampling 60 + convergence 140 + fsdp 60
    = 475 s.
    The dry run uses toy shapes and the aot_eager compile backend (inductor's C++ build alone would take longer
    than the whole dry run on a small CPU)."""
    toy = ["--preset", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "64", "--seq-len", "16",
           "--batch", "2", "--rounds", "2", "--warmup", "1", "--threads", "1"]
    gpu = ["--preset", "gpu-125m"]
    train = [py, "eval/bench_train.py", *(toy if dry else gpu), "--ar", "--hf", "--find-max-batch",
             "4" if dry else "1024"]
    compiled = [py, "eval/bench_train.py", *(toy if dry else [*gpu, "--rounds", "10"]), "--compile",
                *(["--compile-backend", "aot_eager"] if dry else [])]
    sampling = [py, "eval/bench_sampling.py", "--rounds", "1"] + (
        ["--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "64", "--seq-len", "8", "--threads", "1",
         "--batch", "2"] if dry else
        ["--device", "cuda", "--layers", "12", "--hidden", "768", "--heads", "12", "--vocab", "50304",
         "--seq-len", "1024", "--batch", "1", "16"])
    run_dir = work / "runs" / "gpu_check"
    conv = [py, "tdlm/train.py", "configs/quickstart.yaml", *(f"{k}={v}" for k, v in convergence_overrides(dry, work))]
    pip = [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    return [
        dict(name="install", cmd=pip + (["--dry-run"] if dry else []), limit=30 if dry else 15, needs=("setuptools",)),
        dict(name="env", cmd=[py, "eval/gpu_check.py", "--probe-env"], limit=30 if dry else 15, needs=("torch",)),
        dict(name="train", cmd=train, limit=90 if dry else 75, needs=BENCH),
        dict(name="train_compiled", cmd=compiled, limit=90 if dry else 110, needs=BENCH),
        dict(name="sampling", cmd=sampling, limit=60, needs=BENCH),
        dict(name="convergence", cmd=conv, limit=90 if dry else 140, term_after=70 if dry else 115,
             needs=(*BENCH, "accelerate", "datasets", "tokenizers"), run_dir=run_dir),
        dict(name="fsdp", cmd=[py, "eval/gpu_check.py", "--fsdp-run", str(work / "fsdp")], limit=60,
             needs=(*BENCH, "accelerate", "datasets", "tokenizers"),
             gpu_only="FSDP needs CUDA GPUs: on CPU the launch refuses it in one line (docs/pretrained.md)"),
    ]


def fsdp_run(work: Path, config_file: str = "fsdp.yaml", processes: int = 0, mixed_precision: str = "bf16",
             shape: dict | None = None) -> dict:
    """The fsdp part: FSDP2 over every visible GPU (``processes`` 0) on an adapted random Llama, 20 steps, then a
    resume to 30 from the sharded checkpoint, then the consolidated export loaded with the Auto class. The other
    arguments let tests/test_gpu_check.py run the same steps with a CPU launch config."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import run_overrides, tiny_model_dir  # the backbone tests' random models, at a larger shape

    model_dir = tiny_model_dir(work, "llama", **(shape or dict(hidden=512, layers=8, heads=8, positions=64)))
    processes = processes or torch.cuda.device_count()
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / config_file), "--num_processes", str(processes),
              "--mixed_precision", mixed_precision, str(ROOT / "tdlm" / "train.py"),
              str(ROOT / "configs" / "hf_adapt.yaml")]
    common = {"trainer.eval_every_n_steps": 10, "trainer.save_every_n_steps": 10, "metrics.logging_steps": 5,
              "metrics.detailed_metrics_steps": 10, "metrics.attention_analysis_steps": 10,
              "model.attention_anneal_steps": 0, "trainer.run_name": "fsdp"}
    t0 = time.perf_counter()
    for steps, extra in ((20, {}), (30, {"trainer.resume": "auto"})):
        args = run_overrides(work / "run", model_dir, **common, **extra, **{"trainer.max_steps": steps})
        subprocess.run([*launch, *args], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    run_dir = work / "run" / "runs" / "fsdp"
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = {r["step"]: r["val/loss"] for r in recs if "val/loss" in r}
    export = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(str(export))
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(3, 9)[None]).logits
    return {"processes": processes, "val_loss": val, "resumed_to": max(val),
            "export": str(export.parent.name), "export_parameters": sum(p.numel() for p in reloaded.parameters()),
            "export_logits_finite": bool(torch.isfinite(logits).all()), "seconds": round(time.perf_counter() - t0, 1)}


def convergence_overrides(dry: bool, work: Path) -> list[tuple[str, object]]:
    """The quickstart run at a GPU size (12 x 768, L=512, batch 32, bf16 by trainer.mixed_precision=auto) with a
    step horizon it will not reach: the SIGTERM at the wall budget stops it (the trainer saves, then exits 0).
    The corpus is small (~0.4M tokens), so the GPU run goes over it many times; the bound is the check that the
    trainer learns on the GPU at speed, not a quality figure."""
    size = dict(hidden_size=32, num_layers=1, num_heads=2, max_seq_len=128) if dry else \
        dict(hidden_size=768, num_layers=12, num_heads=12, max_seq_len=512)
    steps, every, log = (6, 3, 3) if dry else (4000, 200, 50)
    return [*((f"model.{k}", v) for k, v in size.items()),
            ("data.seq_len", size["max_seq_len"]), ("trainer.micro_batch_size", 8 if dry else 32),
            ("trainer.max_steps", steps), ("trainer.eval_every_n_steps", every),
            ("trainer.save_every_n_steps", 10**6), ("trainer.keep_last", 1), ("data.eval_batches", 2 if dry else 0),
            ("optim.lr", 2e-3 if dry else 6e-4), ("optim.warmup_steps", 2 if dry else 100),
            ("metrics.logging_steps", log), ("metrics.detailed_metrics_steps", every * 5),
            ("metrics.attention_analysis_steps", every * 5), ("metrics.console", "false"),
            ("trainer.output_dir", work / "runs"), ("trainer.run_name", "gpu_check"), ("trainer.overwrite", "true"),
            ("sample.at_end", 0), ("trainer.progress_bar", "false"), ("wandb.enabled", "false")]


# ----------------------------------------------------------------------------------------------------------
# Running parts


def missing_packages() -> dict:
    """Import name -> (distribution, what needs it), for the packages this interpreter cannot import."""
    return {m: v for m, v in PACKAGES.items() if importlib.util.find_spec(m) is None}


def versions() -> dict:
    out = {}
    for mod, (dist, _) in PACKAGES.items():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def child_env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # no network: nothing may wait on the hub; the BPE tokenizer's threads would fight the data workers
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def run_part(cmd: list[str], limit: float, log_stem: Path, env: dict | None = None,
             term_after: float | None = None) -> dict:
    """Run ``cmd`` in its own process group, stdout/stderr to ``<log_stem>.out/.err``. After ``term_after`` s it
    gets SIGTERM (a graceful stop it is expected to handle); at ``limit`` s the whole group is killed.
    Returns status (ok / failed / timeout), return code, seconds, and whether the SIGTERM was sent."""
    t0 = time.perf_counter()
    out_path, err_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        except OSError as exc:
            return {"status": "failed", "returncode": None, "seconds": 0.0, "limit_s": limit, "sigterm_sent": False,
                    "command": " ".join(map(str, cmd)), "error": f"{type(exc).__name__}: {exc}"}
        termed, rc = False, None
        try:
            rc = proc.wait(timeout=min(term_after, limit) if term_after else limit)
        except subprocess.TimeoutExpired:
            if term_after and term_after < limit:
                proc.send_signal(signal.SIGTERM)
                termed = True
                try:
                    rc = proc.wait(timeout=max(0.0, limit - (time.perf_counter() - t0)))
                except subprocess.TimeoutExpired:
                    pass
        if rc is None:  # out of time: the part and whatever it started (e.g. compile workers)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    return {"status": status, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "limit_s": limit,
            "sigterm_sent": termed, "command": " ".join(map(str, cmd))}


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def last_json(text: str) -> dict:
    """The JSON object a benchmark printed last on stdout (the libraries may print lines before it)."""
    starts = [0] if text.startswith("{") else []
    starts += [i + 1 for i in range(len(text)) if text.startswith("\n{", i)]
    for s in reversed(starts):
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[s:])
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON object on stdout")


def convergence_result(run_dir: Path, overrides: dict, rec: dict) -> dict:
    """What metrics.jsonl says: the bound exp(val/loss) at each evaluation, and the trainer's logged tokens/s."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [[r["step"], r["val/loss"], math.exp(r["val/loss"])] for r in rows if "val/loss" in r]
    tps = [r["train/tokens_per_second"] for r in rows if "train/tokens_per_second" in r]
    steps = max((r["step"] for r in rows), default=0)
    if not evals:
        raise ValueError(f"no evaluation in {run_dir / 'metrics.jsonl'} (stopped at step {steps})")
    best = min(evals, key=lambda e: e[1])
    tokens_per_step = int(overrides["trainer.micro_batch_size"]) * int(overrides["data.seq_len"])
    return {"benchmark": "convergence", "config": "configs/quickstart.yaml", "overrides": overrides,
            "steps": steps, "stopped_by": "wall budget (SIGTERM)" if rec["sigterm_sent"] else "max_steps",
            "bound_after_last_eval": {"step": evals[-1][0], "val_loss": evals[-1][1], "bound": evals[-1][2]},
            "best_bound": {"step": best[0], "val_loss": best[1], "bound": best[2]},
            "evals": evals, "tokens_per_step": tokens_per_step, "tokens_trained": steps * tokens_per_step,
            # the first logged window includes the first steps' warm-up (allocator, kernels); the median is robust
            "tokens_per_s_median": statistics.median(tps[1:] or tps) if tps else None,
            "tokens_per_s_logged": tps}


def probe_env() -> dict:
    """Run as ``--probe-env`` in a subprocess: CUDA is initialised there, never in the process that runs the parts
    (its context would hold GPU memory during them)."""
    import platform

    import torch

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "packages": versions(),
           "missing": {m: {"distribution": d, "needed_by": why} for m, (d, why) in missing_packages().items()}}
    try:
        import tdlm
        env["tdlm_imported_from"] = str(Path(tdlm.__file__).resolve().parent)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        env["tdlm_imported_from"] = f"import failed: {type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    if not torch.cuda.is_available():
        env["flash_sdpa"] = {"available": None, "why": "no CUDA device"}
        return env
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
               capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
               multiprocessors=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
    env["flash_sdpa"] = {"compiled_in": getattr(torch.backends.cuda, "is_flash_attention_available", lambda: None)(),
                         "enabled": torch.backends.cuda.flash_sdp_enabled()}
    # tdlm's attention at the 125M shape (head dim 64, bf16, no mask) with one backend allowed at a time, so a
    # backend that cannot run it raises instead of falling back
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None))):
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.cuda.synchronize()
            env["flash_sdpa"][f"{name}_runs"] = True
        except Exception as exc:  # noqa: BLE001
            env["flash_sdpa"][f"{name}_runs"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    env["flash_sdpa"]["available"] = env["flash_sdpa"]["flash_runs"] is True
    return env


# ----------------------------------------------------------------------------------------------------------
# Summary


def summarize(results: dict) -> dict:
    """The figures the GPU table needs, from the parts' JSON (absent where a part did not run)."""
    s: dict = {}
    env = results.get("env") or {}
    s["gpu"] = env.get("gpu") or ("none (CPU)" if env else None)
    s["torch"], s["cuda"], s["flash_sdpa"] = env.get("torch"), env.get("torch_cuda"), \
        (env.get("flash_sdpa") or {}).get("available")
    arms = {}
    for part in ("train", "train_compiled"):
        r = results.get(part) or {}
        mem = r.get("peak_step_memory_gib") or {}
        for name, a in (r.get("arms") or {}).items():
            if part == "train_compiled" and name != "tdlm_compiled":
                continue  # the eager arms are reported from the train part
            arms[name] = {"tokens_per_s": a["tokens_per_s"], "model_tflops_per_s": a["model_tflops_per_s"],
                          "mfu_measured_peak": a["mfu_model_flops"], "mfu_spec_peak": a.get("mfu_vs_spec_peak"),
                          "peak_step_memory_gib": mem.get(name)}
        if part == "train" and r:
            s["matmul_peak_tflops"] = max(v for k, v in r["matmul_peak"].items() if k.endswith("_tflops"))
            s["matmul_peak_shape"] = r["matmul_peak"]["shape"]
            s["diffusion_vs_ar"] = (r["ratios"].get("diffusion_vs_ar") or {}).get("of_medians")
            s["max_micro_batch"] = {k: v.get("max") for k, v in (r.get("max_micro_batch") or {}).items()}
        if part == "train_compiled" and r:
            s["compiled_vs_eager"] = (r["ratios"].get("compiled_vs_eager") or {}).get("of_medians")
            s["compile_s"] = r.get("tdlm_compiled_first_4_steps_s")
    s["arms"] = arms
    samp = (results.get("sampling") or {}).get("results") or {}
    s["sampling_samples_per_s"] = {b: {k: v["samples_per_s"] for k, v in r.items() if isinstance(v, dict)
                                       and "samples_per_s" in v} for b, r in samp.items()}
    if results.get("fsdp"):
        s["fsdp"] = results["fsdp"]
    conv = results.get("convergence") or {}
    if conv:
        last = conv["bound_after_last_eval"]
        s["convergence"] = {"steps": conv["steps"], "bound": last["bound"], "bound_step": last["step"],
                            "tokens_per_s": conv["tokens_per_s_median"], "stopped_by": conv["stopped_by"]}
    return s


def table_md(s: dict) -> str:
    """The arms as the markdown table docs/performance.md quotes."""
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    mb = s.get("max_micro_batch") or {}
    lines = ["| arm | tokens/s | model TFLOP/s | MFU (measured peak) | MFU (spec peak) | step memory above "
             "resident, GiB | largest micro-batch |", "|---|---|---|---|---|---|---|"]
    for name, a in s["arms"].items():
        lines.append(f"| `{name}` | {f(a['tokens_per_s'], ',.0f')} | {f(a['model_tflops_per_s'], '.1f')} | "
                     f"{f(a['mfu_measured_peak'], '.1%')} | {f(a['mfu_spec_peak'], '.1%')} | "
                     f"{f(a['peak_step_memory_gib'], '.2f')} | {mb.get(name, '—')} |")
    lines.append(f"\nGPU {s['gpu']}, torch {s['torch']}, CUDA {s['cuda']}, flash SDPA {s['flash_sdpa']}; "
                 f"matmul peak measured in the same rounds {s.get('matmul_peak_tflops')} TFLOP/s "
                 f"({s.get('matmul_peak_shape')}); diffusion vs AR step "
                 f"{s.get('diffusion_vs_ar')}x; compiled vs eager {s.get('compiled_vs_eager')}x.")
    if s.get("convergence"):
        c = s["convergence"]
        lines.append(f"Convergence: bound {c['bound']:.2f} after {c['bound_step']} steps ({c['stopped_by']}), "
                     f"{f(c['tokens_per_s'], ',.0f')} tokens/s.")
    if s.get("fsdp"):
        r = s["fsdp"]
        lines.append(f"FSDP2 on {r['processes']} GPU(s): adapted Llama ({r['export_parameters']:,} parameters), val loss "
                     f"{r['val_loss']} (resumed to step {r['resumed_to']}), export reloads with finite logits: "
                     f"{r['export_logits_finite']}.")
    return "\n".join(lines) + "\n"


def do_part(spec: dict, limit: float, missing: dict, out: Path, env: dict, dry: bool, work: Path):
    """Run one part (or skip it for missing packages) and read its result: (record, result or None)."""
    name = spec["name"]
    lacking = [PACKAGES[m][0] for m in spec["needs"] if m in missing]
    if dry and spec.get("gpu_only"):
        return {"status": "skipped", "why": spec["gpu_only"], "gpu_only": True, "seconds": 0.0, "limit_s": limit}, None
    if lacking:
        return {"status": "skipped", "why": "missing packages: " + ", ".join(lacking), "seconds": 0.0,
                "limit_s": limit}, None
    rec = run_part(spec["cmd"], limit, out / "logs" / name, env, spec.get("term_after"))
    result = None
    # a convergence run killed at its limit may still have evaluated: its metrics are read whatever the status
    if rec["status"] == "ok" or (name == "convergence" and (spec["run_dir"] / "metrics.jsonl").is_file()):
        try:
            if name == "convergence":
                overrides = {k: str(v) for k, v in convergence_overrides(dry, work)}
                result = convergence_result(spec["run_dir"], overrides, rec)
            elif name == "install":
                result = {"pip_output": tail(out / "logs" / "install.out", 2000)}
            else:
                result = last_json((out / "logs" / f"{name}.out").read_text())
        except Exception as exc:  # noqa: BLE001 - a part whose output cannot be read is a failed part
            rec.update(status="failed", error=f"reading its output: {type(exc).__name__}: {exc}")
    if rec["status"] in ("failed", "timeout"):
        rec["stderr_tail"] = tail(out / "logs" / f"{name}.err")
    return rec, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu_results", help="folder for the JSON (default gpu_results/)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy shapes, under a minute")
    p.add_argument("--wheels", default="", help="install missing packages from the wheels in this folder first")
    p.add_argument("--probe-env", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-run", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe_env:
        print(json.dumps(probe_env(), indent=2))
        return 0
    if a.fsdp_run:
        print(json.dumps(fsdp_run(Path(a.fsdp_run))))
        return 0

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    py, env = sys.executable, child_env(a.dry_run)
    t_start = time.perf_counter()
    if a.wheels:
        dists = sorted({PACKAGES[m][0] for m in missing_packages() if m not in ("wandb", "deepspeed")})
        if dists:
            print(f"installing from {a.wheels}: {' '.join(dists)}", flush=True)
            try:  # before the parts, outside their 8 minutes; what is still missing is reported below
                subprocess.run([py, "-m", "pip", "install", "--no-index", "--find-links", a.wheels, *dists],
                               cwd=ROOT, timeout=300)
            except subprocess.TimeoutExpired:
                print("pip install from the wheels ran out of time (300 s)", flush=True)
    missing = missing_packages()
    print("missing packages: " + (", ".join(f"{PACKAGES[m][0]} ({PACKAGES[m][1]})" for m in missing) or "none"),
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    specs = part_specs(a.dry_run, py, work)
    budget = sum(s["limit"] for s in specs)
    print(f"{'dry run (CPU, toy shapes)' if a.dry_run else 'GPU check'}: {len(specs)} parts, limits add up to "
          f"{budget} s; JSON to {out}", flush=True)
    results, parts = {}, {}
    for spec in specs:
        name = spec["name"]
        # the whole check stops at the sum of the limits even if a part overran (it cannot: each is killed)
        limit = max(1.0, min(spec["limit"], budget - (time.perf_counter() - t_start)))
        print(f"== {name}: limit {limit:.0f} s", flush=True)
        try:
            rec, result = do_part(spec, limit, missing, out, env, a.dry_run, work)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the next part still runs
            rec, result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": None,
                           "limit_s": limit}, None
        parts[name], results[name] = rec, result
        (out / f"{name}.json").write_text(json.dumps({"part": name, **rec, "result": result}, indent=2))
        note = rec.get("why") or rec.get("error")
        print(f"-> {name}: {rec['status']} in {rec['seconds']} s" + (f" ({note})" if note else ""), flush=True)
        if name == "env" and result:
            print(f"   GPU {result.get('gpu')}, {result.get('nvidia_smi', 'no nvidia-smi')}; torch {result['torch']}, "
                  f"CUDA {result['torch_cuda']}, cuDNN {result['cudnn']}; flash SDPA {result['flash_sdpa']}",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)  # the convergence run's checkpoints; its metrics are in the JSON
    try:
        summary = summarize(results)
        table = table_md(summary)
    except Exception as exc:  # noqa: BLE001 - the parts' JSON is already written
        summary, table = {"error": f"{type(exc).__name__}: {exc}"}, ""
    total = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(
        {"dry_run": a.dry_run, "total_s": total, "limits_total_s": budget, "parts": parts, "missing": {
            PACKAGES[m][0]: PACKAGES[m][1] for m in missing}, "figures": summary}, indent=2))
    (out / "table.md").write_text(table)
    print(table + f"total {total} s; " + ", ".join(f"{k} {v['status']}" for k, v in parts.items()), flush=True)
    return 0 if all(v["status"] == "ok" or v.get("gpu_only") for v in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
