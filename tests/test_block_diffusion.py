"""Block diffusion (BD3-LM): the vectorised block NELBO against a naive loop, its two ends (L' = L is MDLM,
L' = 1 is an autoregressive model), exact enumeration against every estimator, KV-cached sampling, the task on the
engine (2 processes, resume) and the bad block sizes."""

import math

import pytest
import torch
from conftest import launch_two_processes, tiny_overrides
from test_model import tiny_model

from tdlm.config import ConfigError, load_config
from tdlm.diffusion import LinearSchedule, exact_block_nelbo
from tdlm.likelihood import NelboEstimator, sequence_nelbo, summarize
from tdlm.noise import BlockTrainingNoise, TrainingNoise
from tdlm.objective import (block_diffusion_loop, block_diffusion_outputs, masked_diffusion_outputs,
                            paired_block_mask, prefix_block_mask, sequence_sums)
from tdlm.sampling import SamplerConfig, block_generate, sample_generators

pytestmark = pytest.mark.usefixtures("one_thread")
MASK, PAD, L = 0, 1, 8


def rows(seed=0, B=3, length=L):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (B, length), generator=g)
    ids[-1, length - 3:] = PAD  # a right-padded row
    return ids, ids != PAD


def training_noise(name, block_size, t_min=1e-3):
    return BlockTrainingNoise(TrainingNoise(name, LinearSchedule(), t_min), block_size)


def block_outputs(model, ids, valid, masked, weight, block_size, attn=None):
    positions = masked.flatten().nonzero().squeeze(1)
    return block_diffusion_outputs(model, ids, valid, masked, positions, weight, MASK, block_size, attn)


