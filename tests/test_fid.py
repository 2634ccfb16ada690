"""Tests for eval/fid.py: closed forms of the Frechet distance, streaming statistics, KID, extractors, caching."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

# eval/ holds scripts, not a package on sys.path: load eval/fid.py by file (registered so dataclasses resolve).
_spec = importlib.util.spec_from_file_location("eval_fid", Path(__file__).resolve().parents[1] / "eval" / "fid.py")
fid = sys.modules["eval_fid"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fid)


def random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 64)) @ np.random.default_rng(1).normal(size=(64, 64))
    stats = fid.GaussianStats().update(x)
    mu, sigma = stats.mean(), stats.cov()
    assert np.trace(sigma) > 10  # a non-trivial covariance
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_equal_covariances_give_squared_mean_distance():
    sigma = random_spd(16, 0)
    mu1, mu2 = np.zeros(16), np.arange(16) / 10
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(mu2 @ mu2), rel=1e-9, abs=1e-8)


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 2.0), (1.5, 0.3, -0.5, 0.7), (2.0, 1.0, 2.0, 1.0)])
def test_one_dimensional_closed_form(m1, s1, m2, s2):
    expect = (m1 - m2) ** 2 + s1**2 + s2**2 - 2 * s1 * s2  # = (m1 - m2)^2 + (s1 - s2)^2
    got = fid.frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert got == pytest.approx(expect, abs=1e-12)


def test_rotation_invariance_and_agreement_with_sqrtm():
    d = 12
    s1, s2 = random_spd(d, 1), random_spd(d, 2)
    mu1, mu2 = np.random.default_rng(3).normal(size=d), np.random.default_rng(4).normal(size=d)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(d, d)))  # random orthogonal matrix
    base = fid.frechet_distance(mu1, s1, mu2, s2)
    rotated = fid.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert base > 1.0 and rotated == pytest.approx(base, rel=1e-9)
    # Reference: the matrix square root (SciPy without the removed ``disp`` argument).
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert base == pytest.approx(ref, rel=1e-8)


def test_singular_covariances_stay_finite_and_non_negative():
    x = np.random.default_rng(0).normal(size=(20, 50))  # N < d: rank-deficient covariance, as FID@600 in 2048-d
    y = np.random.default_rng(1).normal(size=(20, 50))
    sx, sy = fid.GaussianStats().update(x), fid.GaussianStats().update(y)
    value = fid.frechet_distance(sx.mean(), sx.cov(), sy.mean(), sy.cov())
    assert np.isfinite(value) and value > 0
    assert fid.frechet_distance(sx.mean(), sx.cov(), sx.mean(), sx.cov()) == pytest.approx(0, abs=1e-6)


def test_streaming_statistics_equal_batch_statistics():
    x = np.random.default_rng(0).normal(loc=3.0, size=(257, 10))
    a = fid.GaussianStats()
    for chunk in np.array_split(x[:100], 7):
        a.update(torch.from_numpy(chunk).float().double())
    b = fid.GaussianStats().update(x[100:200]).update(x[200:])
    merged = a.merge(b)
    assert merged.n == 257
    assert np.allclose(merged.mean(), x.mean(0), atol=1e-12)
    assert np.allclose(merged.cov(), np.cov(x, rowvar=False), atol=1e-10)
    assert fid.GaussianStats().merge(merged).n == 257  # merging into an empty accumulator


def test_kid_matches_a_naive_reference_and_is_about_zero_for_one_distribution():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(loc=0.5, size=(6, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    naive = (
        sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
        + sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
        - 2 * sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    )
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=6)
    assert mean == pytest.approx(naive, rel=1e-12) and std == pytest.approx(0, abs=1e-12)  # full sets every time

    # Two independent samples of one distribution: unbiased, so about 0 (and far below a shifted pair).
    feats = rng.normal(size=(2000, 16))
    other, _ = fid.kernel_inception_distance(feats, rng.normal(size=(2000, 16)), num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(feats, feats + 0.5, num_subsets=20, subset_size=200)
    assert abs(other) < 0.01 and shifted > 0.3


def test_kid_of_identical_sets_vanishes_like_one_over_n():
    # Subsets are drawn without replacement, so an element is never paired with itself inside one set but can be
    # across the two sets: E[KID(X, X)] = 2 (mean off-diagonal k - mean diagonal k) / N, not exactly 0.
    rng = np.random.default_rng(1)
    bias = {}
    for n in (200, 2000):
        x = rng.normal(size=(n, 16))
        k = (x @ x.T / 16 + 1) ** 3
        expect = 2 * ((k.sum() - np.trace(k)) / (n * (n - 1)) - np.trace(k) / n) / n
        # With subsets of the whole set the estimate is deterministic and equals the expectation exactly.
        bias[n], std = fid.kernel_inception_distance(x, x, num_subsets=2, subset_size=n)
        assert bias[n] == pytest.approx(expect, rel=1e-9) and std == pytest.approx(0, abs=1e-12)
        if n == 200:  # random subsets of 50: the same value on average
            got, _ = fid.kernel_inception_distance(x, x, num_subsets=400, subset_size=50, seed=2)
            assert got == pytest.approx(expect, rel=0.2)
    assert bias[2000] / bias[200] == pytest.approx(0.1, rel=0.2) and abs(bias[2000]) < 0.01


def test_random_conv_extractor_is_deterministic_and_separates_classes(tmp_path):
    from tdlm.fsdit.data import load_cifar100_all, make_synthetic_cifar

    make_synthetic_cifar(tmp_path, num_classes=2, per_class=50, seed=0)
    images, labels = load_cifar100_all(tmp_path)  # 60 images per class
    a1, a2, b = images[labels == 0][:30], images[labels == 0][30:], images[labels == 1][:30]
    ext = fid.RandomConvExtractor(dim=16, seed=0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(ext(x), fid.RandomConvExtractor(dim=16, seed=0)(x)) and ext(x).shape == (4, 16)
    assert "NOT-INCEPTION" in ext.id
    ref = fid.reference_stats(ext, a1, ref_id="class0")
    same = fid.fid_kid(ext, a2, ref, kid_subsets=10)
    diff = fid.fid_kid(ext, b, ref, kid_subsets=10)
    assert same["n_gen"] == 30 and same["n_ref"] == 30 and same["extractor"] == ext.id
    assert diff["fid"] > 5 * same["fid"] and diff["kid_mean"] > 5 * abs(same["kid_mean"])


def test_generated_floats_are_quantised_like_saved_images():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.2]).view(1, 1, 1, 5)
    assert fid.quantize(x).flatten().tolist() == [0, 0, 128, 255, 255]
    u = torch.tensor([[[[7]]]], dtype=torch.uint8)
    assert fid.quantize(u) is u


def test_reference_cache_is_reused_and_invalidated(tmp_path):
    calls = []

    class Counting(fid.RandomConvExtractor):
        def forward(self, images):
            calls.append(len(images))
            return super().forward(images)

    ext = Counting(dim=8)
    images = np.random.default_rng(0).integers(0, 256, (12, 3, 16, 16), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    first = fid.reference_stats(ext, images, "r1", path, batch_size=5, kid_features=7)
    assert calls == [5, 5, 2] and path.is_file() and first.features.shape == (7, 8)
    with np.load(path) as z:
        assert str(z["extractor_id"]) == ext.id and int(z["n"]) == 12 and str(z["ref_id"]) == "r1"
    again = fid.reference_stats(ext, images, "r1", path, batch_size=5)
    assert calls == [5, 5, 2] and np.array_equal(again.sigma, first.sigma)  # loaded, not recomputed
    fid.reference_stats(ext, images[:10], "r1", path, batch_size=5)  # N differs: recomputed
    assert calls[3:] == [5, 5]
    other = fid.RandomConvExtractor(dim=8, seed=1)
    stale = fid.reference_stats(other, images[:10], "r1", path)  # extractor differs: recomputed
    assert stale.extractor_id == other.id
    with pytest.raises(ValueError, match="reference stats were computed with"):
        fid.fid_kid(ext, images, stale)


def test_inception_needs_a_local_file_and_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^fid\.inception_path: no Inception TorchScript file"):
        fid.InceptionExtractor(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="fid.inception_path"):
        fid.make_extractor("inception", None)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_extractor_uses_the_torchscript_calling_convention(tmp_path):
    class FakeInception(torch.nn.Module):
        """Same interface as NVIDIA's inception-2015-12-05.pt: float [0, 255] in, features with return_features."""

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            feats = x.mean(dim=(2, 3))
            return feats if return_features else feats.sum(1, keepdim=True)

    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    ext = fid.InceptionExtractor(path)
    images = torch.stack([torch.full((3, 8, 8), -1.0), torch.full((3, 8, 8), 1.0)])
    assert torch.allclose(ext(images), torch.tensor([[0.0] * 3, [255.0] * 3]))
    assert ext.id.startswith("inception-torchscript-")


def test_command_line_end_to_end(tmp_path, capsys):
    from tdlm.fsdit.data import make_synthetic_cifar

    make_synthetic_cifar(tmp_path / "data", num_classes=3, per_class=10, seed=0)
    gen = np.random.default_rng(0).uniform(-1, 1, size=(20, 32, 32, 3)).astype(np.float32)  # NHWC floats
    np.save(tmp_path / "gen.npy", gen)
    argv = ["--gen", str(tmp_path / "gen.npy"), "--ref", str(tmp_path / "data"), "--ref-classes", "0", "1",
            "--extractor", "randconv", "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "5"]  # fmt: skip
    result = fid.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and result["n_gen"] == 20 and result["n_ref"] == 24  # 2 classes x (10 + 2)
    assert result["fid"] > 0 and len(list((tmp_path / "cache").glob("fid-ref-*.npz"))) == 1
    assert fid.main(argv)["fid"] == pytest.approx(result["fid"])  # second run reads the cached reference
