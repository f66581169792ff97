"""Pixel-subset keep-masks: backward-selection and random subsets, stored as packed bits, applied on the fly.

A keep-mask file (``.npz``) holds, for each split ``s`` in (train, test): ``{s}_index`` (dataset row of
each image, int64) and ``{s}_keep`` (np.packbits of the row-major H*W keep-mask, True = pixel kept), plus
``height`` and ``width``. Polarity is always True = kept.
"""
from __future__ import annotations

import numpy as np
import torch

from .utils import load_npz, save_npz


def pack_keep(keep: np.ndarray) -> np.ndarray:
    """(N, H*W) bool -> (N, ceil(H*W/8)) uint8."""
    return np.packbits(np.asarray(keep, dtype=bool), axis=1)


def unpack_keep(bits: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.unpackbits(bits, axis=1, count=height * width).astype(bool).reshape(-1, height, width)


def save_keep_masks(path, height: int, width: int, **splits: tuple[np.ndarray, np.ndarray]) -> None:
    """``splits``: name -> (index (N,), keep (N, H*W) bool)."""
    arrays = {"height": np.int64(height), "width": np.int64(width)}
    for name, (index, keep) in splits.items():
        keep = np.asarray(keep, dtype=bool).reshape(len(index), height * width)
        arrays[f"{name}_index"] = np.asarray(index, dtype=np.int64)
        arrays[f"{name}_keep"] = pack_keep(keep)
    save_npz(path, **arrays)


def load_keep_masks(path, split: str, expected_index: np.ndarray | None = None) -> torch.Tensor:
    """Keep-masks of ``split`` as a (N, 1, H, W) bool tensor, checked against the images they belong to."""
    arrays = load_npz(path, required=("height", "width"))
    if f"{split}_keep" not in arrays or f"{split}_index" not in arrays:
        raise ValueError(f"{path} has no keep-masks for the {split!r} split")
    index = arrays[f"{split}_index"]
    if expected_index is not None and not np.array_equal(index, expected_index):
        raise ValueError(
            f"{path}: keep-masks of the {split!r} split were made for other images than the ones loaded "
            f"({len(index)} vs {len(expected_index)} images, or a different subset). Rebuild the subsets "
            "with the same dataset sizes."
        )
    keep = unpack_keep(arrays[f"{split}_keep"], int(arrays["height"]), int(arrays["width"]))
    return torch.from_numpy(keep).unsqueeze(1)


def random_keep(num_images: int, num_pixels: int, count: int, seed: int, chunk: int = 4096) -> np.ndarray:
    """(N, H*W) bool keep-mask of ``count`` uniformly random distinct pixels per image, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    keep = np.zeros((num_images, num_pixels), dtype=bool)
    for start in range(0, num_images, chunk):
        rows = keep[start:start + chunk]
        picks = rng.random(rows.shape).argpartition(count - 1, axis=1)[:, :count]
        np.put_along_axis(rows, picks, True, axis=1)
    return keep


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("subsets", help="build pixel-subset keep-masks (backward selection or random)")
    sub = p.add_subparsers(dest="kind", required=True)
    b = sub.add_parser("backselect", help="keep the pixels removed last by backward selection")
    b.add_argument("--sis-train", default=None, help="merged SIS result of the training split (.npz)")
    b.add_argument("--sis-test", required=True, help="merged SIS result of the test split (.npz)")
    b.add_argument("--fraction", type=float, required=True, help="share of each image's pixels kept, e.g. 0.05")
    b.add_argument("--out", required=True, help="keep-mask file (.npz)")
    b.set_defaults(handler=run_backselect)
    r = sub.add_parser("random", help="the same number of uniformly random pixels per image")
    r.add_argument("--data", required=True, help="converted dataset (.npz)")
    r.add_argument("--train-size", type=int, default=None, help="class-balanced subset of the training split (default: all)")
    r.add_argument("--test-size", type=int, default=None, help="class-balanced subset of the test split (default: all)")
    r.add_argument("--fraction", type=float, required=True, help="share of each image's pixels kept, e.g. 0.05")
    r.add_argument("--seed-train", type=int, default=1234, help="seed of the training masks (default: 1234, the reference's)")
    r.add_argument("--seed-test", type=int, default=5678, help="seed of the test masks (default: 5678, the reference's)")
    r.add_argument("--out", required=True, help="keep-mask file (.npz)")
    r.set_defaults(handler=run_random)


def run_backselect(args) -> int:
    from .sis import BackSelectResult, keep_last

    splits, shape = {}, None
    for split, path in (("train", args.sis_train), ("test", args.sis_test)):
        if path is None:
            continue
        result = BackSelectResult.load(path)
        shape = (result.height, result.width)
        splits[split] = (result.index, keep_last(result, fraction=args.fraction))
    save_keep_masks(args.out, *shape, **splits)
    return 0


def run_random(args) -> int:
    from .data import load_split
    from .sis import kept_count

    splits, shape = {}, None
    for split, size, seed in (("train", args.train_size, args.seed_train), ("test", args.test_size, args.seed_test)):
        data = load_split(args.data, split, size)
        shape = tuple(data.images.shape[2:])
        count = kept_count(shape[0] * shape[1], args.fraction)
        splits[split] = (data.index, random_keep(len(data), shape[0] * shape[1], count, seed))
    save_keep_masks(args.out, *shape, **splits)
    return 0