def test_the_block_mask_is_bd3lms():
    m = paired_block_mask(4, 2)  # positions 0-3 noisy (blocks 0,0,1,1), 4-7 clean
    noisy_block_1 = m[2].nonzero().squeeze(1).tolist()
    assert noisy_block_1 == [2, 3, 4, 5]  # its own noisy block and clean block 0
    assert m[0].nonzero().squeeze(1).tolist() == [0, 1]  # noisy block 0: itself only
    assert m[6].nonzero().squeeze(1).tolist() == [4, 5, 6, 7]  # clean block 1: clean blocks 0 and 1
    assert m[4].nonzero().squeeze(1).tolist() == [4, 5]
    assert prefix_block_mask(2, 2)[2:].all() and prefix_block_mask(2, 2)[:2, 2:].sum() == 0


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("estimator", ["bernoulli", "exact-k"])
def test_vectorised_pass_equals_the_block_by_block_loop(block_size, estimator):
    """One forward over [x_t ; x] (2L tokens) gives each block's NELBO as L / L' separate forwards over
    [x^{<b} ; z^b] do, padded rows included; and so does its gradient's loss."""
    model = tiny_model().eval().set_cpu_gemm("aten")
    ids, valid = rows(seed=block_size)
    noise = training_noise(estimator, block_size)
    masked, t, weight, _ = noise.mask(*noise.draw(torch.Generator().manual_seed(3), 3, L), valid)
    assert weight.shape == (3, L // block_size) and masked.any()
    with torch.no_grad():
        out = block_outputs(model, ids, valid, masked, weight, block_size, valid)
        loop = block_diffusion_loop(model, ids, masked, weight, MASK, block_size, valid)
    torch.testing.assert_close(sequence_sums(out)[:, 0], loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_sum.double(), loop.sum(), rtol=1e-5, atol=1e-6)
    assert out.logits.shape[0] == int(masked.sum())  # logits at the masked noisy positions only


@pytest.mark.parametrize("estimator", ["bernoulli", "exact-k", "importance"])
def test_block_size_L_is_mdlm_with_the_same_noise(estimator):
    """L' = L: one block; its noise is the MDLM estimator's, draw for draw, and the loss is the MDLM loss (the
    clean half is attended by nobody, so only the float summation order differs)."""
    model = tiny_model().eval().set_cpu_gemm("aten")
    ids, valid = rows(seed=1)
    plain = TrainingNoise(estimator, LinearSchedule(), 1e-3)
    block = BlockTrainingNoise(plain, L)
    draws = plain.draw(torch.Generator().manual_seed(4), 3, L)
    block_draws = block.draw(torch.Generator().manual_seed(4), 3, L)
    assert torch.equal(draws[0], block_draws[0][:, 0]) and torch.equal(draws[1], block_draws[1])
    masked, t, weight, _ = plain.mask(*draws, valid)
    b_masked, b_t, b_weight, _ = block.mask(*block_draws, valid)
    assert torch.equal(masked, b_masked) and torch.equal(weight, b_weight[:, 0])
    positions = masked.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        mdlm = masked_diffusion_outputs(model, ids, valid, masked, positions, weight, MASK, valid)
        one_block = block_outputs(model, ids, valid, masked, b_weight, L, valid)
    torch.testing.assert_close(sequence_sums(one_block), sequence_sums(mdlm), rtol=1e-5, atol=0)
    torch.testing.assert_close(one_block.token_ce, mdlm.token_ce, rtol=1e-5, atol=1e-6)


def test_block_size_1_is_an_autoregressive_model():
    """L' = 1, what "exactly the AR loss" means. Each block is one token, masked with probability m(t_b) and then
    read as [MASK] at position b by a query that attends the clean tokens < b, whose keys are computed causally
    (clean block b attends clean blocks <= b). So with every block masked (t_b = 1: m = 1, w = 1) the block loss is,
    exactly, the AR NLL sum_b -log p(x_b | x_<b) of the *same weights run causally* where token b is predicted at a
    [MASK] input placed at position b after the clean prefix (not at x_{b-1}'s position, as a shifted AR head
    would): ``causal([x_0 .. x_{b-1}, MASK])[-1]``. In expectation over t the masking and the weight cancel,
    E_t[w(t) m(t)] = integral_{t_min}^1 (1/t) t dt / (1 - t_min) = 1, so the L' = 1 NELBO *is* that AR NLL: the
    exact enumeration gives it, and the Monte-Carlo estimator is unbiased for it. Under ``exact-k`` it is exact
    draw by draw: a block of one token always masks k = 1 with weight (1/1) c_1 = 1, so the *training loss* on any
    batch is that AR NLL."""
    bidirectional = tiny_model().eval().set_cpu_gemm("aten")
    causal = tiny_model(causal=True).eval().set_cpu_gemm("aten")  # the same weights (seeded init), run causally
    ids, valid = rows(seed=2, B=2)
    ids, valid = ids[:1], valid[:1]  # an unpadded row
    with torch.no_grad():
        out = block_outputs(bidirectional, ids, valid, valid.clone(), torch.ones(1, L), 1)
        ar = []
        for b in range(L):
            logp = causal(torch.cat([ids[:, :b], torch.full((1, 1), MASK)], 1))[0, -1].double().log_softmax(-1)
            ar.append(-float(logp[ids[0, b]]))
        block_lp = lambda b, z: logprobs_of_block(bidirectional, ids[0], 1, b, z)  # noqa: E731
        exact = exact_block_nelbo(block_lp, ids[0], 1, MASK, t_min=0.0)
    torch.testing.assert_close(sequence_sums(out)[0, 0], torch.tensor(sum(ar), dtype=torch.float64), rtol=1e-5,
                               atol=0)
    assert exact == pytest.approx(sum(ar), rel=1e-5)
    noise = training_noise("exact-k", 1, t_min=0.05)
    masked, _, weight, _ = noise.mask(*noise.draw(torch.Generator().manual_seed(0), 1, L), valid)
    assert masked.all() and torch.equal(weight, torch.ones(1, L))
    with torch.no_grad():
        drawn = block_outputs(bidirectional, ids, valid, masked, weight, 1)
    torch.testing.assert_close(drawn.loss_sum.double(), torch.tensor(sum(ar), dtype=torch.float64), rtol=1e-5, atol=0)


def logprobs_of_block(model, x, block_size, b, z):
    """(L', V) log p of block b's positions when block b reads z and the blocks before it are clean."""
    noisy = x.clone()
    noisy[b * block_size:(b + 1) * block_size] = z
    n = x.numel()
    logits = model(torch.cat([noisy, x])[None], paired_block_mask(n, block_size)[None],
                   position_ids=torch.arange(n).repeat(2))
    return logits[0, b * block_size:(b + 1) * block_size].double().log_softmax(-1)


@pytest.mark.parametrize("block_size", [2, 4])
def test_exact_block_nelbo_agrees_with_every_estimator(block_size):
    """L = 8: the block NELBO by enumerating every block's mask sets (15 per block of 4) against the training
    estimators (per block) and the evaluation estimators (``eval/perplexity.py``), 400 rows x 24 passes each. The
    embedding is scaled up so the loss depends on the context and the masked count (logits std ~2, not ~0.1)."""
    model = tiny_model().eval().set_cpu_gemm("aten")
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # tied with the LM head
    x = rows(seed=9, B=1)[0][0]
    t_min, N, K = 1e-3, 400, 24
    with torch.no_grad():
        exact = exact_block_nelbo(lambda b, z: logprobs_of_block(model, x, block_size, b, z), x, block_size, MASK,
                                  t_min) / L
    ids = x.expand(N, L)
    valid = torch.ones_like(ids, dtype=torch.bool)
    zs = {}
    with torch.no_grad():
        for name in ("bernoulli", "exact-k", "importance"):
            noise = training_noise(name, block_size, t_min)
            per_pass = []
            for p in range(K):
                masked, _, weight, _ = noise.mask(*noise.draw(torch.Generator().manual_seed(p), N, L), valid)
                per_pass.append(float(sequence_sums(block_outputs(model, ids, valid, masked, weight,
                                                                  block_size))[:, 0].sum()) / (N * L))
            per_pass = torch.tensor(per_pass, dtype=torch.float64)
            zs[f"train/{name}"] = (float(per_pass.mean()) - exact, float(per_pass.std() / math.sqrt(K)))
        for name in ("stratified", "iid", "exact-k"):
            est = NelboEstimator(name, LinearSchedule(), t_min, seed=0, num_sequences=N, block_size=block_size)
            idx = torch.arange(N)
            sums = torch.stack([sequence_nelbo(model, ids, *est.noise(valid, idx, p), MASK, block_size=block_size)
                                for p in range(K)], 1)
            res = summarize(torch.cat([idx.double()[:, None], valid.double().sum(1, keepdim=True), sums], 1))
            zs[f"eval/{name}"] = (res.nelbo_per_token - exact, res.stderr)
    for name, (diff, se) in zs.items():
        assert abs(diff) < 3 * se, (name, diff, se, exact)
        assert se < 0.015 * exact, (name, se, exact)  # power: a 5% bias would fail
    print(f"L'={block_size}: exact {exact:.5f}; worst |z| "
          f"{max(abs(d) / s for d, s in zs.values()):.2f} over {', '.join(zs)}")


def test_evaluation_noise_is_per_block_and_a_function_of_the_global_index():
    est = NelboEstimator("stratified", LinearSchedule(), 1e-3, seed=5, num_sequences=10, block_size=4)
    _, valid = rows(seed=0, B=4)
    m_a, w_a = est.noise(valid, torch.tensor([3, 7, 1, 9]), pass_idx=2)
    m_b, w_b = est.noise(valid[[2, 0]], torch.tensor([1, 3]), pass_idx=2)
    assert w_a.shape == (4, 2) and torch.equal(m_a[[2, 0]], m_b) and torch.equal(w_a[[2, 0]], w_b)
    assert not m_a[~valid].any()
    # one t per block, stratified over sequences x blocks: 1/t of all 10 x 2 blocks hits 20 distinct strata
    _, w = est.noise(torch.ones(10, L, dtype=torch.bool), torch.arange(10), pass_idx=0)
    strata = ((1.0 / w - 1e-3) / (1 - 1e-3) * 20).floor().long().flatten().sort().values
    assert torch.equal(strata, torch.arange(20))


@pytest.mark.parametrize("method", ["ancestral", "low_confidence"])
def test_kv_cached_sampling_equals_uncached(method):
    """The same samples, draw for draw, from the KV cache of finished blocks as from rerunning the prefix; the
    cached logits agree with the uncached ones to float tolerance."""
    model = tiny_model(max_seq_len=24).eval()
    cfg = SamplerConfig(steps=3, method=method)
    runs = {kv: block_generate(model, 3, 24, 4, MASK, cfg, sample_generators(7, range(3)), use_kv_cache=kv)
            for kv in (True, False)}
    assert torch.equal(runs[True].ids, runs[False].ids) and runs[True].ids.shape == (3, 24)
    assert (runs[True].ids != MASK).all() and runs[True].blocks_run == 6
    assert runs[True].network_calls == runs[False].network_calls + 6  # plus one cache append per block
    from tdlm.model import KVCache

    cache, ids = KVCache(), runs[True].ids
    with torch.no_grad():
        cache.recording = True
        for lo in (0, 4):  # block by block: clean block b attends clean blocks <= b
            model(ids[:, lo:lo + 4], position_ids=torch.arange(lo, lo + 4), kv_cache=cache)
        cache.recording = False
        noisy = ids[:, 8:12].clone()
        noisy[:, 1:3] = MASK
        cached = model(noisy, position_ids=torch.arange(8, 12), kv_cache=cache)
        full = model(torch.cat([ids[:, :8], noisy], 1), prefix_block_mask(8, 4)[None])[:, 8:]
    assert cache.length == 8
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_block_sampling_stops_at_eos_and_on_low_entropy():
    model = tiny_model(max_seq_len=24).eval()
    cfg = SamplerConfig(steps=4, temperature=0.0)
    free = block_generate(model, 2, 24, 4, MASK, cfg)
    eos = int(free.ids[0, 5])
    first = int((free.ids[0] == eos).nonzero()[0]) + 1
    stopped = block_generate(model, 2, 24, 4, MASK, cfg, eos_token_id=eos, pad_token_id=PAD)
    assert int(stopped.lengths[0]) == first
    assert torch.equal(stopped.ids[0, :first], free.ids[0, :first]) and (stopped.ids[0, first:] == PAD).all()
    # the degeneracy rule: entropy of the last 8 tokens below 100 nats stops every row after 2 blocks
    low = block_generate(model, 2, 24, 4, MASK, cfg, min_entropy=100.0, entropy_window=8, pad_token_id=PAD)
    assert low.blocks_run == 2 and low.lengths.tolist() == [8, 8] and torch.equal(low.ids[:, :8], free.ids[:, :8])


def test_bad_block_sizes_are_one_line_errors(tmp_path):
    base = tiny_overrides(tmp_path)  # data.seq_len 32
    for value, message in [(5, "diffusion.block_size: 5 does not divide data.seq_len 32"),
                           (-1, "diffusion.block_size: must be >= 0"),
                           ("4 model.causal=true", "diffusion.block_size: 4 needs a bidirectional denoiser")]:
        value, *extra = str(value).split()
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, base + [f"diffusion.block_size={value}", *extra])
        assert "\n" not in str(err.value)


