"""eval/gpu_check.py, the one-call GPU check: its limits fit the 8-minute window, its runner records a failing or
overrunning part and stops a long one gracefully, and its dry run (CPU, toy shapes) runs every part and writes
real figures, so the script cannot rot between GPU windows."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval"))

import gpu_check  # noqa: E402

PARTS = ["install", "env", "train", "train_compiled", "sampling", "convergence", "fsdp"]


def test_gpu_parts_and_limits_fit_the_window(tmp_path):
    specs = gpu_check.part_specs(False, sys.executable, tmp_path)
    assert [s["name"] for s in specs] == PARTS
    assert sum(s["limit"] for s in specs) <= gpu_check.TOTAL_BUDGET_S == 480
    train = dict((s["name"], s) for s in specs)["train"]["cmd"]
    assert train[train.index("--preset") + 1] == "gpu-125m" and "--ar" in train and "--find-max-batch" in train
    conv = specs[-2]
    assert conv["term_after"] < conv["limit"]  # the SIGTERM stop leaves time to save and exit
    assert "model.hidden_size=768" in conv["cmd"] and "wandb.enabled=false" in conv["cmd"]


def test_run_part_records_failure_timeout_and_graceful_stop(tmp_path):
    fail = gpu_check.run_part([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], 30, tmp_path / "f")
    assert fail["status"] == "failed" and fail["returncode"] == 3 and (tmp_path / "f.out").read_text() == "x\n"

    t0 = time.perf_counter()
    slow = gpu_check.run_part([sys.executable, "-c", "import time; time.sleep(60)"], 2, tmp_path / "s")
    assert slow["status"] == "timeout" and slow["returncode"] is None and time.perf_counter() - t0 < 20

    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\ntime.sleep(60)"
    stop = gpu_check.run_part([sys.executable, "-c", code], 30, tmp_path / "t", term_after=3)
    assert stop["status"] == "ok" and stop["sigterm_sent"] and stop["seconds"] < 20


def test_last_json_skips_what_libraries_printed_before():
    assert gpu_check.last_json('warning {not json}\n{\n  "a": {"b": 1}\n}\n') == {"a": {"b": 1}}
    with pytest.raises(ValueError):
        gpu_check.last_json("Traceback ...\n")


def finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_real_figures(tmp_path):
    out = tmp_path / "gpu_results"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "eval/gpu_check.py", "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and list(summary["parts"]) == PARTS
    # FSDP needs CUDA: the dry run skips that part, saying why (test_fsdp_part_steps_on_cpu runs its steps)
    assert {k: v["status"] for k, v in summary["parts"].items()} == {**dict.fromkeys(PARTS, "ok"), "fsdp": "skipped"}
    assert "FSDP needs CUDA" in summary["parts"]["fsdp"]["why"]
    ran = [p for p in PARTS if p != "fsdp"]
    assert summary["total_s"] <= wall
    part = {p: json.loads((out / f"{p}.json").read_text()) for p in ran}
    assert all(part[p]["part"] == p and part[p]["seconds"] <= part[p]["limit_s"] for p in ran)

    assert "Would install tdlm" in part["install"]["result"]["pip_output"]
    assert part["env"]["result"]["torch"] and part["env"]["result"]["cuda_available"] is False

    train = part["train"]["result"]
    assert set(train["arms"]) == {"tdlm", "tdlm_ar", "bert", "hf_llama"}
    for arm in train["arms"].values():
        assert finite_positive(arm["tokens_per_s"]) and finite_positive(arm["mfu_model_flops"])
    assert train["arms"]["tdlm_ar"]["params_matmul"] == train["arms"]["tdlm"]["params_matmul"]  # same backbone
    assert finite_positive(train["ratios"]["diffusion_vs_ar"]["of_medians"])
    # no out-of-memory on a CPU: the search doubles from --batch 2 up to its limit, 4
    for name in ("tdlm", "tdlm_ar"):
        found = train["max_micro_batch"][name]
        assert found["max"] == 4 and found["first_failing"] is None and found["probes"] == [[2, True], [4, True]]
    compiled = part["train_compiled"]["result"]
    assert "tdlm_compiled" in compiled["arms"] and "tdlm_compiled_error" not in compiled
    assert finite_positive(compiled["tdlm_compiled_first_4_steps_s"])

    samp = part["sampling"]["result"]["results"]["batch_2"]
    assert samp["identical_samples"]
    assert all(finite_positive(samp[k]["samples_per_s"]) for k in
               ("ancestral_1000_uncached", "ancestral_1000_cached", "low_confidence_64"))

    conv = part["convergence"]["result"]
    assert conv["steps"] == 6 and [e[0] for e in conv["evals"]] == [3, 6] and conv["stopped_by"] == "max_steps"
    assert all(e[2] == pytest.approx(math.exp(e[1])) for e in conv["evals"])
    assert 1 < conv["bound_after_last_eval"]["bound"] < 1e5 and finite_positive(conv["tokens_per_s_median"])

    fig = summary["figures"]
    assert set(fig["arms"]) == {"tdlm", "tdlm_ar", "bert", "hf_llama", "tdlm_compiled"}
    assert fig["arms"]["tdlm"]["tokens_per_s"] == train["arms"]["tdlm"]["tokens_per_s"]
    assert "| `tdlm_compiled` |" in (out / "table.md").read_text()


@pytest.mark.slow
def test_fsdp_part_steps_on_cpu(tmp_path):
    """The fsdp part's steps (train 20, resume to 30, reload the export) with a 1-process CPU launch in place of
    FSDP, which needs CUDA: what the GPU run adds is the sharding alone."""
    res = gpu_check.fsdp_run(tmp_path, "single_cpu.yaml", 1, "no", dict(hidden=32, layers=2, heads=2, positions=64))
    assert sorted(res["val_loss"]) == [10, 20, 30] and res["resumed_to"] == 30
    assert res["val_loss"][30] < res["val_loss"][10] and res["export"] == "step_0000030"
    assert res["export_logits_finite"] and res["export_parameters"] > 0
