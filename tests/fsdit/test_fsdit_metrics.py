"""FSDiT collectors on hand-built tensors with known answers, the FSDiT health rules each forced to fire, and the
generated reference page (docs/metrics_fsdit.md) kept current."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from tdlm.engine.task import LossOutput
from tdlm.fsdit.model import FSDiT, FSDiTConfig
from tdlm.metrics import docs
from tdlm.metrics import image as I
from tdlm.metrics.core import Inputs, MetricRunner, StepInfo
from tdlm.metrics.health import HealthMonitor
from tdlm.metrics.image_health import FSDIT_RULES, reference_page
from tdlm.metrics.media import Histogram, Image
from tdlm.metrics.sinks import JsonlSink

pytestmark = pytest.mark.usefixtures("one_thread")
PAGE = Path(__file__).resolve().parents[2] / "docs" / "metrics_fsdit.md"


def batch(**kw):
    """A FlowBatch with small defaults; tests override the fields they check."""
    B = len(kw.get("loss", [1.0, 2.0]))
    z = torch.zeros(B, 1, 1, 2)
    base = dict(loss=torch.ones(B), t=torch.full((B,), 0.5), x=z, noise=z, x_t=z, v_pred=z, v_target=z,
                cond=torch.ones(B, 2), labels=torch.arange(B), drop=torch.zeros(B, dtype=torch.bool),
                t_emb=torch.ones(B, 2), y_emb=torch.ones(B, 2), c=torch.ones(B, 2), context_scale=torch.ones(2))
    base.update({k: torch.as_tensor(v) for k, v in kw.items()})
    return I.FlowBatch(**base)


def feed(collector, *sources, step=1):
    for s in sources:
        collector.update(Inputs(step, s))
    return collector.compute()


def scalars(values):
    return {k: float(v) for k, v in values.items() if not isinstance(v, (Histogram, Image))}


# ------------------------------------------------------------------------------------------ essential
def objective(losses):
    """The engine's ``loss`` source of one micro-batch: its reported loss sum and its episodes."""
    loss = torch.as_tensor(losses, dtype=torch.float64)
    return {"loss": LossOutput(loss.sum(), torch.tensor(float(len(losses))), loss.sum(), batch(loss=losses))}


def test_train_loss_window_mean_and_bias_corrected_ema_across_windows():
    c = I.TrainLoss()  # one micro-batch per optimizer step (steps 1, 2; then 3 in the next window)
    c.update(Inputs(1, objective([1.0, 2.0, 3.0])))
    got = scalars(feed(c, objective([4.0, 6.0]), step=2))
    assert got["train/loss"] == pytest.approx(16 / 5)
    assert got["train/loss_ema"] == pytest.approx((0.99 * 0.01 * 2 + 0.01 * 5) / (1 - 0.99**2))
    c.reset()  # a new window keeps the EMA
    got = scalars(feed(c, objective([1.0]), step=3))
    assert got["train/loss"] == 1.0
    ema3 = 0.99 * (0.99 * 0.01 * 2 + 0.01 * 5) + 0.01 * 1
    assert got["train/loss_ema"] == pytest.approx(ema3 / (1 - 0.99**3))


def test_loss_by_time_bins_sums_and_counts():
    got = scalars(feed(I.LossByTime(num_t_bins=10), {"batch": batch(loss=[1.0, 2, 3, 5, 4],
                                                                  t=[0.05, 0.15, 0.95, 1.0, 0.12])}))
    assert got["train/loss_tbin_0"] == 1 and got["train/loss_tbin_1"] == 3 and got["train/loss_tbin_9"] == 4
    assert all(math.isnan(got[f"train/loss_tbin_{i}"]) for i in range(2, 9))