def test_block_task_trains_evaluates_and_samples(tmp_path, capsys):
    """The task on the engine with every metric tier on (per-block weights in the research collectors); the
    checkpoint records L', so ``eval/perplexity.py`` scores the block NELBO (its estimators agree with each other)
    and ``eval/generate.py`` samples block by block, the same samples with and without the KV cache."""
    import json

    from test_eval_cli import load_script

    from tdlm.flops import matmul_params
    from tdlm.tasks import BlockDiffusionTask, text_engine

    tiers = {f"metrics.tiers.{t}.enabled": True for t in ("research", "advanced")}
    engine = text_engine(load_config(None, tiny_overrides(tmp_path, **{"diffusion.block_size": 8, **tiers,
                                                                       "trainer.max_steps": 4})))
    try:
        assert isinstance(engine.task, BlockDiffusionTask)
        result = engine.fit()
        samples = engine.task.sample(engine.task.model, 2, 8)
        n_matmul = matmul_params(engine.task.model)
    finally:
        engine.close()
    assert math.isfinite(result["val/loss"]) and 0 < result["val/loss"] < 10 and len(samples) == 2
    # FLOPs of the [x_t ; x] pass: 2 x 32 positions at context 64 per row, 8 rows a step, 4 steps
    assert result["summary/flops"] == 4 * 8 * 32 * 2 * (6 * n_matmul + 12 * 2 * 64 * 32)
    # the advanced probe cannot run the block forward, so its metrics are absent rather than a plain-forward proxy
    assert "advanced/attention_entropy" not in result and "research/nelbo_row_std" in result
    ckpt = str(tmp_path / "runs" / "t" / "checkpoints" / "step_0000004")
    perplexity, generate = load_script("perplexity"), load_script("generate")

    def run_json(script, argv):
        capsys.readouterr()
        assert script.main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    res = {e: run_json(perplexity, ["--checkpoint", ckpt, "--estimator", e, "--mc-passes", "4", "--json"])
           for e in ("stratified", "exact-k")}
    assert all(r["block_size"] == 8 for r in res.values())
    a, b = res["stratified"], res["exact-k"]
    assert abs(a["nelbo_per_token"] - b["nelbo_per_token"]) < 4 * math.hypot(a["stderr"], b["stderr"]), res
    out = tmp_path / "s.jsonl"
    argv = ["--checkpoint", ckpt, "--num-samples", "3", "--steps", "2", "--json", "--batch-size", "2"]
    summary = run_json(generate, argv + ["--out", str(out)])
    cached = out.read_text()
    assert summary["block_size"] == 8 and summary["kv_cache"] and len(cached.splitlines()) == 3
    assert run_json(generate, argv + ["--out", str(out), "--no-kv-cache"])["kv_cache"] is False
    assert out.read_text() == cached
    capsys.readouterr()
    assert generate.main(["--checkpoint", ckpt, "--template", "a [MASK]"]) == 2
    assert "--block-size: block sampling continues a --prompt prefix" in capsys.readouterr().err
    # the clipped-schedule search: a near-constant t (masked fraction ~0.5) spreads the loss less than t over [t_min, 1]
    search = run_json(load_script("clip_search"), ["--checkpoint", ckpt, "--bounds", "0.5,0.51", "--max-sequences",
                                                   "32", "--batch-size", "4", "--passes", "2", "--json"])
    full, narrow = search["candidates"]
    assert full["bounds"] == [1e-3, 1.0] and search["best"] == [0.5, 0.51] and narrow["var"] < full["var"], search


