"""Text collectors on hand-built tensors with known answers, per-bucket gradients against autograd, and a run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from tdlm.config import load_config
from tdlm.metrics import text as T
from tdlm.metrics.core import Inputs, MetricRunner
from tdlm.metrics.text_health import build_text_metrics
from tdlm.model import TdlmConfig, TdlmForMaskedOrCausalLM
from tdlm.engine.task import LossOutput
from tdlm.objective import StepOutputs, reported_sum
from tdlm.tasks import text_engine

PAD, MASK = 4, 5


def hand_batch():
    """3 sequences of 4 tokens (the last has a pad); mask ratios 1/4 (low), 2/4 (medium), 3/3 (high)."""
    ids = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 2], [2, 0, 1, PAD]])
    valid = ids != PAD
    masked = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # masked tokens in row-major order have targets 0, 1, 1, 2, 0, 1; predictions (argmax) 0, 1, 0, 0, 0, 2
    logits = torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 2, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0],
                           [2, 1, 1, 0, 0, 0], [0.5, 0, 0, 0, 0, 0], [0, 1, 4, 0, 0, 0]])
    t = torch.tensor([0.2, 0.5, 0.9])
    w = 1 / t
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    w_tok = w[torch.tensor([0, 1, 1, 2, 2, 2])]
    positions = masked.flatten().nonzero().squeeze(1)
    return StepOutputs((w_tok * ce).sum(), valid.sum(), ids, valid, masked, t, w, ce, logits, positions), w_tok


def feed(collector, out, step=1, clip_weight=0.0):
    """One update with the sources the engine gives a micro-batch: the batch and its LossOutput."""
    loss = LossOutput(out.loss_sum, out.num_tokens, reported_sum(out, clip_weight), out)
    collector.update(Inputs(step, {"batch": out, "loss": loss}))
    return {k: float(v) for k, v in collector.compute().items()}


def test_essential_collectors_known_values():
    out, w_tok = hand_batch()
    acc = T.MaskAccuracy()
    acc.update(Inputs(1, {"batch": out}))
    acc.update(Inputs(1, {"batch": out}))  # a second micro-batch of the same optimizer step
    got = feed(acc, out, step=2)
    assert got["metrics/mask_accuracy"] == 0.5  # 3 of 6 correct, each time
    assert got["metrics/total_masked_tokens"] == 9.0  # 18 masked tokens over 2 optimizer steps
    assert got["metrics/valid_ratio"] == pytest.approx(11 / 12)
    assert feed(T.DiffusionTime(), out)["diffusion/t_mean"] == pytest.approx(1.6 / 3)
    assert feed(T.TrainLoss(), out)["train/loss"] == pytest.approx(float(out.loss_sum) / 11)


def test_importance_rows_weigh_mask_accuracy_and_t_mean_by_p_over_q():
    """An importance-sampled row counts with p(t)/q(t): rows correct 1/1, 1/2, 1/3 with ratios 2, 1, 0.5 give
    accuracy (2 + 1 + 0.5) / (2 + 2 + 1.5); the masked-token count stays the plain count."""
    out, _ = hand_batch()
    out.t_ratio = torch.tensor([2.0, 1.0, 0.5])
    got = feed(T.MaskAccuracy(), out)
    assert got["metrics/mask_accuracy"] == pytest.approx(3.5 / 5.5)
    assert got["metrics/total_masked_tokens"] == 6.0
    assert feed(T.DiffusionTime(), out)["diffusion/t_mean"] == pytest.approx((0.4 + 0.5 + 0.45) / 3.5)


def test_estimator_spread_is_the_std_of_the_rows_nelbo_per_token():
    out, w_tok = hand_batch()
    per_row = torch.zeros(3, dtype=torch.float64).index_add_(
        0, torch.tensor([0, 1, 1, 2, 2, 2]), w_tok.double() * out.token_ce.double()) / torch.tensor([4.0, 4.0, 3.0])
    got = feed(T.EstimatorSpread(), out)["research/nelbo_row_std"]
    assert got == pytest.approx(float(per_row.std(unbiased=False)), rel=1e-12)
    assert got == pytest.approx(float(np.std(per_row.numpy())), rel=1e-12)


def test_train_loss_reports_the_unclipped_nelbo():
    out, w_tok = hand_batch()
    clipped = StepOutputs((w_tok.clamp(max=2) * out.token_ce).sum(), *list(vars(out).values())[1:])
    got = feed(T.TrainLoss(), clipped, clip_weight=2.0)["train/loss"]
    assert got == pytest.approx(float((w_tok * out.token_ce).sum()) / 11)
    assert got > float(clipped.loss_sum) / 11


def test_research_buckets_and_weight_difficulty_known_values():
    out, w_tok = hand_batch()
    got = feed(T.CorruptionBuckets(), out)
    assert [got[f"research/{b}_corruption_accuracy"] for b in T.BUCKETS] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [got[f"research/{b}_corruption_count"] for b in T.BUCKETS] == [1.0, 1.0, 1.0]
    got = feed(T.WeightDifficulty(), out)
    difficulty = (1 - out.logits.softmax(-1).max(-1).values).double().numpy()  # the naive definition
    w = w_tok.double().numpy()
    assert got["research/weight_difficulty_correlation"] == pytest.approx(stats.pearsonr(w, difficulty)[0], abs=1e-6)
    assert got["research/avg_loss_weight"] == pytest.approx(w.mean(), rel=1e-6)
    assert got["research/weight_std"] == pytest.approx(w.std(), rel=1e-6)
    assert got["research/avg_prediction_difficulty"] == pytest.approx(difficulty.mean(), rel=1e-6)
    empty = T.CorruptionBuckets()
    assert math.isnan(empty.compute()["research/low_corruption_accuracy"].item())


def tiny_model(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = TdlmConfig(vocab_size=6, hidden_size=16, num_layers=layers, num_heads=2, max_seq_len=8,
                     mask_token_id=MASK, pad_token_id=PAD)
    return TdlmForMaskedOrCausalLM(cfg)


def model_outputs(model, ids, masked, t, clip=0.0):
    valid = ids != PAD
    logits = model(torch.where(masked, MASK, ids), valid, logits_mask=masked)
    ce = F.cross_entropy(logits.float(), ids[masked], reduction="none")
    w = 1 / t
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)[masked]
    w_tok = w[rows].clamp(max=clip) if clip else w[rows]
    positions = masked.flatten().nonzero().squeeze(1)
    return (StepOutputs((w_tok * ce).sum(), valid.sum(), ids, valid, masked, t, w, ce, logits, positions), w_tok,
            rows)


@pytest.mark.parametrize("clip", [0.0, 3.0])
def test_bucket_gradient_norms_equal_autograd_of_each_bucket_loss(clip):
    model = tiny_model()
    params = list(model.parameters())
    ids, masked = hand_batch()[0].input_ids, hand_batch()[0].masked
    micro = [(ids, masked, torch.tensor([0.2, 0.5, 0.9])), (ids.flip(0), masked.flip(1), torch.tensor([0.3, 0.6, 0.1]))]
    n_global = sum(int((m[0] != PAD).sum()) for m in micro)
    col = T.BucketGradNorms(clip_weight=clip)
    for step_ids, step_mask, t in micro:  # two micro-batches of one optimizer step
        out, _, _ = model_outputs(model, step_ids, step_mask, t, clip)
        col.update(Inputs(1, {"batch": out, "model": model}))
        (out.loss_sum / n_global).backward()  # the training backward, through the same graph afterwards
    got = {k: float(v) for k, v in col.compute().items()}
    total_grad = torch.cat([p.grad.reshape(-1) for p in params])

    # Reference: each bucket's loss computed separately (fresh forwards), summed over micro-batches, autograd.grad.
    norms = []
    for k in range(3):
        loss = 0.0
        for step_ids, step_mask, t in micro:
            out, w_tok, rows = model_outputs(model, step_ids, step_mask, t, clip)
            ratio_ = out.masked.sum(1) / out.valid.sum(1)
            in_bucket = (torch.bucketize(ratio_, torch.tensor([0.3, 0.7]), right=True) == k)[rows]
            loss = loss + (w_tok * out.token_ce)[in_bucket].sum() / n_global
        g = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        norms.append(float(torch.cat([x.reshape(-1) for x in g]).norm()))
    for k, b in enumerate(T.BUCKETS):
        assert got[f"research/gradient_norm_{b}_corruption"] == pytest.approx(norms[k], rel=1e-5)
    assert got["research/gradient_norm_ratio_high_to_low"] == pytest.approx(norms[2] / norms[0], rel=1e-5)
    assert got["research/gradient_norm_total"] == pytest.approx(float(total_grad.norm()), rel=1e-5)
    # the norm of the sum is not the sum of the norms (no proportional split could give these)
    assert got["research/gradient_norm_total"] < sum(norms)


def test_bucket_gradient_norm_is_nan_for_an_empty_bucket():
    model = tiny_model()
    ids = torch.tensor([[0, 1, 2, 3]])
    out, _, _ = model_outputs(model, ids, torch.tensor([[True, True, False, False]]), torch.tensor([0.5]))
    col = T.BucketGradNorms()
    col.update(Inputs(1, {"batch": out, "model": model}))
    got = {k: float(v) for k, v in col.compute().items()}
    assert math.isnan(got["research/gradient_norm_low_corruption"])
    assert got["research/gradient_norm_medium_corruption"] == pytest.approx(got["research/gradient_norm_total"])
    assert math.isnan(got["research/gradient_norm_ratio_high_to_low"])


def naive_probe(model, noisy, valid):
    """Per-layer entropy / hidden norm and the diversity, with explicit loops over sequences and positions."""
    res = model.hidden_states(noisy, valid, return_attention=True, return_all_hidden=True)
    ents, norms = [], []
    for p, h in zip(res["attentions"], res["all_hidden"]):
        e = [float(-sum(x * math.log(x) for x in p[b, hd, i][valid[b]].tolist() if x > 0))
             for b in range(p.shape[0]) for hd in range(p.shape[1]) for i in range(p.shape[2]) if valid[b, i]]
        ents.append(np.mean(e))
        norms.append(float(h[valid].norm(dim=-1).mean()))
    div = []
    for b in range(noisy.shape[0]):
        u = F.normalize(res["all_hidden"][-1][b][valid[b]], dim=-1)
        n = u.shape[0]
        div.append(1 - np.mean([float(u[i] @ u[j]) for i in range(n) for j in range(n) if i != j]))
    return ents, norms, float(np.mean(div))


@torch.no_grad()
def test_model_probe_matches_naive_loops_and_uniform_attention():
    model = tiny_model()
    out, _ = hand_batch()
    model.train()
    got = {}
    for chunk in (2**24, 1):  # whole batch, and one sequence per chunk
        col = T.ModelProbe(num_layers=2, mask_id=MASK, chunk_elements=chunk)
        col.update(Inputs(1, {"batch": out, "model": model}))
        got[chunk] = {k: float(v) for k, v in col.compute().items()}
    assert model.training  # restored after the eval-mode probe
    assert got[1] == pytest.approx(got[2**24], rel=1e-9)
    model.eval()
    ents, norms, div = naive_probe(model, torch.where(out.masked, MASK, out.input_ids), out.valid)
    g = got[1]
    for i in range(2):
        assert g[f"advanced/attention_entropy_layer{i}"] == pytest.approx(ents[i], rel=1e-5)
        assert g[f"advanced/hidden_state_norm_layer{i}"] == pytest.approx(norms[i], rel=1e-5)
    assert g["advanced/attention_entropy"] == g["advanced/attention_entropy_proxy"] == pytest.approx(np.mean(ents))
    assert g["advanced/hidden_state_norm"] == pytest.approx(norms[1], rel=1e-5)
    assert g["advanced/sequence_diversity"] == pytest.approx(div, rel=1e-5)
    # zero queries and keys: attention is uniform over the valid keys, entropy log(4) on 8 queries, log(3) on 3
    for block in model.blocks:
        block.attn.qkv.weight.zero_()
    col = T.ModelProbe(num_layers=2, mask_id=MASK)
    col.update(Inputs(1, {"batch": out, "model": model}))
    expect = (8 * math.log(4) + 3 * math.log(3)) / 11
    assert float(col.compute()["advanced/attention_entropy_layer1"]) == pytest.approx(expect, rel=1e-6)


# ------------------------------------------------------------------------------------------ through the trainer
def run_jsonl(overrides):
    engine = text_engine(load_config(None, overrides))
    try:
        engine.fit()
    finally:
        engine.close()
    return [json.loads(x) for x in (engine.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_logs_every_metric_and_runs_expensive_inputs_only_when_due(tiny, monkeypatch):
    calls = {"grads": [], "probe": 0}
    real_grads, real_hidden = T.loss_grad_vectors, TdlmForMaskedOrCausalLM.hidden_states

    def counting_grads(losses, params):
        calls["grads"].append(len(losses))
        return real_grads(losses, params)

    def counting_hidden(self, ids, attention_mask=None, return_attention=False, return_all_hidden=False, *rest):
        calls["probe"] += bool(return_attention)
        return real_hidden(self, ids, attention_mask, return_attention, return_all_hidden, *rest)
    monkeypatch.setattr(T, "loss_grad_vectors", counting_grads)
    monkeypatch.setattr(TdlmForMaskedOrCausalLM, "hidden_states", counting_hidden)

    on = {f"metrics.tiers.{t}.enabled": True for t in ("research", "advanced")}
    recs = run_jsonl(tiny(**on, **{"trainer.max_steps": 6, "trainer.eval_every_n_steps": 3,
                                   "metrics.detailed_metrics_steps": 3, "metrics.attention_analysis_steps": 3}))
    assert calls == {"grads": [3, 3], "probe": 2}  # steps 3 and 6 only; one micro-batch each
    by_step = {r["step"]: r for r in recs if "train/loss" in r}
    names = {s.name.replace("{i}", str(i)) for s in T.TEXT.specs() for i in range(2)} - {
        n for n in (s.name for s in T.TEXT.specs()) if n.startswith("summary/")}
    for name in names:
        assert math.isfinite(by_step[6][name]), name
    assert all(not k.startswith(("research/", "advanced/")) for s in (1, 2, 4, 5) for k in by_step[s])
    for s in (3, 6):
        assert by_step[s]["research/gradient_norm_total"] == pytest.approx(by_step[s]["train/grad_norm"], rel=1e-4)
        counts = sum(by_step[s][f"research/{b}_corruption_count"] for b in T.BUCKETS)
        assert counts == 3 * 8  # every sequence of the 3-step research window, in exactly one bucket

    calls.update(grads=[], probe=0)
    recs = run_jsonl(tiny(**{"trainer.max_steps": 3, "metrics.tiers.essential.enabled": False,
                             "trainer.run_name": "tiers_off"}))
    assert calls == {"grads": [], "probe": 0}
    assert {k for k in recs[0] if not k.startswith("health/")} == {"step", "train/loss"}  # only the required one


def test_ar_run_skips_diffusion_collectors(tiny):
    on = {f"metrics.tiers.{t}.enabled": True for t in ("research", "advanced")}
    recs = run_jsonl(tiny(**on, **{"model.causal": True, "trainer.max_steps": 4}))
    last = [r for r in recs if "train/loss" in r][-1]
    assert math.isfinite(last["advanced/attention_entropy"]) and math.isfinite(last["train/param_norm"])
    assert not any(k.startswith(("research/", "metrics/", "diffusion/")) for k in last)


def test_runner_built_from_config_respects_tiers(tiny):
    cfg = load_config(None, tiny(**{"metrics.tiers.research.enabled": True}))
    runner = build_text_metrics(cfg, mask_id=MASK)
    assert isinstance(runner, MetricRunner)
    assert {type(c).__name__ for c in runner.collectors} == {
        "TrainLoss", "Optimization", "TrainingCompute", "ParamNorm", "Validation", "DiffusionTime", "MaskAccuracy",
        "CorruptionBuckets",
        "WeightDifficulty", "EstimatorSpread", "BucketGradNorms"}
    essential_off = load_config(None, tiny(**{"metrics.tiers.essential.enabled": False}))
    # the loss (the NaN stop reads it) and validation (the best checkpoint is chosen by it) run whatever the tiers
    assert {type(c).__name__ for c in build_text_metrics(essential_off, mask_id=MASK).collectors} == {
        "TrainLoss", "Validation"}
