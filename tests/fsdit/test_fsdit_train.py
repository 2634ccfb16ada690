"""FSDiT end to end on the shared engine (``Engine(cfg, FlowMatchingTask)``; the entry script
``tdlm/fsdit/train.py`` is only ever launched, never imported) on the generated dataset: every metric of the three
metric guides present and finite with every tier on, expensive inputs only on due steps, exact resume, the VAE
and online-SigLIP switches, one-line configuration errors that name the key, the best checkpoint, the
``stopped.json`` of a health-rule stop, gradient accumulation, and 2-process DDP and DeepSpeed ZeRO-2 runs equal
to one process over the same global batch."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import launch_two_processes

from tdlm.engine.checkpoint import list_checkpoints, read_state
from tdlm.engine.config import ConfigError
from tdlm.engine.loop import Engine
from tdlm.fsdit import fewshot, flow
from tdlm.fsdit.config import load_fsdit_config
from tdlm.fsdit.data import make_synthetic_cifar
from tdlm.fsdit.model import FSDiT
from tdlm.fsdit.task import FlowMatchingTask, cli
from tdlm.metrics.image import IMAGE

pytestmark = pytest.mark.usefixtures("one_thread")
ENTRY = Path(__file__).resolve().parents[2] / "tdlm" / "fsdit" / "train.py"

# The metric names of the three FSDiT metric guides (seeds 000, 001, 002), written out so that the contract
# cannot shrink with the registry. Families are expanded for depth 2, 2 heads, 10 t-bins and cfg_scale 2.
DEPTH, HEADS, BINS, CFG = 2, 2, 10, "2"
SEED_000 = [
    "train/loss", "train/loss_ema", "train/grad_norm", "train/param_norm", "train/lr", "train/step_time",
    *(f"train/loss_tbin_{i}" for i in range(BINS)),
    "val/loss", "val/train_val_gap", *(f"val/loss_tbin_{i}" for i in range(BINS)),
    "cond/support_pooled_abs_mean", "cond/support_pooled_l2_mean", "cond/support_pooled_dim_std_mean",
    "cond/same_class_pair_ratio", "cond/same_class_cos_mean", "cond/diff_class_cos_mean",
    "cond/same_class_cos_std", "cond/diff_class_cos_std",
    "cond/support_pooled_hist", "cond/same_class_cos_hist", "cond/diff_class_cos_hist",
    "dbg/t_emb_abs_mean", "dbg/y_emb_abs_mean", "dbg/c_abs_mean", "dbg/c_l2_mean",
    "dbg/support_pooled_abs_mean_model", "dbg/support_pooled_l2_mean_model",
    *(f"act/layer{i}_{k}" for i in range(DEPTH) for k in ("abs_mean", "rms")),
    *(f"attn/entropy_layer{i}" for i in range(DEPTH)), *(f"attn/entropy_head{h}_last" for h in range(HEADS)),
    "perf/data_time", "perf/siglip_encode_time", "perf/vae_time", "perf/train_step_time", "perf/total_iter_time",
    "perf/siglip_cache_hit_rate", "perf/siglip_cache_items",
    "samples/cfg_1", f"samples/cfg_{CFG}", "samples/uncond",
]
SEED_001 = [
    "grad/encoder_raw_norm", "grad/dit_raw_norm", "grad/encoder_update_norm", "grad/dit_update_norm",
    "grad/encoder_effective_step", "grad/dit_effective_step", "ctx/c_norm_t_emb_ratio", "ctx/context_norm_std",
    "ctx/context_scale_mean", "ctx/context_scale_std", "ctx/context_scale_min", "ctx/context_scale_max",
]
SEED_002 = [
    "diffusion/t_mean", "diffusion/cos_eps_mean", "latent/z_std",
    *(f"sample_diversity/pairwise_mse_{k}" for k in ("mean", "std", "min", "max")),
    *(f"final_sample_stats/{k}" for k in ("mean", "std", "min", "max")),
]
HISTOGRAMS = {"cond/support_pooled_hist", "cond/same_class_cos_hist", "cond/diff_class_cos_hist"}
IMAGES = {"samples/cfg_1", f"samples/cfg_{CFG}", "samples/uncond"}


def registry_names() -> set[str]:
    """Every name the registry declares, families expanded as the seeds' list is."""
    out = set()
    for spec in IMAGE.specs():
        n = spec.name
        if "{i}" in n:
            out |= {n.replace("{i}", str(i)) for i in range(BINS if "tbin" in n else DEPTH)}
        elif "{h}" in n:
            out |= {n.replace("{h}", str(h)) for h in range(HEADS)}
        else:
            out.add(n.replace("{s}", CFG))
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdit_data")
    make_synthetic_cifar(root, num_classes=10, per_class=10, seed=0)  # 12 images per class: 6/2/2 classes
    return root