def run_losses(run_dir):
    import json

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in recs for k, v in r.items() if k in ("train/loss", "val/loss")}


@pytest.mark.slow
def test_block_task_two_processes_match_one_and_resume_exactly(tmp_path, capsys):
    """Per-block t stratified over the *global* batch x blocks, drawn by the step's generator: 2 processes x 4 rows
    log what 1 process x 4 rows x 2 accumulation steps logs; stopping after step 4 and resuming gives the
    uninterrupted run's losses bitwise; ``eval/perplexity.py`` on 2 processes gives the 1-process block NELBO."""
    from pathlib import Path

    from tdlm.tasks import text_engine

    common = {"diffusion.block_size": 4, "trainer.max_steps": 6, "trainer.save_every_n_steps": 2,
              "trainer.eval_every_n_steps": 3, "data.markov_tokens": 6000, "trainer.micro_batch_size": 4}
    config = str(Path(__file__).resolve().parent.parent / "configs" / "markov.yaml")

    def fit(name, stop_at=None, **extra):
        engine = text_engine(load_config(config, tiny_overrides(tmp_path, **common, **extra,
                                                                **{"trainer.run_name": name})))
        try:
            engine.fit(stop_at)
        finally:
            engine.close()

    fit("one", **{"trainer.grad_accum_steps": 2})
    fit("resumed", 4, **{"trainer.grad_accum_steps": 2})
    fit("resumed", **{"trainer.grad_accum_steps": 2, "trainer.resume": "auto"})
    ref = run_losses(tmp_path / "runs" / "one")
    assert run_losses(tmp_path / "runs" / "resumed") == ref  # bitwise
    launch_two_processes(Path(__file__).resolve().parent / "fault_entry.py",
                         [config, *tiny_overrides(tmp_path, **common, **{"trainer.run_name": "two"})])
    two = run_losses(tmp_path / "runs" / "two")
    assert set(two) == set(ref) and any(k[1] == "val/loss" for k in ref)
    for key, value in ref.items():
        assert math.isclose(two[key], value, rel_tol=1e-5), (key, two[key], value)
    # evaluation: the per-block noise is a function of each row's global index, so 2 processes score what 1 does
    import json

    from test_eval_cli import load_script

    ckpt = str(tmp_path / "runs" / "one" / "checkpoints" / "step_0000006")
    argv = ["--checkpoint", ckpt, "--estimator", "stratified", "--mc-passes", "2", "--batch-size", "4", "--json"]
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    # the launch eval/perplexity.py documents (a --config_file launch gives each eval script process a world of 1)
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              str(root / "eval" / "perplexity.py"), *argv]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(root),
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_eval = json.loads(proc.stdout.strip().splitlines()[-1])
    capsys.readouterr()
    assert load_script("perplexity").main(argv) == 0
    one_eval = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert two_eval["block_size"] == 4 == one_eval["block_size"] and two_eval["num_processes"] == 2
    assert two_eval["num_tokens"] == one_eval["num_tokens"]
    for a, b in zip(two_eval["per_pass"], one_eval["per_pass"]):
        assert math.isclose(a, b, rel_tol=1e-9), (two_eval["per_pass"], one_eval["per_pass"])


