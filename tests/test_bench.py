"""The benchmark scripts run and report what they promise, at toy sizes (no timing is asserted)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))

import bench_common  # noqa: E402
import bench_train  # noqa: E402


def test_interleaved_rotates_order_and_times_every_arm():
    calls = []
    res = bench_common.interleaved({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))},
                                   rounds=3, warmup=1)
    assert calls[:2] == [("a", -1), ("b", -1)]  # warm-up, untimed
    assert calls[2:] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert {k: len(v) for k, v in res["seconds"].items()} == {"a": 3, "b": 3}
    r = bench_common.ratio({"slow": [2.0, 4.0, 2.0], "fast": [1.0, 1.0, 1.0]}, "slow", "fast")
    assert r == {"of_medians": 2.0, "median_of_rounds": 2.0}
    assert {k: len(v) for k, v in res["cpu_shares"].items()} == {"a": 3, "b": 3}


def test_uncontended_drops_starved_repetitions_and_keeps_rounds_aligned():
    timing = {"seconds": {"a": [1.0, 5.0, 1.2, 1.1], "b": [2.0, 2.1, 9.0, 2.2]},
              "cpu_shares": {"a": [0.99, 0.3, 0.95, 0.97], "b": [0.98, 0.97, 0.2, 0.99]}}
    sec, kept = bench_common.uncontended(timing, 0.85)
    assert sec == {"a": [1.0, None, 1.2, 1.1], "b": [2.0, 2.1, None, 2.2]} and kept == {"a": 3, "b": 3}
    assert bench_common.ratio(sec, "b", "a") == {"of_medians": round(2.1 / 1.1, 3), "median_of_rounds": 2.0}
    assert bench_common.uncontended(timing, 0.85, min_kept=4)[1] == {"a": 4, "b": 4}  # too few: all kept


def test_bench_train_tiny_with_ablations():
    a = bench_train.parse(["--preset", "cpu", "--layers", "1", "--hidden", "48", "--heads", "2", "--vocab", "64",
                           "--seq-len", "16", "--batch", "2", "--rounds", "2", "--warmup", "1", "--ablations",
                           "--threads", "1", "--ar", "--estimators"])
    out = bench_train.run(a)
    arms = out["arms"]
    assert {"tdlm", "bert", "tdlm_full_head", "tdlm_forloop_adamw", "tdlm_mkl_gemm", "bert_onednn_gemm",
            "tdlm_ar", "tdlm_exact_k", "tdlm_importance"} <= set(arms)
    # the estimator arms are the bernoulli arm's model under another noise: same matrices, ratios to bernoulli
    assert arms["tdlm_exact_k"]["params_matmul"] == arms["tdlm_importance"]["params_matmul"] == \
        arms["tdlm"]["params_matmul"]
    assert out["ratios"]["exact_k_vs_bernoulli"]["of_medians"] > 0
    assert out["ratios"]["importance_vs_bernoulli"]["of_medians"] > 0
    # the AR arm is the same backbone (causal attention has no parameters of its own), with the head everywhere
    assert arms["tdlm_ar"]["params_matmul"] == arms["tdlm"]["params_matmul"]
    assert arms["tdlm_ar"]["executed_flops_frac_of_peak"] == arms["tdlm_ar"]["mfu_model_flops"]
    assert out["ratios"]["diffusion_vs_ar"]["of_medians"] > 0
    assert out["tdlm_intermediate_size"] == 128 and out["bert_intermediate_size"] == 192
    # same FFN parameters: 3 * 48 * 128 == 2 * 48 * 192; BERT adds its MLM transform (48 x 48)
    assert arms["bert"]["params_matmul"] - arms["tdlm"]["params_matmul"] == 48 * 48
    for arm in arms.values():
        assert arm["tokens_per_s"] > 0 and arm["executed_flops_frac_of_peak"] <= arm["mfu_model_flops"]
    assert out["ratios"]["tdlm_vs_bert"]["of_medians"] > 0


def test_largest_fitting_doubles_then_bisects_to_an_eighth():
    probes = []

    def fits_up_to(n):
        return lambda b: probes.append(b) or b <= n

    r = bench_train.largest_fitting(fits_up_to(36), 16, 1024)
    assert (r["max"], r["first_failing"]) == (36, 40) and probes == [16, 32, 64, 48, 40, 36]
    assert bench_train.largest_fitting(fits_up_to(3), 16, 1024)["max"] == 3  # the start fails: halve, then bisect
    assert bench_train.largest_fitting(fits_up_to(10**6), 16, 100) | {"probes": None} == \
        {"max": 100, "first_failing": None, "limit": 100, "probes": None}
    assert bench_train.largest_fitting(fits_up_to(0), 4, 100)["max"] == 0


def test_max_micro_batch_treats_out_of_memory_as_not_fitting(monkeypatch):
    """The search's OOM handling, on CPU: a step that raises torch.OutOfMemoryError above 5 sequences, and one
    that raises another error, which must not be taken for 'too big'."""
    import torch

    def fake_make_step(model, loss_fn, optim_cfg, amp, fail=None):
        def step(batch):
            if batch["ids"].shape[0] > 5:
                raise (fail or torch.OutOfMemoryError)("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step

    a = bench_train.parse(["--preset", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "64",
                           "--seq-len", "8", "--batch", "2", "--find-max-batch", "64"])
    arm = (bench_train.build_tdlm(a), None, bench_train.OptimSection(), False)
    monkeypatch.setattr(bench_train, "make_step", fake_make_step)
    r = bench_train.max_micro_batch(a, "cpu", None, "tdlm", arm)
    assert (r["max"], r["first_failing"], r["tokens_at_max"]) == (5, 6, 40)
    monkeypatch.setattr(bench_train, "make_step", lambda *x: fake_make_step(*x, fail=ValueError))
    with pytest.raises(ValueError):
        bench_train.max_micro_batch(a, "cpu", None, "tdlm", arm)


def test_step_flops_counts_the_head_at_masked_positions_only():
    a = bench_train.parse(["--preset", "cpu"])
    model_f, exec_f = bench_train.step_flops(10**6, a, masked_frac=0.5, head_everywhere=False)
    tokens = a.batch * a.seq_len
    assert model_f == 6 * 10**6 * tokens + 12 * a.layers * a.seq_len * a.hidden * tokens
    assert model_f - exec_f == 6 * a.vocab * a.hidden * tokens * 0.5


def test_bench_sampling_says_what_it_needs_or_runs():
    import bench_sampling

    out = bench_sampling.run(bench_sampling.parse(["--batch", "1", "--rounds", "1", "--threads", "1", "--layers",
                                                   "1", "--hidden", "32", "--heads", "2", "--vocab", "64", "--seq-len",
                                                   "8"]))
    res = out["results"]["batch_1"]
    assert res["identical_samples"]
    assert res["ancestral_1000_cached"]["network_calls"] <= 8 < res["ancestral_1000_uncached"]["network_calls"]
    assert res["ancestral_1000_cached"]["rows_computed"] <= 8


def test_gpu_preset_arguments_and_shape(capsys):
    """The GPU path (not run here without CUDA): its preset's arguments, and models of 125M parameters, built
    on the meta device (no memory, no GPU)."""
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_train.parse(["--preset", "gpu-125m"])
        assert "needs CUDA" in capsys.readouterr().err
    a = bench_train.parse(["--preset", "cpu", "--layers", "12", "--hidden", "768", "--heads", "12", "--vocab",
                           "50304", "--seq-len", "1024"])
    assert {k: getattr(a, k) for k in ("layers", "hidden", "heads", "vocab", "seq_len", "batch")} == \
        {k: v for k, v in bench_train.PRESETS["gpu-125m"].items() if k not in ("rounds", "warmup")}
    with torch.device("meta"):
        tdlm, bert = bench_train.build_tdlm(a), bench_train.build_bert(a)
    n_tdlm = sum(p.numel() for p in tdlm.parameters())
    assert 120e6 < n_tdlm < 130e6 and 120e6 < sum(p.numel() for p in bert.parameters()) < 130e6
    model_f, exec_f = bench_train.step_flops(bench_train.matmul_params(tdlm), a, 0.5, head_everywhere=False)
    assert model_f > exec_f > 0.8 * model_f


@pytest.mark.slow
def test_bench_convergence_runs_arms_resumes_and_reports_the_logged_bounds(tmp_path):
    import json
    import math

    import bench_convergence
    import yaml

    from conftest import tiny_overrides

    config = {}
    for item in tiny_overrides(tmp_path, **{"trainer.eval_every_n_steps": 4}):
        key, value = item.split("=", 1)
        section, name = key.split(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "conv"
    argv = ["--out", str(out), "--config", str(tmp_path / "tiny.yaml"), "--steps", "8", "--seeds", "0",
            "--estimators", "exact-k", "--no-ar", "--arm", "lr_low=optim.lr=1e-4,optim.warmup_steps=1"]
    result = bench_convergence.main(argv)
    for arm, estimator, lr in (("exact-k", "exact-k", 1e-3), ("lr_low", "bernoulli", 1e-4)):
        run = out / f"{arm}_s0"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (saved["diffusion"]["estimator"], saved["optim"]["lr"]) == (estimator, lr)  # the arm's overrides
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        val = {r["step"]: math.exp(r["val/loss"]) for r in rows if "val/loss" in r}
        summary = result["arms"][arm]
        assert summary["per_seed"][0]["bound"][8] == val[8] == summary["median_bound_8"] == summary["worst_bound_8"]
        accuracy = [r["metrics/mask_accuracy"] for r in rows if "metrics/mask_accuracy" in r]
        exit_step = summary["plateau_exit_steps"][0]
        assert (exit_step is None) == (max(accuracy) <= bench_convergence.PLATEAU_EXIT_ACCURACY)
    assert result["arm_overrides"] == {"lr_low": ["optim.lr=1e-4", "optim.warmup_steps=1"]}
    # finished runs are read, not retrained: the logs keep their lines
    before = (out / "exact-k_s0" / "metrics.jsonl").read_text()
    again = bench_convergence.main(argv)
    assert (out / "exact-k_s0" / "metrics.jsonl").read_text() == before
    assert again["arms"]["lr_low"]["median_bound_8"] == result["arms"]["lr_low"]["median_bound_8"]
    assert (out / "convergence.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--arm: expected NAME=key=value"):
        bench_convergence.main(["--out", str(out), "--arm", "bernoulli=optim.lr=1e-4", "--read-only"])