def overrides(tmp_path, data_root, **extra):
    base = {
        "model.patch_size": 8, "model.hidden_size": 24, "model.depth": DEPTH, "model.num_heads": HEADS,
        "model.mlp_ratio": 2.0, "data.root": str(data_root), "data.support_size": 3, "siglip.tiny": True,
        "siglip.tiny_image_size": 8, "siglip.cache_dir": str(tmp_path / "cache"), "sample.steps": 2,
        "sample.num_sets": 2, "sample.per_set": 2, "sample.cfg_scale": 2.0, "optim.lr": 1e-3,
        "optim.warmup_steps": 1, "trainer.output_dir": str(tmp_path / "runs"), "trainer.run_name": "t",
        "trainer.max_steps": 4, "trainer.micro_batch_size": 10, "trainer.eval_every_n_steps": 2, "data.val_size": 10,
        "trainer.save_every_n_steps": 4, "trainer.ema_decay": 0.9, "trainer.progress_bar": False,
        "metrics.console": False, "metrics.logging_steps": 2, "metrics.detailed_metrics_steps": 2,
        "metrics.attention_analysis_steps": 4, "wandb.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(ov, stop_at=None):
    """One in-process run on the engine (``stop_at``: stop after that step, as an interruption would); returns the
    closed engine and the metrics.jsonl records by step."""
    engine = Engine(load_fsdit_config(None, ov), FlowMatchingTask)
    try:
        engine.fit(stop_at)
    finally:
        engine.close()
    return engine, records(engine.run_dir)


def records(run_dir):
    """metrics.jsonl by step; the records of one step are merged (the end-of-run summary/* record comes after the
    last step's)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def defaults_file(tmp_path) -> str:
    """A config file of all defaults, for the command line (the in-process runs load None: the same)."""
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    return str(path)


def launch(tmp_path, ov, config_file="multi_cpu.yaml"):
    """The entry script (never imported) on 2 CPU processes through ``accelerate launch``."""
    return launch_two_processes(ENTRY, [defaults_file(tmp_path), *ov], config_file=config_file)


def build(ov):
    """Only the engine's set-up (config, launch, task, checkpoint checks): configuration errors raise here."""
    Engine(load_fsdit_config(None, ov), FlowMatchingTask).close()


def test_every_seed_metric_is_logged_and_finite_with_every_tier(tmp_path, data_root, monkeypatch):
    calls = {"probe": 0, "sample": 0}
    real_forward, real_sample = FSDiT.forward, flow.sample

    def forward(self, *a, return_attn=False, **kw):
        calls["probe"] += bool(return_attn)
        return real_forward(self, *a, return_attn=return_attn, **kw)

    def sample(*a, **kw):
        calls["sample"] += 1
        return real_sample(*a, **kw)
    monkeypatch.setattr(FSDiT, "forward", forward)
    monkeypatch.setattr(flow, "sample", sample)
    monkeypatch.setattr(fewshot, "sample", sample)
    on = {f"metrics.tiers.{t}.enabled": True for t in ("research", "advanced")}
    fid = {"eval.fid_every_n_steps": 4, "eval.fid_num_samples": 4, "eval.fid_extractor": "randconv"}
    engine, logs = run(overrides(tmp_path, data_root, **on, **fid))
    # step 4 only: one diagnostic forward; cfg_1 / cfg_2 / uncond grids and one batch of few-shot FID samples
    assert calls == {"probe": 1, "sample": 4}
    contract = set(SEED_000) | set(SEED_001) | set(SEED_002)
    names = registry_names()
    assert contract <= names, sorted(contract - names)
    last = logs[4]
    for name in names | contract:
        assert name in last, name
        value = last[name]
        if name in HISTOGRAMS:
            assert sum(value["counts"]) > 0 and len(value["edges"]) == len(value["counts"]) + 1, name
        elif name in IMAGES:
            assert (engine.run_dir / value).read_bytes()[:4] == b"\x89PNG", name
        else:
            assert isinstance(value, float) and math.isfinite(value), (name, value)
    assert not any(k.startswith(("act/", "attn/", "samples/")) for k in logs[2])  # advanced: step 4 only
    assert "grad/dit_raw_norm" in logs[2] and "val/loss" in logs[2]
    assert last["perf/vae_time"] == 0.0 and last["perf/siglip_cache_hit_rate"] == 1.0
    assert last["grad/dit_effective_step"] == pytest.approx(last["grad/dit_raw_norm"] * last["train/lr"])
    ckpt = engine.ckpt_root / "step_0000004"
    assert (ckpt / "model" / "config.json").is_file()
    ema = FSDiT.from_pretrained(ckpt / "model")  # the exported weights are the EMA ones
    assert ema.config.depth == DEPTH and ema.config.cond_dim == 32


def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_root):
    # 72 training episodes at batch 16: 4 steps per epoch, so the resumed run also crosses an epoch boundary
    common = {"trainer.max_steps": 6, "trainer.micro_batch_size": 16, "trainer.save_every_n_steps": 3,
              "trainer.eval_every_n_steps": 3, "metrics.logging_steps": 1, "metrics.detailed_metrics_steps": 3,
              "metrics.attention_analysis_steps": 3, "metrics.tiers.research.enabled": True}
    _, full = run(overrides(tmp_path, data_root, **common, **{"trainer.run_name": "full"}))
    run(overrides(tmp_path, data_root, **common, **{"trainer.run_name": "cut"}), stop_at=3)
    _, resumed = run(overrides(tmp_path, data_root, **common, **{"trainer.run_name": "cut",
                                                                  "trainer.resume": "auto"}))
    assert sorted(resumed) == sorted(full) == list(range(1, 7))
    for key in ("train/loss", "train/loss_ema", "val/loss", "val/loss_ema", "train/grad_norm", "diffusion/t_mean",
                "grad/dit_update_norm", "sample_diversity/pairwise_mse_mean"):
        for step in (4, 5, 6):
            if key in full[step]:
                assert resumed[step][key] == full[step][key], (key, step)
    # the advanced tier is off: the sample grids come once, at the last step
    assert "samples/cfg_1" in full[6] and not any("samples/cfg_1" in full[s] for s in range(1, 6))
    assert full[6]["val/loss"] < full[3]["val/loss"] or full[6]["train/loss"] < full[1]["train/loss"]