def test_the_clipped_schedule_changes_the_training_noise_only(tmp_path):
    """diffusion.t_clip = [0.3, 0.8]: training t_b stratified over [0.3, 0.8] with weight w(t) = 1/t; validation
    keeps t over [t_min, 1]; bad bounds are one-line errors."""
    from tdlm.tasks import text_engine

    noise = BlockTrainingNoise(TrainingNoise("bernoulli", LinearSchedule(), 1e-3), 4, (0.3, 0.8))
    first, _ = noise.draw(torch.Generator().manual_seed(0), 50, L)  # 100 blocks, one per stratum of [0.3, 0.8]
    strata = ((first.double() - 0.3) / 0.5 * 100).floor().long().flatten().sort().values
    assert torch.equal(strata, torch.arange(100))
    masked, t, weight, _ = noise.mask(first, torch.rand(50, L, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(weight, 1.0 / t)
    engine = text_engine(load_config(None, tiny_overrides(tmp_path, **{"diffusion.block_size": 8,
                                                                       "diffusion.t_clip": "[0.3, 0.8]",
                                                                       "trainer.max_steps": 2})))
    try:
        t_train = engine.task.noise.draw(torch.Generator().manual_seed(0), 8, 32)[0]
        t_val = engine.task.val_noise[0]
        engine.fit()
    finally:
        engine.close()
    assert 0.3 <= float(t_train.min()) and float(t_train.max()) <= 0.8
    assert float(t_val.min()) < 0.1 and float(t_val.max()) > 0.9
    base = tiny_overrides(tmp_path)
    for extra, message in [(["diffusion.t_clip=[0.5, 0.2]", "diffusion.block_size=4"], "need \\[lo, hi\\]"),
                           (["diffusion.t_clip=[0.2, 0.5]"], "is for block diffusion"),
                           (["diffusion.t_clip=[0.2, 0.5]", "diffusion.block_size=4", "diffusion.estimator=exact-k"],
                            "applies to the bernoulli estimator")]:
        with pytest.raises(ConfigError, match=f"diffusion.t_clip: .*{message}"):
            load_config(None, base + extra)


def test_bench_block_tiny():
    """eval/bench_block.py end to end at a tiny shape: both training arms and both sampling arms report, and the
    cached and uncached samplers drew the same samples."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
    import bench_block

    out = bench_block.run(bench_block.parse(["--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "64",
                                             "--seq-len", "16", "--batch", "2", "--gen-tokens", "24", "--rounds", "2",
                                             "--sample-rounds", "2", "--threads", "1", "--min-cpu-share", "0"]))
    assert out["training"]["mdlm"]["tokens_per_s"] > 0 and out["training"]["block_4"]["tokens_per_s"] > 0
    assert out["sampling"]["identical_samples"] is True
    # the same denoising calls (same samples, same no-change cache) plus one cache append per block of 4
    assert out["sampling"]["kv_cached"]["network_calls"] == out["sampling"]["uncached"]["network_calls"] + 6


def test_an_mdlm_checkpoint_is_fine_tuned_into_block_diffusion(tmp_path):
    """BD3-LM's recipe: continue tdlm's own MDLM ``model/`` with diffusion.block_size; the export records L'."""
    from tdlm.model import TdlmForMaskedOrCausalLM
    from tdlm.tasks import BlockDiffusionTask, text_engine

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document {i} says hello to the world {i % 7} and more" for i in range(300)))
    data = {"data.source": "files", "data.paths": f"[{corpus}]", "data.vocab_size": 300, "trainer.max_steps": 2}
    for name, extra in (("mdlm", {}), ("bd3", {"diffusion.block_size": 8, "model.pretrained":
                                               str(tmp_path / "runs" / "mdlm" / "checkpoints" / "step_0000002" /
                                                   "model")})):
        engine = text_engine(load_config(None, tiny_overrides(tmp_path, **data, **extra,
                                                              **{"trainer.run_name": name,
                                                                 "trainer.save_every_n_steps": 2})))
        try:
            assert isinstance(engine.task, BlockDiffusionTask) == (name == "bd3")
            result = engine.fit()
        finally:
            engine.close()
        assert math.isfinite(result["val/loss"])
    saved = TdlmForMaskedOrCausalLM.from_pretrained(str(tmp_path / "runs" / "bd3" / "checkpoints" / "step_0000002" /
                                                        "model"))
    assert saved.config.block_size == 8


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_hf_backbones_take_the_block_causal_mask(tmp_path, family):
    """A Hugging Face backbone gets the block-causal pair mask as a 4D additive mask and the repeated positions
    through its own interface: the vectorised block NELBO equals the naive loop on it, and a run trains, exports
    L' and samples (uncached: HF models have no ``KVCache``). Shifted logits (the default of an adapted causal LM)
    are refused in one line."""
    from hf_models import run_overrides, tiny_model_dir

    from tdlm.data import load_pretrained_tokenizer
    from tdlm.hf_backbone import build_pretrained
    from tdlm.runs import load_model_dir
    from tdlm.tasks import text_engine

    model_dir = tiny_model_dir(tmp_path / "models", family)
    over = run_overrides(tmp_path, model_dir, **{"diffusion.block_size": 4, "trainer.max_steps": 2,
                                                 "trainer.save_every_n_steps": 2, "model.shift_logits": False})
    cfg = load_config(None, over)
    tok = load_pretrained_tokenizer(cfg.data.tokenizer)
    model = build_pretrained(cfg.model, cfg.diffusion, tok, 16, log=lambda *a: None).eval()
    g = torch.Generator().manual_seed(0)
    ids = tok.convert_tokens_to_ids("a") + torch.randint(0, 6, (3, 16), generator=g)
    valid = torch.ones_like(ids, dtype=torch.bool)
    noise = training_noise("bernoulli", 4)
    masked, _, weight, _ = noise.mask(*noise.draw(torch.Generator().manual_seed(1), 3, 16), valid)
    with torch.no_grad():
        out = block_diffusion_outputs(model, ids, valid, masked, masked.flatten().nonzero().squeeze(1), weight,
                                      tok.mask_token_id, 4)
        loop = block_diffusion_loop(model, ids, masked, weight, tok.mask_token_id, 4)
    torch.testing.assert_close(sequence_sums(out)[:, 0], loop, rtol=1e-5, atol=1e-5)
    engine = text_engine(cfg)
    try:
        result = engine.fit()
    finally:
        engine.close()
    assert math.isfinite(result["val/loss"])
    exported = load_model_dir(tmp_path / "runs" / "t" / "checkpoints" / "step_0000002" / "model")
    assert exported.config.block_size == 4
    samples = block_generate(exported, 2, 16, 4, tok.mask_token_id, SamplerConfig(steps=2),
                             sample_generators(0, range(2)))
    assert samples.ids.shape == (2, 16) and (samples.ids != tok.mask_token_id).all()
    if family == "llama":
        with pytest.raises(ConfigError, match="diffusion.block_size: 4 needs the block-causal mask .*shifted"):
            text_engine(load_config(None, run_overrides(tmp_path, model_dir, **{"diffusion.block_size": 4,
                                                                                "trainer.run_name": "shift"})))
        with pytest.raises(ConfigError, match="model.attention_anneal_steps must be 0"):
            load_config(None, over + ["model.attention_anneal_steps=5"])


def test_block_sampling_continues_a_prompt():
    """Whole prompt blocks enter the clean prefix: greedy low-confidence sampling (no randomness) continued from
    the first two blocks of a free sample reproduces the rest of it. A prompt ending inside a block is that
    block's fixed start; cached and uncached agree there too."""
    model = tiny_model(max_seq_len=24).eval()
    cfg = SamplerConfig(steps=2, method="low_confidence", temperature=0.0)
    free = block_generate(model, 2, 24, 4, MASK, cfg)
    cont = block_generate(model, 2, 24, 4, MASK, cfg, prompt=free.ids[:, :8])
    assert torch.equal(cont.ids, free.ids) and cont.blocks_run == 4
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]]).expand(2, -1)
    runs = [block_generate(model, 2, 24, 4, MASK, SamplerConfig(steps=3), sample_generators(1, range(2)),
                           use_kv_cache=kv, prompt=prompt) for kv in (True, False)]
    assert torch.equal(runs[0].ids, runs[1].ids) and torch.equal(runs[0].ids[:, :6], prompt)
    assert (runs[0].ids != MASK).all() and runs[0].blocks_run == 5
