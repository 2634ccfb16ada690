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
                           "--threads", "1"])
    out = bench_train.run(a)
    arms = out["arms"]
    assert {"tdlm", "bert", "tdlm_full_head", "tdlm_forloop_adamw", "tdlm_mkl_gemm", "bert_onednn_gemm"} <= set(arms)
    assert out["tdlm_intermediate_size"] == 128 and out["bert_intermediate_size"] == 192
    # same FFN parameters: 3 * 48 * 128 == 2 * 48 * 192; BERT adds its MLM transform (48 x 48)
    assert arms["bert"]["params_matmul"] - arms["tdlm"]["params_matmul"] == 48 * 48
    for arm in arms.values():
        assert arm["tokens_per_s"] > 0 and arm["executed_flops_frac_of_peak"] <= arm["mfu_model_flops"]
    assert out["ratios"]["tdlm_vs_bert"]["of_medians"] > 0


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