class TinyAutoencoderKL(nn.Module):
    """Stands in for diffusers.AutoencoderKL (not installed): 2x down to 4 channels and back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1)

    @classmethod
    def from_pretrained(cls, path, local_files_only=False):
        assert local_files_only and (Path(path) / "config.json").is_file()
        return cls()

    def encode(self, x):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=self.enc(F.avg_pool2d(x, 2))))

    def decode(self, z):
        return types.SimpleNamespace(sample=self.dec(F.interpolate(z, scale_factor=2)))


def test_vae_switch_and_online_siglip_cache(tmp_path, data_root, monkeypatch):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(AutoencoderKL=TinyAutoencoderKL))
    engine, logs = run(overrides(tmp_path, data_root, **{
        "model.use_vae": True, "model.vae_path": str(tmp_path / "vae"), "model.vae_scale": 1.0,
        "model.patch_size": 4, "siglip.mode": "online", "siglip.cache_size": 20, "trainer.max_steps": 2,
        "metrics.attention_analysis_steps": 2}))
    assert engine.task.x_shape == (4, 16, 16)
    last = logs[2]
    assert last["perf/vae_time"] > 0 and math.isfinite(last["latent/z_std"])
    assert 0 < last["perf/siglip_cache_hit_rate"] < 1 and last["perf/siglip_cache_items"] == 20
    grid = engine.run_dir / last["samples/cfg_1"]
    from PIL import Image
    assert Image.open(grid).size == (2 + 5 * 34, 2 + 2 * 34)  # decoded to 32 px: 3 supports + 2 samples


def test_configuration_errors_name_the_key(tmp_path, data_root, monkeypatch, capsys):
    def err(**extra):
        with pytest.raises(ConfigError) as e:
            build(overrides(tmp_path, data_root, **extra))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert err(**{"siglip.tiny": False}).startswith("siglip.path: not set")
    assert err(**{"siglip.tiny": False, "siglip.path": str(tmp_path / "nope")}).startswith("siglip.path: no SigLIP")
    assert err(**{"data.root": str(tmp_path / "none")}).startswith("data.root: no CIFAR-100")
    assert err(**{"model.use_vae": True}).startswith("model.use_vae: true needs model.vae_path")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not installed: import fails
    assert err(**{"model.use_vae": True, "model.vae_path": str(tmp_path / "vae")}).startswith(
        "model.use_vae: needs the diffusers package")
    assert err(**{"data.support_size": 12}).startswith("data.support_size=12: class")
    assert "model.hidden_size" in err(**{"model.hidden_sise": 3}) and "model.hidden_sise" in err(
        **{"model.hidden_sise": 3})
    assert err(**{"flow.t_dist": "beta"}).startswith("flow.t_dist: 'beta' is not one of uniform, logit_normal")
    assert err(**{"data.class_split": "[0.5, 0.6, 0.1]"}).startswith("data.class_split")
    assert err(**{"sample.per_set": 1}).startswith("sample.per_set")
    assert err(**{"trainer.ema_decay": 1.0}).startswith("trainer.ema_decay")
    assert err(**{"model.num_heads": 5}).startswith("model.num_heads")
    assert err(**{"metrics.attention_analysis_steps": 3}).startswith(
        "metrics.attention_analysis_steps: 3 is not a multiple of metrics.logging_steps 2")
    assert err(**{"trainer.eval_every_n_steps": 3}).startswith("trainer.eval_every_n_steps")
    # the keys renamed when FSDiT moved onto the shared loop section are refused, not silently ignored
    assert err(**{"trainer.batch_size": 5}) == ("unknown config key 'trainer.batch_size'; did you mean "
                                                "'trainer.micro_batch_size'?")
    assert err(**{"trainer.val_size": 5}).startswith("unknown config key 'trainer.val_size'")
    assert err(**{"data.num_workers": 1}).startswith("unknown config key 'data.num_workers'")
    # the command line: exit code 2 and one line
    capsys.readouterr()
    assert cli([str(tmp_path / "missing.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config file not found")


def test_an_existing_run_is_not_overwritten(tmp_path, data_root):
    _, logs = run(overrides(tmp_path, data_root, **{"trainer.max_steps": 2, "trainer.save_every_n_steps": 2,
                                                     "sample.num_sets": 0}))
    assert not any(k.startswith("samples/") for k in logs[2])  # sample.num_sets = 0: no sampling at all
    with pytest.raises(ConfigError, match="already holds a run"):
        build(overrides(tmp_path, data_root))
    with pytest.raises(ConfigError, match="model.hidden_size: 48 differs from the checkpoint's 24"):
        build(overrides(tmp_path, data_root, **{"trainer.resume": "auto", "model.hidden_size": 48}))


@pytest.mark.slow
def test_two_processes_match_one_process_over_the_same_global_batch(tmp_path, data_root):
    """DDP over gloo, 2 x 5 episodes per step vs 1 x 10: noise, t and CFG drop are drawn for the global batch,
    losses and metric states are sums, so every metric agrees; only the cosine pairs differ (they are taken
    within each process's micro-batch), and timings."""
    on = {f"metrics.tiers.{t}.enabled": True for t in ("research", "advanced")}
    _, ref = run(overrides(tmp_path, data_root, **on, **{"trainer.run_name": "one"}))
    launch(tmp_path, overrides(tmp_path, data_root, **on, **{"trainer.run_name": "two",
                                                             "trainer.micro_batch_size": 5}))
    got = records(tmp_path / "runs" / "two")
    compared = 0
    for step, rec in ref.items():
        for key, value in rec.items():
            if not isinstance(value, float) or "time" in key or key.startswith(("cond/same", "cond/diff")):
                continue
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
            compared += 1
    assert compared > 130  # 140: every scalar of steps 2 and 4 but timings and cosine pairs


def test_the_best_checkpoint_is_the_lowest_val_loss_and_survives_pruning(tmp_path, data_root):
    """keep_last=1 with a save at every evaluation: every checkpoint but the newest is pruned, except the one with
    the lowest val/loss. A constant, high LR makes the validation loss bounce, so that the best one comes early
    (measured: 1.1034 at step 2, then 1.1315, 1.1219, 1.1172) and pruning has to spare it."""
    engine, logs = run(overrides(tmp_path, data_root, **{
        "trainer.max_steps": 8, "trainer.eval_every_n_steps": 2, "trainer.save_every_n_steps": 2,
        "trainer.keep_last": 1, "optim.lr": 3e-2, "optim.min_lr_ratio": 1.0, "metrics.logging_steps": 2,
        "metrics.detailed_metrics_steps": 2, "metrics.attention_analysis_steps": 8, "sample.num_sets": 0}))
    val = {step: rec["val/loss"] for step, rec in logs.items() if "val/loss" in rec}
    assert sorted(val) == [2, 4, 6, 8]
    best_step = min(val, key=val.get)
    final = read_state(engine.ckpt_root / "step_0000008")
    assert set(final) == {"step", "epoch", "batches_in_epoch", "best_val", "best_ckpt", "wandb_id", "history",
                          "layout", "metrics", "world_size"}
    # 72 training episodes at 10 per step: 7 steps per epoch, so step 8 is in the second epoch
    assert final["history"]["val_loss"] == [[s, int(s > 7), val[s]] for s in (2, 4, 6, 8)]
    assert final["best_val"] == val[best_step] == min(row[2] for row in final["history"]["val_loss"])
    assert final["best_ckpt"] == f"step_{best_step:07d}"
    assert best_step < 8  # else pruning would have nothing to spare
    # steps 4 and 6 were saved too, and pruned; the best one was older than both and stayed
    assert [p.name for p in list_checkpoints(engine.ckpt_root)] == [final["best_ckpt"], "step_0000008"]
    best = engine.ckpt_root / final["best_ckpt"]
    saved = read_state(best)
    assert saved["step"] == best_step and saved["best_ckpt"] == best.name and saved["best_val"] == val[best_step]
    assert FSDiT.from_pretrained(best / "model").config.depth == DEPTH
    assert logs[8]["summary/best_val_loss"] == val[best_step]


def test_a_health_rule_stop_exits_3_and_writes_stopped_json(tmp_path, data_root, capsys):
    """An absurd LR makes the second step's loss non-finite: the nonfinite_loss rule stops the run with exit
    code 3 and one error line, ``stopped.json`` names the rule and the step, and nothing poisoned is saved."""
    capsys.readouterr()
    code = cli([defaults_file(tmp_path), *overrides(tmp_path, data_root, **{
        "optim.lr": 1e30, "metrics.logging_steps": 1, "metrics.detailed_metrics_steps": 2,
        "metrics.attention_analysis_steps": 4})])
    err = capsys.readouterr().err
    assert code == 3, err
    run_dir = tmp_path / "runs" / "t"
    logs = records(run_dir)
    # non-finite values are written as strings ("nan", "inf")
    assert math.isfinite(logs[1]["train/loss"]) and not math.isfinite(float(logs[2]["train/loss"]))
    assert logs[2]["health/nonfinite_loss"] == 1 and 3 not in logs
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["rule"] == "nonfinite_loss" and stopped["step"] == 2, stopped
    assert stopped["last_checkpoint"] == "none" and not list_checkpoints(run_dir / "checkpoints")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopping without saving the poisoned state" in errors[0], err


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory, data_root):
    """The same 20 episodes per optimizer step as 1 micro-batch of 20 and as 2 accumulated micro-batches of 10
    (3 steps: both stay in the first epoch, so both see the same episodes, noise, t and CFG drop)."""
    tmp = tmp_path_factory.mktemp("accum")
    common = {"trainer.max_steps": 3, "trainer.eval_every_n_steps": 1, "metrics.logging_steps": 1,
              "metrics.detailed_metrics_steps": 1, "metrics.attention_analysis_steps": 3, "sample.num_sets": 0}
    _, whole = run(overrides(tmp, data_root, **common, **{"trainer.run_name": "whole",
                                                          "trainer.micro_batch_size": 20}))
    _, split = run(overrides(tmp, data_root, **common, **{"trainer.run_name": "split", "trainer.micro_batch_size": 10,
                                                          "trainer.grad_accum_steps": 2}))
    return whole, split


