"""Tests for tdlm/fsdit/data.py: the CIFAR-100 pickle layout, the synthetic generator, class splits, episodes."""

import pickle

import numpy as np
import pytest
import torch

from tdlm.fsdit.data import (
    FewShotDataset,
    fingerprint,
    load_cifar100,
    load_cifar100_all,
    load_class_names,
    make_synthetic_cifar,
    split_classes,
    to_unit_range,
    write_cifar100,
)


# Tiny models: one intra-op thread (spinning OpenMP threads on 2 shared cores slow them ~100x).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_pickle_layout_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (7, 3, 32, 32), dtype=np.uint8), np.array([3, 1, 4, 1, 5, 9, 2]))
    test = (rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), np.array([6, 5]))
    folder = write_cifar100(tmp_path, train, test, [f"c{i}" for i in range(10)])
    # The raw files look like the official ones: bytes keys, N x 3072 uint8, red plane first.
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"} <= set(raw)
    assert raw[b"data"].shape == (7, 3072) and raw[b"data"].dtype == np.uint8
    assert np.array_equal(raw[b"data"][2, :1024].reshape(32, 32), train[0][2, 0])
    assert raw[b"fine_labels"] == [3, 1, 4, 1, 5, 9, 2]
    images, labels = load_cifar100(tmp_path, "train")
    assert np.array_equal(images, train[0]) and labels.tolist() == [3, 1, 4, 1, 5, 9, 2]
    images, labels = load_cifar100(folder, "test")  # the cifar-100-python folder itself also works
    assert np.array_equal(images, test[0]) and labels.tolist() == [6, 5]
    assert load_class_names(tmp_path)[:3] == ["c0", "c1", "c2"]
    assert load_cifar100_all(tmp_path)[0].shape == (9, 3, 32, 32)


def test_str_keyed_pickle_also_loads(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    with open(folder / "train", "wb") as f:
        pickle.dump({"data": data, "fine_labels": [0, 1]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a", "b"]}, f)
    images, labels = load_cifar100(tmp_path)
    assert images[1, 2, 31, 31] == data[1, 3071] and labels.tolist() == [0, 1]
    assert load_class_names(tmp_path) == ["a", "b"]


def test_missing_dataset_error_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="fsdit.data.root"):
        load_cifar100(tmp_path / "nowhere")


def test_synthetic_dataset_is_deterministic_and_classes_are_separable(tmp_path):
    make_synthetic_cifar(tmp_path / "a", num_classes=8, per_class=15, seed=1)
    make_synthetic_cifar(tmp_path / "b", num_classes=8, per_class=15, seed=1)
    make_synthetic_cifar(tmp_path / "c", num_classes=8, per_class=15, seed=2)
    xa, ya = load_cifar100(tmp_path / "a", "train")
    assert xa.shape == (120, 3, 32, 32) and np.bincount(ya).tolist() == [15] * 8
    xt, yt = load_cifar100(tmp_path / "a", "test")
    assert np.bincount(yt).tolist() == [3] * 8
    assert fingerprint(xa, ya) == fingerprint(*load_cifar100(tmp_path / "b", "train"))
    assert fingerprint(xa, ya) != fingerprint(*load_cifar100(tmp_path / "c", "train"))
    # A nearest-class-mean classifier fitted on train images labels every test image correctly.
    means = np.stack([xa[ya == c].reshape(-1, 3072).astype(np.float64).mean(0) for c in range(8)])
    dists = ((xt.reshape(-1, 1, 3072).astype(np.float64) - means[None]) ** 2).sum(-1)
    assert (dists.argmin(1) == yt).mean() == 1.0


def test_class_splits_are_disjoint_and_seeded():
    s = split_classes(100, seed=0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [60, 20, 20]
    assert set(s["train"]).isdisjoint(s["val"]) and set(s["train"]).isdisjoint(s["test"])
    assert set(s["val"]).isdisjoint(s["test"])
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(100))
    assert split_classes(100, seed=0) == s and split_classes(100, seed=1)["val"] != s["val"]
    with pytest.raises(ValueError, match="fsdit.data.class_split"):
        split_classes(100, fractions=(0.5, 0.2, 0.2))


def test_support_never_contains_the_target(tmp_path):
    make_synthetic_cifar(tmp_path, num_classes=6, per_class=8, seed=0)
    images, labels = load_cifar100_all(tmp_path)  # 8 train + 1 test per class = 9 images per class
    ds = FewShotDataset(images, labels, classes=[0, 2, 5], k=6, seed=3, return_indices=True)
    assert len(ds) == 27
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            _, sup, c = ds[i]
            target = ds.index[i]
            sup = sup.numpy()
            assert target not in sup and len(set(sup.tolist())) == 6
            assert np.all(labels[sup] == c) and labels[target] == c
    # Over many epochs every other member of the class shows up in some support set of item 0.
    seen = set()
    for epoch in range(50):
        ds.set_epoch(epoch)
        seen |= set(ds.support_indices(0).tolist())
    assert seen == set(ds.by_class[int(labels[ds.index[0]])].tolist()) - {int(ds.index[0])}


def test_episodes_are_deterministic_and_in_range(tmp_path):
    make_synthetic_cifar(tmp_path, num_classes=4, per_class=10, seed=0)
    images, labels = load_cifar100_all(tmp_path)
    ds = FewShotDataset(images, labels, classes=[1, 3], k=4, seed=0)
    target, support, c = ds[5]
    assert target.shape == (3, 32, 32) and support.shape == (4, 3, 32, 32) and c in (1, 3)
    assert target.min() >= -1 and target.max() <= 1
    assert torch.equal(target, to_unit_range(images[ds.index[5]]))
    assert torch.equal(ds[5][1], support)  # same (seed, epoch, i): same supports
    ds.set_epoch(1)
    assert not torch.equal(ds[5][1], support)
    assert to_unit_range(np.array([0, 255], dtype=np.uint8)).tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="support_size=20"):
        FewShotDataset(images, labels, classes=[1], k=20)
