"""FID and KID of generated images: a few-shot sample folder from ``eval/fsdit_sample.py`` (the reference is the
held-out images of its classes, its support images left out unless --include-supports), or any image array
against an explicit reference. Prints one JSON object: fid and kid ± std, n_gen, n_ref, the extractor, what the
number may be called (``metric``: only Inception features give an FID) and whether supports were excluded.

    python eval/fsdit_sample.py --checkpoint runs/fsdit --classes test --per-class 30 --out samples/  # then:
    python eval/fid.py --gen samples/ --extractor inception --inception-path weights/inception-2015-12-05.pt
    python eval/fid.py --gen samples/ --extractor siglip          # the run's SigLIP tower, offline
    python eval/fid.py --gen samples.npy --ref data/cifar100 --ref-classes 3 17 42 --extractor inception ...

The distances, extractors and reference cache are ``tdlm.fsdit.fid`` (float64 Fréchet distance, streaming
statistics, KID); the few-shot protocol is ``tdlm.fsdit.fewshot``. Bad input is one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdlm.engine.config import ConfigError  # noqa: E402
from tdlm.fsdit.fid import (EXTRACTORS, FeatureExtractor, GaussianStats, InceptionExtractor,  # noqa: E402,F401
                            RandomConvExtractor, ReferenceStats, SiglipExtractor, fid_kid, frechet_distance,
                            iter_features, kernel_inception_distance, make_extractor, metric_name, quantize,
                            reference_stats)

SETTINGS = "settings.json"  # what eval/fsdit_sample.py writes beside images.npy and supports.json


def load_images(path: str, classes: list[int] | None = None, split: str = "all") -> tuple[np.ndarray, str]:
    """An image array (.npy, or .npz with one array / ``arr_0``) in NCHW or NHWC, or a CIFAR-100 root directory
    (optionally restricted to ``classes``). Returns (images (N, 3, H, W), a content id for the cache)."""
    p = Path(path)
    if p.is_dir():
        from tdlm.fsdit.data import fingerprint, load_cifar100, load_cifar100_all

        images, labels = load_cifar100_all(p) if split == "all" else load_cifar100(p, split)
        if classes:
            mask = np.isin(labels, classes)
            images, labels = images[mask], labels[mask]
        return images, f"cifar100-{split}-{fingerprint(images, labels)}"
    if not p.is_file():
        raise FileNotFoundError(f"fid: no image array or dataset directory at '{path}'")
    arr = np.load(p, allow_pickle=False)
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr = arr["arr_0"] if "arr_0" in arr.files else arr[arr.files[0]]
    if arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return arr, f"array-{hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]}"


def sample_folder(gen: Path, ref_root: str | None, include_supports: bool):
    """A folder of eval/fsdit_sample.py: (generated images, reference images, reference id, settings)."""
    from tdlm.fsdit.data import fingerprint, load_cifar100_all
    from tdlm.fsdit.fewshot import reference_indices

    settings = json.loads((gen / SETTINGS).read_text())
    root = ref_root or settings["data_root"]
    try:
        images, labels = load_cifar100_all(root)
    except FileNotFoundError:
        raise ConfigError(f"--ref: no CIFAR-100 python dataset at '{root}' (the sample folder's data root; "
                          f"give the dataset's directory with --ref)") from None
    supports = np.asarray([s["indices"] for s in json.loads((gen / "supports.json").read_text())], dtype=np.int64)
    idx = reference_indices(labels, settings["classes"], supports, include_supports)
    ref_id = (f"fewshot-{fingerprint(images, labels)}-c{'_'.join(map(str, settings['classes']))}-seed"
              f"{settings['seed']}-{'with' if include_supports else 'without'}-supports")
    return np.load(gen / "images.npy"), images[idx], ref_id, settings


def siglip_encoder_of(settings: dict | None, siglip_path: str | None):
    """The SigLIP tower of the run that made the samples (its siglip section), or the one at --siglip-path."""
    from tdlm.fsdit.config import SiglipSection
    from tdlm.fsdit.pipeline import build_encoder

    if siglip_path:
        return build_encoder(SiglipSection(path=siglip_path))
    if settings is None:
        raise ConfigError("--siglip-path: needed for --extractor siglip unless --gen is a folder of "
                          "eval/fsdit_sample.py (whose run names its SigLIP)")
    return build_encoder(SiglipSection(**settings["siglip"]))


def run(args) -> dict:
    gen = Path(args.gen)
    settings = None
    if gen.is_dir():
        if not (gen / SETTINGS).is_file():
            raise ConfigError(f"--gen: {gen} is a folder without {SETTINGS} (not written by eval/fsdit_sample.py)")
        gen_images, ref_images, ref_id, settings = sample_folder(gen, args.ref, args.include_supports)
    else:
        if not args.ref:
            raise ConfigError("--ref: needed when --gen is an image array (a sample folder names its own data)")
        gen_images, _ = load_images(args.gen)
        ref_images, ref_id = load_images(args.ref, args.ref_classes, args.ref_split)
    encoder = siglip_encoder_of(settings, args.siglip_path) if args.extractor == "siglip" else None
    try:
        extractor = make_extractor(args.extractor, args.inception_path, args.device, siglip_encoder=encoder,
                                   key="--inception-path")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    cache = None
    if args.cache_dir:
        safe_id = hashlib.sha1(f"{extractor.id}|{ref_id}".encode()).hexdigest()[:16]
        cache = Path(args.cache_dir) / f"fid-ref-{safe_id}.npz"
    ref = reference_stats(extractor, ref_images, ref_id, cache, args.batch_size)
    result = fid_kid(extractor, gen_images, ref, args.batch_size, args.kid_subsets, args.kid_subset_size)
    result["supports_excluded"] = (not args.include_supports) if settings is not None else None
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen", required=True, help="a folder of eval/fsdit_sample.py, or an image array (.npy/.npz, "
                    "uint8 or float in [-1, 1], NCHW or NHWC)")
    ap.add_argument("--ref", default=None, help="reference images: .npy/.npz or a CIFAR-100 root directory (a sample "
                    "folder's default: the data root of its run)")
    ap.add_argument("--include-supports", action="store_true", help="keep the support images in the reference "
                    "(the original code's comparison; rewards copying the supports)")
    ap.add_argument("--ref-split", default="all", choices=["all", "train", "test"])
    ap.add_argument("--ref-classes", type=int, nargs="*", default=None)
    ap.add_argument("--extractor", default="inception", choices=EXTRACTORS)
    ap.add_argument("--inception-path", default=None, help="local TorchScript Inception file")
    ap.add_argument("--siglip-path", default=None, help="a SigLIP directory (default: the sample folder's run's)")
    ap.add_argument("--cache-dir", default=None, help="where reference statistics are cached")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--kid-subset-size", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    result = run(args)
    print(json.dumps(result))
    return result


def cli(argv: list[str] | None = None) -> int:
    """Bad input (a missing file, a wrong folder) is one ``error:`` line on stderr and exit code 2."""
    try:
        main(argv)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