def test_gradient_accumulation_matches_one_micro_batch_of_the_same_episodes(accumulation_runs):
    whole, split = accumulation_runs
    assert sorted(whole) == sorted(split) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/loss_ema", "diffusion/t_mean"):
            assert math.isclose(split[step][key], whole[step][key], rel_tol=1e-6), (step, key)
    assert whole[3]["train/loss"] != whole[1]["train/loss"]  # the steps differ: a real comparison


def test_train_loss_ema_does_not_depend_on_gradient_accumulation(accumulation_runs):
    """train/loss_ema is documented as an EMA (α = 0.99 per optimizer step) of each step's mean loss, bias
    corrected, so after step 1 it equals train/loss however the step's episodes are split into micro-batches."""
    whole, split = accumulation_runs
    assert whole[1]["train/loss_ema"] == pytest.approx(whole[1]["train/loss"], rel=1e-12)
    for step in (1, 2, 3):
        assert math.isclose(split[step]["train/loss_ema"], whole[step]["train/loss_ema"], rel_tol=1e-6), step


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_match_one_process(tmp_path, data_root):
    """DeepSpeed ZeRO-2 on 2 CPU processes, 2 x 5 episodes x 2 accumulation steps per optimizer step, against one
    process with 10 episodes x 2 accumulation steps (the same 20 episodes, noise, t and CFG drop per step; step 4
    crosses the epoch boundary). The logged training loss of every step agrees to 1e-6 relative."""
    common = {"trainer.grad_accum_steps": 2, "metrics.logging_steps": 1, "metrics.attention_analysis_steps": 4,
              "sample.num_sets": 0}
    _, ref = run(overrides(tmp_path, data_root, **common, **{"trainer.run_name": "one"}))
    launch(tmp_path, overrides(tmp_path, data_root, **common, **{"trainer.run_name": "zero2",
                                                                 "trainer.micro_batch_size": 5}),
           config_file="deepspeed_zero2.yaml")
    rd = tmp_path / "runs" / "zero2"
    got = records(rd)
    # a real ZeRO-2 run: the optimizer state is sharded, one file per process
    shards = sorted(p.name for p in (rd / "checkpoints" / "step_0000004" / "pytorch_model").glob("*optim_states*"))
    assert len(shards) == 2, shards
    assert read_state(rd / "checkpoints" / "step_0000004")["world_size"] == 2
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    worst = 0.0
    for step in ref:
        a, b = got[step]["train/loss"], ref[step]["train/loss"]
        assert math.isclose(a, b, rel_tol=1e-6), (step, a, b)
        worst = max(worst, abs(a - b) / abs(b))
    for step in (2, 4):  # the evaluations (live model and EMA) and the gradient norm DeepSpeed clipped
        for key in ("val/loss", "val/loss_ema", "train/grad_norm"):
            assert math.isclose(got[step][key], ref[step][key], rel_tol=1e-5), (step, key)
    print(f"FSDiT ZeRO-2 2 processes vs 1: worst relative train/loss difference {worst:.2e}")
