"""Few-shot image data for FSDiT: CIFAR-100 in its python-pickle layout, a synthetic stand-in written in exactly
that layout, class-disjoint class splits, and a Dataset of (target, support set, class) episodes.

On-disk layout (https://www.cs.toronto.edu/~kriz/cifar.html), read from a local directory only:

    <root>/cifar-100-python/{train, test, meta}

``train``/``test`` are pickled dicts with ``b'data'`` (uint8, N x 3072: the 1024 red values of a 32 x 32 image in
row-major order, then green, then blue), ``b'fine_labels'``, ``b'coarse_labels'``, ``b'filenames'`` and
``b'batch_label'``; ``meta`` holds ``b'fine_label_names'`` and ``b'coarse_label_names'``.

Few-shot protocol (FSDM, georgosgeorgos/few-shot-diffusion-models): classes, not images, are split into
train/val/test (60/20/20 by default), and a class contributes all its images (CIFAR-100: 500 train + 100 test).
The support set of a target is k other images of its class and never the target itself: the original code's
"self-reconstruction" mode, which encodes the target as its own condition, leaks the answer into the condition.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

CIFAR_DIR = "cifar-100-python"


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing the pickle layout


def _cifar_dir(root: str | Path) -> Path:
    root = Path(root)
    folder = root if (root / "meta").is_file() else root / CIFAR_DIR
    if not (folder / "meta").is_file():
        raise FileNotFoundError(
            f"fsdit.data.root: no CIFAR-100 python dataset at '{root}' (expected {CIFAR_DIR}/{{train,test,meta}})"
        )
    return folder


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    # The official files have bytes keys; a file pickled from Python 3 with str keys reads the same.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar100(root: str | Path, split: Literal["train", "test"] = "train") -> tuple[np.ndarray, np.ndarray]:
    """One split as (images uint8 (N, 3, 32, 32), fine labels int64 (N,))."""
    if split not in ("train", "test"):
        raise ValueError(f"fsdit.data.split must be 'train' or 'test', got {split!r}")
    d = _unpickle(_cifar_dir(root) / split)
    images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # R plane, G plane, B plane
    return images, np.asarray(d["fine_labels"], dtype=np.int64)


def load_cifar100_all(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """train then test concatenated: the few-shot protocol splits classes, so every image of a class is used."""
    (xa, ya), (xb, yb) = load_cifar100(root, "train"), load_cifar100(root, "test")
    return np.concatenate([xa, xb]), np.concatenate([ya, yb])


def load_class_names(root: str | Path) -> list[str]:
    names = _unpickle(_cifar_dir(root) / "meta")["fine_label_names"]
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def write_cifar100(
    root: str | Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
) -> Path:
    """Write (images uint8 (N, 3, 32, 32), labels (N,)) pairs in the CIFAR-100 python layout; returns the folder."""
    folder = Path(root) / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        n = len(labels)
        d = {
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"filenames": [f"{split}_{i:06d}.png".encode() for i in range(n)],
            b"fine_labels": [int(y) for y in labels],
            b"coarse_labels": [int(y) // 5 for y in labels],  # 20 superclasses of 5, as CIFAR-100 has
            b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(n, 3072),
        }
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = {
        b"fine_label_names": [n.encode() for n in class_names],
        b"coarse_label_names": [f"super_{i}".encode() for i in range((len(class_names) + 4) // 5)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def _synthetic_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32 x 32 picture whose background colour, shape and shape colour are set by the class, with jitter."""
    hue = np.array([label * 0.61803 % 1.0, label * 0.41421 % 1.0, label * 0.73205 % 1.0])  # distinct per class
    bg = 40 + 120 * hue
    fg = 255 - 0.8 * bg
    yy, xx = np.mgrid[0:32, 0:32]
    cy, cx = 16 + rng.integers(-4, 5, size=2)
    r = 7 + rng.integers(-2, 3)
    shape = label % 4
    if shape == 0:
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)  # square
    elif shape == 1:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # disc
    elif shape == 2:
        mask = (np.abs(yy - cy) <= r // 3) | (np.abs(xx - cx) <= r // 3)  # cross
    else:
        mask = (yy - cy + r >= 0) & (np.abs(xx - cx) <= (yy - cy + r) / 2) & (yy <= cy + r)  # triangle
    img = np.where(mask[None], fg[:, None, None], bg[:, None, None])  # (3, 32, 32)
    img = img + rng.normal(0, 8, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_synthetic_cifar(
    root: str | Path, num_classes: int = 10, per_class: int = 20, seed: int = 0, test_per_class: int | None = None
) -> Path:
    """Write a small CIFAR-100-layout dataset for tests and the demo; returns ``<root>/cifar-100-python``.

    ``per_class`` training images and ``test_per_class`` (default per_class // 5, CIFAR's 500/100 ratio, at
    least 1) test images per class; deterministic given ``seed``.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"make_synthetic_cifar: need num_classes, per_class >= 1, got {num_classes}, {per_class}")
    test_per_class = max(1, per_class // 5) if test_per_class is None else test_per_class
    rng = np.random.default_rng(seed)

    def split(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(num_classes), n_per_class)
        labels = labels[rng.permutation(len(labels))]  # CIFAR files are not sorted by class
        return np.stack([_synthetic_image(int(y), rng) for y in labels]), labels

    return write_cifar100(root, split(per_class), split(test_per_class), [f"class_{c:03d}" for c in range(num_classes)])


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Content hash of a dataset (16 hex digits), used to key embedding caches. About 0.2 s for all of CIFAR-100."""
    h = hashlib.sha1()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Few-shot episodes


def split_classes(
    num_classes: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[int]]:
    """Disjoint train/val/test class lists from a seeded permutation (FSDM: 60/20/20 of CIFAR-100's classes)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fsdit.data.class_split must be three fractions summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(num_classes).tolist()
    n_train = round(fractions[0] * num_classes)
    n_val = round(fractions[1] * num_classes)
    return {
        "train": sorted(perm[:n_train]),
        "val": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return torch.as_tensor(images).float().div(127.5).sub(1.0)


class FewShotDataset(Dataset):
    """Episodes over the images of ``classes``: item i is (target, support, class id).

    target: float32 (3, 32, 32) in [-1, 1]. support: k other images of the same class, float32 (k, 3, 32, 32) in
    [-1, 1], or with ``return_indices=True`` their int64 (k,) indices into ``images`` (to look up precomputed
    embeddings instead). Supports are drawn without replacement and never include the target. They are a
    deterministic function of (seed, epoch, i): fixed for validation, fresh each epoch after ``set_epoch``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[int],
        k: int = 6,
        seed: int = 0,
        return_indices: bool = False,
    ):
        if k < 1:
            raise ValueError(f"fsdit.data.support_size must be >= 1, got {k}")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.k, self.seed, self.epoch, self.return_indices = k, seed, 0, return_indices
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in classes}
        for c, members in self.by_class.items():
            if len(members) < k + 1:
                raise ValueError(f"fsdit.data.support_size={k}: class {c} has only {len(members)} images, need k + 1")
        self.index = np.concatenate([self.by_class[int(c)] for c in classes])  # positions into images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def support_indices(self, i: int) -> np.ndarray:
        """(k,) indices into ``images`` of the support set of item i."""
        target = self.index[i]
        members = self.by_class[int(self.labels[target])]
        rng = np.random.default_rng((self.seed, self.epoch, i))
        # Draw k distinct positions among the class members other than the target: sample from n - 1 slots and
        # skip over the target's slot, which excludes it without rejection sampling.
        pos = int(np.searchsorted(members, target))
        picks = rng.choice(len(members) - 1, size=self.k, replace=False)
        return members[picks + (picks >= pos)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        target = self.index[i]
        support = self.support_indices(i)
        sup = torch.from_numpy(support) if self.return_indices else to_unit_range(self.images[support])
        return to_unit_range(self.images[target]), sup, int(self.labels[target])


def main(argv: list[str] | None = None) -> int:
    """``python -m tdlm.fsdit.data synthetic ROOT [--classes N] [--per-class M] [--seed S]``: write the generated
    CIFAR-100-layout dataset used by the tests and ``make demo-fsdit``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tdlm.fsdit.data", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="write a generated dataset in the CIFAR-100 python layout")
    syn.add_argument("root")
    syn.add_argument("--classes", type=int, default=20)
    syn.add_argument("--per-class", type=int, default=40, help="training images per class (test: a fifth)")
    syn.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = make_synthetic_cifar(args.root, num_classes=args.classes, per_class=args.per_class, seed=args.seed)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
