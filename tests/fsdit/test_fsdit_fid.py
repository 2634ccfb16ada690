"""Few-shot FID end to end (tdlm/fsdit/fewshot.py, eval/fsdit_sample.py, eval/fid.py --gen): the reference leaves
the recorded supports out unless asked, the in-training val/fid equals the two commands on the same checkpoint,
1 and 2 processes write the same images, the distance orders toy image sets correctly, and bad input is one
error line that names what to fix."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launch_two_processes

from tdlm.engine.config import ConfigError
from tdlm.engine.loop import Engine
from tdlm.fsdit.config import load_fsdit_config
from tdlm.fsdit.data import load_cifar100_all, make_synthetic_cifar
from tdlm.fsdit.fewshot import draw_plan, reference_indices
from tdlm.fsdit.fid import RandomConvExtractor, fid_kid, reference_stats
from tdlm.fsdit.task import FlowMatchingTask

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = Path(__file__).resolve().parents[2] / "eval"


def load_script(name):
    """eval/ holds scripts, not a package: load one by file (registered so that its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(f"eval_{name}", EVAL / f"{name}.py")
    module = sys.modules[f"eval_{name}"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fid_cli, sample_cli = load_script("fid"), load_script("fsdit_sample")
K, PER_CLASS = 3, 4  # support size; samples per class (2 validation classes: eval.fid_num_samples = 8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step run with the in-training FID on (random-CNN features) on 10 generated classes of 12 images."""
    tmp = tmp_path_factory.mktemp("fsdit_fid")
    make_synthetic_cifar(tmp / "data", num_classes=10, per_class=10, seed=0)
    ov = {"model.patch_size": 8, "model.hidden_size": 24, "model.depth": 2, "model.num_heads": 2,
          "model.mlp_ratio": 2.0, "data.root": str(tmp / "data"), "data.support_size": K, "siglip.tiny": True,
          "siglip.tiny_image_size": 8, "siglip.cache_dir": str(tmp / "cache"), "sample.steps": 2,
          "sample.num_sets": 0, "sample.cfg_scale": 2.0, "optim.warmup_steps": 1,
          "trainer.output_dir": str(tmp / "runs"), "trainer.run_name": "t", "trainer.max_steps": 2,
          "trainer.micro_batch_size": 10, "trainer.eval_every_n_steps": 2, "data.val_size": 10,
          "trainer.ema_decay": 0.9, "trainer.progress_bar": False, "metrics.console": False,
          "metrics.logging_steps": 2, "wandb.enabled": False, "eval.fid_every_n_steps": 2,
          "eval.fid_num_samples": 2 * PER_CLASS, "eval.fid_extractor": "randconv", "eval.fid_batch_size": 3}
    engine = Engine(load_fsdit_config(None, [f"{k}={v}" for k, v in ov.items()]), FlowMatchingTask)
    try:
        engine.fit()
    finally:
        engine.close()
    return engine.run_dir


@pytest.fixture(scope="module")
def samples(run_dir):
    """eval/fsdit_sample.py on the validation classes with the run's settings, one process."""
    out = run_dir.parent / "samples_1proc"
    assert sample_cli.main(["--checkpoint", str(run_dir), "--which", "latest", "--classes", "val",
                            "--per-class", str(PER_CLASS), "--out", str(out)]) == 0
    return out


def logged(run_dir, step):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] == step:
            out.update(rec)
    return out


def test_the_reference_leaves_the_recorded_supports_out_unless_asked(samples, run_dir):
    supports = json.loads((samples / "supports.json").read_text())
    settings = json.loads((samples / "settings.json").read_text())
    indices = np.array([s["indices"] for s in supports])
    assert indices.shape == (2, K) and [s["class"] for s in supports] == settings["classes"]
    _, labels = load_cifar100_all(settings["data_root"])
    assert all((labels[row] == c).all() for row, c in zip(indices, settings["classes"]))  # each set from its class
    without = reference_indices(labels, settings["classes"], indices)
    with_supports = reference_indices(labels, settings["classes"], indices, include_supports=True)
    assert np.intersect1d(without, indices.ravel()).size == 0 and len(without) == 2 * 12 - 2 * K
    assert set(indices.ravel()) <= set(with_supports) and len(with_supports) == 2 * 12
    assert set(with_supports) - set(without) == set(indices.ravel())
    excluded = fid_cli.main(["--gen", str(samples), "--extractor", "randconv", "--kid-subsets", "5"])
    included = fid_cli.main(["--gen", str(samples), "--extractor", "randconv", "--kid-subsets", "5",
                             "--include-supports"])
    assert (excluded["n_ref"], excluded["supports_excluded"]) == (2 * 12 - 2 * K, True)
    assert (included["n_ref"], included["supports_excluded"]) == (2 * 12, False)
    assert excluded["n_gen"] == 2 * PER_CLASS and excluded["fid"] != included["fid"]
    assert excluded["metric"] == "Fréchet distance (random-CNN features, not an FID)"


def test_in_training_val_fid_equals_the_standalone_commands(samples, run_dir):
    rec = logged(run_dir, 2)
    result = fid_cli.main(["--gen", str(samples), "--extractor", "randconv"])
    assert math.isfinite(rec["val/fid"]) and rec["val/fid"] > 0 and rec["perf/fid_time"] > 0
    assert result["fid"] == pytest.approx(rec["val/fid"], rel=1e-12)
    assert result["kid_mean"] == pytest.approx(rec["val/kid"], rel=1e-12)
    assert result["kid_std"] == pytest.approx(rec["val/kid_std"], rel=1e-12)
    assert rec["health/fid_rising"] == 0.0
    images = np.load(samples / "images.npy")
    assert images.dtype == np.uint8 and images.shape == (2 * PER_CLASS, 3, 32, 32)
    assert np.load(samples / "labels.npy").tolist() == sum(([c] * PER_CLASS for c in
                                                            json.loads((samples / "settings.json").read_text())
                                                            ["classes"]), [])
    grids = sorted(samples.glob("grid_class*.png"))  # one per class: its support set, then its samples
    assert len(grids) == 2 and all(g.read_bytes()[:4] == b"\x89PNG" for g in grids)


@pytest.mark.slow
def test_one_and_two_processes_write_the_same_images(samples, run_dir):
    out = run_dir.parent / "samples_2proc"
    launch_two_processes(EVAL / "fsdit_sample.py", ["--checkpoint", str(run_dir), "--which", "latest", "--classes",
                                                    "val", "--per-class", str(PER_CLASS), "--out", str(out)],
                         extra_env={"ACCELERATE_USE_CPU": "1"})  # the eval scripts' CPU launch (see the README)
    assert np.array_equal(np.load(out / "images.npy"), np.load(samples / "images.npy"))  # batches of 3: 2 + 1 each
    assert (out / "supports.json").read_text() == (samples / "supports.json").read_text()
    assert json.loads((out / "settings.json").read_text())["num_processes"] == 2


def test_the_distance_of_a_set_to_itself_is_zero_and_halves_beat_another_distribution(tmp_path):
    make_synthetic_cifar(tmp_path, num_classes=2, per_class=50, seed=1)
    images, labels = load_cifar100_all(tmp_path)  # 60 generated toy images per class
    a, b = images[labels == 0], images[labels == 1]
    ext = RandomConvExtractor(dim=16, seed=0)
    ref = reference_stats(ext, a[:30], ref_id="first half")
    itself = fid_kid(ext, a[:30], ref, kid_subsets=5)["fid"]
    half = fid_kid(ext, a[30:], ref, kid_subsets=5)["fid"]
    other = fid_kid(ext, b[:30], ref, kid_subsets=5)["fid"]
    assert itself == pytest.approx(0, abs=1e-6) and 0 < half < other / 5


def test_bad_input_is_one_error_line(samples, run_dir, tmp_path, capsys):
    def error(main, argv):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    missing = tmp_path / "inception.pt"
    assert f"--inception-path: no Inception TorchScript file at '{missing}'" in error(
        fid_cli.cli, ["--gen", str(samples), "--extractor", "inception", "--inception-path", str(missing)])
    base = ["--checkpoint", str(run_dir), "--which", "latest", "--out", str(tmp_path / "o")]
    assert "--per-class: must be >= 1, got 0" in error(sample_cli.main, [*base, "--per-class", "0"])
    small = tmp_path / "small"  # 4 images per class: fewer than a support set of 3 plus 2 reference images
    make_synthetic_cifar(small, num_classes=10, per_class=3, seed=0, test_per_class=1)
    assert f"has 4 images, fewer than support_size {K} + 2" in error(
        sample_cli.main, [*base, "--per-class", "2", "--data-root", str(small)])
    from tdlm.model import TdlmConfig

    text = tmp_path / "text_ckpt"
    TdlmConfig().save_pretrained(text / "model")
    (text / "trainer_state.json").write_text("{}")
    assert "holds a text model (model_type 'tdlm'), not an FSDiT checkpoint" in error(
        sample_cli.main, ["--checkpoint", str(text), "--per-class", "2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_plan_is_seeded_and_configuration_errors_name_the_key():
    labels = np.repeat(np.arange(3), 8)
    p1, p2 = draw_plan(labels, [0, 2], 3, 5, seed=4), draw_plan(labels, [0, 2], 3, 5, seed=4)
    assert np.array_equal(p1.supports, p2.supports) and p1.num_samples == 10
    assert not np.array_equal(p1.supports, draw_plan(labels, [0, 2], 3, 5, seed=5).supports)
    assert (labels[p1.supports[1]] == 2).all() and len(set(p1.supports[0])) == 3
    with pytest.raises(ConfigError, match=r"^eval\.fid_every_n_steps: 150 is not a multiple of "
                                          r"trainer\.eval_every_n_steps 100"):
        load_fsdit_config(None, ["siglip.tiny=true", "eval.fid_every_n_steps=150", "metrics.logging_steps=50"])
    with pytest.raises(ConfigError, match=r"^eval\.inception_path: not set"):
        load_fsdit_config(None, ["siglip.tiny=true", "eval.fid_every_n_steps=100"])
    with pytest.raises(ConfigError, match=r"^eval\.fid_extractor"):
        load_fsdit_config(None, ["siglip.tiny=true", "eval.fid_extractor=vgg"])
    assert torch.equal(torch.as_tensor(p1.labels()), torch.tensor([0] * 5 + [2] * 5))