def test_optimization_param_norm_and_context_scale():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.bias.zero_()
    model.context_scale = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    steps = [{"step": StepInfo(torch.tensor(2.0), 0.1, 8, 0.5, 0, model)},
             {"step": StepInfo(torch.tensor(4.0), 0.2, 8, 1.5, 0, model)}]
    got = scalars(feed(I.Optimization(), *steps))
    assert got == {"train/grad_norm": 3.0, "train/lr": 0.2, "train/step_time": 1.0}
    assert scalars(feed(I.ParamNorm(), steps[0]))["train/param_norm"] == pytest.approx(math.sqrt(25 + 30))
    got = scalars(feed(I.ContextScale(), steps[0]))
    assert got == pytest.approx({"ctx/context_scale_mean": 2.5, "ctx/context_scale_std": math.sqrt(1.25),
                                 "ctx/context_scale_min": 1.0, "ctx/context_scale_max": 4.0})


def test_flow_stats_t_mean_velocity_cosine_and_z_std():
    v_pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    v_true = torch.tensor([[2.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    x = torch.tensor([[1.0, -1.0], [3.0, -3.0]]).view(2, 1, 1, 2)
    got = scalars(feed(I.FlowStats(), {"batch": batch(t=[0.2, 0.6], v_pred=v_pred, v_target=v_true, x=x)}))
    assert got["diffusion/t_mean"] == pytest.approx(0.4)
    assert got["diffusion/cos_eps_mean"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert got["latent/z_std"] == pytest.approx(math.sqrt(5))


def test_condition_stats_pairs_and_per_dimension_std():
    e1, y1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    e2, y2 = torch.tensor([[0.0, 2.0], [0.0, -2.0]]), torch.tensor([1, 1])
    got = scalars(feed(I.ConditionStats(cond_dim=2), {"batch": batch(loss=[1.0] * 3, cond=e1, labels=y1)},
                       {"batch": batch(cond=e2, labels=y2)}))
    e = torch.cat([e1, e2]).numpy()
    assert got["cond/support_pooled_abs_mean"] == pytest.approx(np.abs(e).mean())
    assert got["cond/support_pooled_l2_mean"] == pytest.approx(np.linalg.norm(e, axis=1).mean())
    assert got["cond/support_pooled_dim_std_mean"] == pytest.approx(e.std(0).mean())
    # pairs within a micro-batch: (0,1) same cos 1, (0,2) and (1,2) different cos 0; batch 2: same cos -1
    assert got["cond/same_class_pair_ratio"] == pytest.approx(2 / 4)
    assert got["cond/same_class_cos_mean"] == pytest.approx(0.0) and got["cond/same_class_cos_std"] == pytest.approx(1)
    assert got["cond/diff_class_cos_mean"] == 0.0 and got["cond/diff_class_cos_std"] == 0.0
    lone = scalars(feed(I.ConditionStats(cond_dim=2), {"batch": batch(cond=e2, labels=torch.tensor([0, 1]))}))
    assert math.isnan(lone["cond/same_class_cos_mean"])  # no same-class pair: no value, not 0


def test_perf_means_and_window_hit_rate():
    p1 = I.PerfTimes(0.1, 0.2, 0.0, 1.0, 1.4, cache_hits=3, cache_lookups=4, cache_items=10)
    p2 = I.PerfTimes(0.3, 0.4, 0.0, 3.0, 3.8, cache_hits=1, cache_lookups=4, cache_items=12)
    got = scalars(feed(I.Perf(), {"perf": p1}, {"perf": p2}))
    assert got == pytest.approx({"perf/data_time": 0.2, "perf/siglip_encode_time": 0.3, "perf/vae_time": 0.0,
                                 "perf/train_step_time": 2.0, "perf/total_iter_time": 2.6,
                                 "perf/siglip_cache_hit_rate": 0.5, "perf/siglip_cache_items": 12})


def test_validation_gap_bins_and_only_on_evaluation_steps():
    c = I.Validation(num_t_bins=10)
    assert c.compute() == {}  # not an evaluation step: nothing logged (not NaN)
    v = I.ValResult(torch.tensor([1.0, 3.0]), torch.tensor([0.05, 0.95]), torch.tensor([1.0, 1.0]),
                    torch.tensor([2.0, 2.0]))
    got = scalars(feed(c, {"val": v}))
    assert {k: got[k] for k in ("val/loss", "val/train_classes_loss", "val/train_val_gap", "val/loss_ema")} == \
        {"val/loss": 2.0, "val/train_classes_loss": 1.0, "val/train_val_gap": 1.0, "val/loss_ema": 2.0}
    assert got["val/loss_tbin_0"] == 1.0 and got["val/loss_tbin_9"] == 3.0 and math.isnan(got["val/loss_tbin_5"])
    c.reset()
    got = feed(c, {"val": I.ValResult(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([3.0]))})
    assert "val/loss_ema" not in got and float(got["val/train_val_gap"]) == -2.0


def test_few_shot_fid_is_logged_on_fid_steps_only_and_only_when_enabled():
    assert not I.FewShotFID.applies({"fid_every": 0}) and I.FewShotFID.applies({"fid_every": 100})
    c = I.FewShotFID()
    losses = (torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([1.0]))
    assert feed(c, {"val": I.ValResult(*losses)}) == {}  # an evaluation step without FID: nothing, not NaN
    fid = {"fid": 12.5, "kid_mean": 0.25, "kid_std": 0.125, "seconds": 3.0, "n_gen": 8}
    got = scalars(feed(c, {"val": I.ValResult(*losses, fid=fid)}))
    assert got == {"val/fid": 12.5, "val/kid": 0.25, "val/kid_std": 0.125, "perf/fid_time": 3.0}
    c.reset()
    assert c.compute() == {}


# ------------------------------------------------------------------------------------------ research
def test_condition_histograms_fixed_edges():
    e, y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    got = feed(I.ConditionHistograms(hist_bins=4, pooled_range=2.0), {"batch": batch(loss=[1.0] * 3, cond=e,
                                                                                     labels=y)})
    assert got["cond/support_pooled_hist"] == Histogram((0, 0, 3, 3), (-2, -1, 0, 1, 2))  # 0 -> [0,1), 1 -> [1,2]
    assert got["cond/same_class_cos_hist"].counts == (0, 0, 0, 1)  # cos 1 in the last bin [0.5, 1]
    assert got["cond/diff_class_cos_hist"].counts == (0, 0, 2, 0)  # cos 0 in [0, 0.5)
    assert got["cond/same_class_cos_hist"].edges == (-1, -0.5, 0, 0.5, 1)


def test_condition_debug_and_context_norms():
    out = batch(t_emb=[[2.0, 2.0], [2.0, 2.0]], y_emb=[[1.0, 1.0], [0.0, 0.0]], c=[[3.0, 4.0], [0.0, 0.0]],
                cond=[[3.0, 4.0], [1.0, 1.0]], drop=[False, True])
    got = scalars(feed(I.ConditionDebug(), {"batch": out}))
    assert got == pytest.approx({"dbg/t_emb_abs_mean": 2.0, "dbg/y_emb_abs_mean": 0.5, "dbg/c_abs_mean": 1.75,
                                 "dbg/c_l2_mean": 2.5, "dbg/support_pooled_abs_mean_model": 3.5,
                                 "dbg/support_pooled_l2_mean_model": 5.0})
    # LN([1,-1]) = LN([3,1]) = [1,-1]; LN([2,0]) = [1,-1], LN([0,4]) = [-1,1]; gate 2 -> ratio 2√2/√2 = 2
    out = batch(t_emb=[[1.0, -1.0], [3.0, 1.0]], y_emb=[[2.0, 0.0], [0.0, 4.0]], c=[[3.0, 4.0], [1.0, 0.0]],
                context_scale=[2.0, 2.0])
    got = scalars(feed(I.ContextNorms(), {"batch": out}))
    assert got["ctx/c_norm_t_emb_ratio"] == pytest.approx(2.0, rel=1e-4)
    assert got["ctx/context_norm_std"] == pytest.approx(2.0)  # std of ‖c‖ = (5, 1)


def test_gradient_groups_raw_effective_and_actual_update():
    model = nn.Module()
    model.y_embedder = nn.Linear(2, 1, bias=False)
    model.null_y = nn.Parameter(torch.zeros(1))
    model.blocks = nn.Linear(2, 1, bias=False)
    model.y_embedder.weight.grad = torch.tensor([[3.0, 4.0]])
    model.null_y.grad = torch.zeros(1)
    model.blocks.weight.grad = torch.tensor([[6.0, 8.0]])
    c = I.GradientGroups()
    c.update(Inputs(5, {"grads": I.GradView(model, 0.1)}))
    with torch.no_grad():  # "the optimizer step": move the encoder side by (0.6, 0.8), leave the DiT alone
        model.y_embedder.weight -= torch.tensor([[0.6, 0.8]])
    got = scalars(c.compute())
    assert got == pytest.approx({"grad/encoder_raw_norm": 5.0, "grad/encoder_effective_step": 0.5,
                                 "grad/encoder_update_norm": 1.0, "grad/dit_raw_norm": 10.0,
                                 "grad/dit_effective_step": 1.0, "grad/dit_update_norm": 0.0})


# ------------------------------------------------------------------------------------------ advanced
TINY = dict(image_size=8, patch_size=2, hidden_size=24, depth=2, num_heads=3, mlp_ratio=2.0, cond_dim=5)


def tiny_fsdit() -> FSDiT:
    torch.manual_seed(0)
    model = FSDiT(FSDiTConfig(**TINY))
    with torch.no_grad():  # undo adaLN-Zero so the blocks do something
        for layer in [b.adaLN_modulation[-1] for b in model.blocks]:
            layer.weight.normal_(0, 0.1)
            layer.bias.normal_(0, 0.1)
    return model


def probe_batch(B=3):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(B, 3, 8, 8, generator=g)
    return batch(loss=torch.ones(B), t=torch.rand(B, generator=g), x_t=x_t, cond=torch.randn(B, 5, generator=g),
                 drop=torch.zeros(B, dtype=torch.bool))


@torch.no_grad()
def test_model_probe_matches_hooks_and_explicit_attention():
    model, out = tiny_fsdit().train(), probe_batch()
    got = {}
    for chunk in (2**24, 1):  # whole batch, and one episode per chunk
        col = I.ModelProbe(depth=2, num_heads=3, chunk_elements=chunk)
        col.update(Inputs(1, {"batch": out, "model": model}))
        got[chunk] = scalars(col.compute())
    assert model.training  # restored after the eval-mode probe
    assert got[1] == pytest.approx(got[2**24], rel=1e-6)  # float32 forwards of different batch sizes
    model.eval()
    acts = []
    hooks = [b.register_forward_hook(lambda m, a, h: acts.append(h)) for b in model.blocks]
    _, probs = model(out.x_t, out.t, out.cond, drop=out.drop, return_attn=True)
    for h in hooks:
        h.remove()
    g = got[1]
    for i, (h, p) in enumerate(zip(acts, probs)):
        assert g[f"act/layer{i}_abs_mean"] == pytest.approx(float(h.abs().mean()), rel=1e-5)
        assert g[f"act/layer{i}_rms"] == pytest.approx(float(h.pow(2).mean().sqrt()), rel=1e-5)
        ent = -(p * p.log()).sum(-1)  # (B, H, N)
        assert g[f"attn/entropy_layer{i}"] == pytest.approx(float(ent.mean()), rel=1e-5)
    for h in range(3):
        assert g[f"attn/entropy_head{h}_last"] == pytest.approx(float((-(probs[1] * probs[1].log()).sum(-1))[:, h]
                                                                      .mean()), rel=1e-5)
    assert g["act/rms_ratio_last_first"] == pytest.approx(g["act/layer1_rms"] / g["act/layer0_rms"])
    for block in model.blocks:  # zero queries and keys: uniform attention over the 16 patches, entropy ln 16
        block.attn.qkv.weight.zero_()
        block.attn.qkv.bias.zero_()
    col = I.ModelProbe(depth=2, num_heads=3)
    col.update(Inputs(1, {"batch": out, "model": model}))
    got = scalars(col.compute())
    assert all(got[k] == pytest.approx(math.log(16), rel=1e-9) for k in got if k.startswith("attn/"))


class ZeroVelocity(nn.Module):
    """v = 0: every sampler returns its starting noise, so the sample statistics are those of the noise."""

    def forward(self, x, t, cond=None, drop=None):
        return torch.zeros_like(x)


def test_sample_quality_statistics_grids_and_names():
    S, K, shape = 2, 3, (3, 4, 4)
    req = I.SampleRequest(ZeroVelocity(), torch.randn(S, 5), torch.zeros(S, 2, 3, 4, 4), shape, K, steps=2,
                          method="heun", cfg_scale=2.5, seed=7)
    c = I.SampleQuality()
    c.update(Inputs(1, {"sampler": req}))
    got = c.compute()
    noise = torch.randn((S * K, *shape), generator=torch.Generator().manual_seed(7)).double()
    pairs = [float((noise[s * K + a] - noise[s * K + b]).pow(2).mean()) for s in range(S)
             for a in range(K) for b in range(a + 1, K)]
    vals = scalars(got)
    assert vals["sample_diversity/pairwise_mse_mean"] == pytest.approx(np.mean(pairs))
    assert vals["sample_diversity/pairwise_mse_std"] == pytest.approx(np.std(pairs))
    assert vals["sample_diversity/pairwise_mse_min"] == pytest.approx(min(pairs))
    assert vals["sample_diversity/pairwise_mse_max"] == pytest.approx(max(pairs))
    assert vals["final_sample_stats/mean"] == pytest.approx(float(noise.mean()))
    assert vals["final_sample_stats/std"] == pytest.approx(float(noise.std(unbiased=False)))
    assert vals["final_sample_stats/min"] == float(noise.min()) and vals["final_sample_stats/max"] == float(noise.max())
    assert vals["final_sample_stats/out_of_range_frac"] == pytest.approx(float((noise.abs() > 1).double().mean()))
    assert {k for k in got if k.startswith("samples/")} == {"samples/cfg_1", "samples/cfg_2.5", "samples/uncond"}
    # 2 rows of 4 px images with 2 px borders; cfg grids show the 2 supports then the 3 samples
    assert got["samples/cfg_1"].pixels.shape == (2 * 6 + 2, 5 * 6 + 2, 3)
    assert got["samples/uncond"].pixels.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    c.reset()
    c.update(Inputs(2, {"sampler": I.SampleRequest(**{**vars(req), "cfg_scale": 1.0})}))
    assert {k for k in c.compute() if k.startswith("samples/")} == {"samples/cfg_1", "samples/uncond"}


def test_image_grid_maps_unit_range_to_bytes():
    grid = I.image_grid([torch.stack([torch.full((3, 2, 2), -1.0), torch.ones(3, 2, 2)])], gap=1)
    assert grid.shape == (4, 7, 3) and grid.dtype == np.uint8
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 255).all() and (grid[0] == 255).all()


def test_media_in_jsonl_and_final_collectors_when_their_tier_is_off(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    runner = MetricRunner(I.IMAGE.build({"essential": True}, {"cond_dim": 2, "sample_sets": 1}),
                          {"essential": 1, "research": 2, "advanced": 2}, last_step=3, sinks=[sink])
    built = {type(c).__name__: c for c in runner.collectors}
    assert built["SampleQuality"].final_only and "ModelProbe" not in built and "GradientGroups" not in built
    req = I.SampleRequest(ZeroVelocity(), torch.randn(1, 5), torch.zeros(1, 1, 3, 4, 4), (3, 4, 4), 2, 1, "euler",
                          2.0, 0)
    for step in (1, 2, 3):
        runner.update(step, sampler=req, batch=batch(cond=torch.ones(2, 2)))
        runner.log(step, runner.compute(step))
    sink.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("samples/cfg_1" in r) for r in recs] == [False, False, True]  # advanced off: the last step only
    path = tmp_path / recs[-1]["samples/cfg_2"]
    assert path.name == "samples_cfg_2_step0000003.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert "cond/support_pooled_hist" not in recs[-1]  # research off


# ------------------------------------------------------------------------------------------ health rules
HEALTHY = {"train/loss": 0.3, "cond/same_class_cos_mean": 0.8, "cond/diff_class_cos_mean": 0.3, "latent/z_std": 0.5,
           "sample_diversity/pairwise_mse_mean": 0.3, "act/rms_ratio_last_first": 1.5,
           "diffusion/cos_eps_mean": 0.6, "diffusion/t_mean": 0.49, "val/fid": 10.0}
FIRES = {  # one change each that must fire exactly the named rule
    "nonfinite_loss": {"train/loss": math.inf},
    "cond_not_discriminative": {"cond/same_class_cos_mean": 0.32},
    "z_std_off": {"latent/z_std": 5.0},
    "mode_collapse": {"sample_diversity/pairwise_mse_mean": 0.005},
    "act_rms_exploding": {"act/rms_ratio_last_first": 25.0},
    "cos_eps_negative": {"diffusion/cos_eps_mean": -0.2},
    "t_mean_off": {"diffusion/t_mean": 0.7},
}


def fired(values, step=1000, overrides=None):
    flags, hits = HealthMonitor(FSDIT_RULES, overrides, warmup_steps=100).check(step, values)
    return flags, {r.name for r, _ in hits}, hits


def test_healthy_values_fire_nothing():
    flags, names, _ = fired(HEALTHY)
    assert names == set() and set(flags) == {f"health/{r.name}" for r in FSDIT_RULES}
    assert fired({**HEALTHY, "latent/z_std": 0.1})[1] == {"z_std_off"}  # too small as well as too large


@pytest.mark.parametrize("rule", sorted(FIRES))
def test_each_rule_fires(rule):
    flags, names, hits = fired({**HEALTHY, **FIRES[rule]})
    assert names == {rule} and flags[f"health/{rule}"] == 1.0
    assert hits[0][0].stop == (rule == "nonfinite_loss")


def test_fid_rising_fires_above_its_best_by_more_than_max_rise_and_clears():
    monitor = HealthMonitor(FSDIT_RULES, warmup_steps=100)
    for step, fid, expect in [(100, 10.0, 0), (200, 11.9, 0), (300, 12.1, 1), (400, 8.0, 0), (500, 9.7, 1)]:
        flags, _ = monitor.check(step, {"val/fid": fid})
        assert flags["health/fid_rising"] == expect, (step, fid)
    assert monitor.memory["fid_rising"] == {"best": 8.0}
    quiet = HealthMonitor(FSDIT_RULES, {"fid_rising": {"max_rise": 0.5}})
    assert [quiet.check(s, {"val/fid": f})[0]["health/fid_rising"] for s, f in ((1, 10.0), (2, 14.0))] == [0, 0]


def test_rule_overrides_and_warmup():
    assert fired({**HEALTHY, **FIRES["mode_collapse"]}, overrides={"mode_collapse": {"min": 0.001}})[1] == set()
    assert fired({**HEALTHY, **FIRES["cos_eps_negative"]}, step=50)[1] == set()  # inside LR warm-up


# ------------------------------------------------------------------------------------------ reference page
def test_reference_page_is_current_and_complete():
    page = reference_page()
    assert PAGE.read_text() == page, "docs/metrics_fsdit.md is stale: python -m tdlm.metrics.docs " \
                                     "tdlm.metrics.image_health:reference_page docs/metrics_fsdit.md"
    for spec in I.IMAGE.specs():
        assert f"| `{spec.name}` | {spec.unit} |" in page, spec.name
    for rule in FSDIT_RULES:
        assert f"| `{rule.name}` |" in page
    assert docs.main(["--check", "tdlm.metrics.image_health:reference_page", str(PAGE)]) == 0

