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
    arrays = load_npz(path)
    if f"{split}_keep" not in arrays:
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
