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


def save_packed_keep_masks(path, height: int, width: int, **splits: tuple[np.ndarray, np.ndarray]) -> None:
    """``splits``: name -> (index (N,), packed keep-masks (N, ceil(H*W / 8)))."""
    arrays = {"height": np.int64(height), "width": np.int64(width)}
    for name, (index, bits) in splits.items():
        arrays[f"{name}_index"] = np.asarray(index, dtype=np.int64)
        arrays[f"{name}_keep"] = bits
    save_npz(path, **arrays)


def save_keep_masks(path, height: int, width: int, **splits: tuple[np.ndarray, np.ndarray]) -> None:
    """``splits``: name -> (index (N,), keep (N, H*W) bool)."""
    save_packed_keep_masks(path, height, width, **{
        name: (index, pack_keep(np.asarray(keep, dtype=bool).reshape(len(index), height * width)))
        for name, (index, keep) in splits.items()})


class KeepMasks:
    """A split's keep-masks, packed (1 bit a pixel) and unpacked a batch at a time: ``masks[rows]`` is a
    (n, 1, H, W) bool tensor. A large split's masks (ImageNet's 1.28M) fit in memory only packed."""

    def __init__(self, bits: np.ndarray, height: int, width: int):
        self.bits, self.height, self.width = bits, height, width

    def __len__(self) -> int:
        return len(self.bits)

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        bits = self.bits[rows].reshape(-1, self.bits.shape[1])
        return torch.from_numpy(unpack_keep(bits, self.height, self.width)).unsqueeze(1)


def load_packed_keep_masks(path, split: str, expected_index: np.ndarray | None = None) -> KeepMasks:
    """The keep-masks of ``split``, checked against the images they belong to."""
    arrays = load_npz(path, required=("height", "width"))
    if f"{split}_keep" not in arrays or f"{split}_index" not in arrays:
        raise ValueError(f"{path} has no keep-masks for the {split!r} split")
    index, bits = arrays[f"{split}_index"], arrays[f"{split}_keep"]
    if expected_index is not None and not np.array_equal(index, expected_index):
        # masks made for more images (a larger class-balanced subset, which holds every smaller one) serve
        # any images they cover
        position = {int(row): i for i, row in enumerate(index)}
        if len(expected_index) < len(index) and all(int(row) in position for row in expected_index):
            return KeepMasks(bits[[position[int(row)] for row in expected_index]], int(arrays["height"]),
                             int(arrays["width"]))
        raise ValueError(
            f"{path}: keep-masks of the {split!r} split were made for other images than the ones loaded "
            f"({len(index)} vs {len(expected_index)} images, or a different subset). Rebuild the subsets "
            "with the same dataset sizes."
        )
    return KeepMasks(bits, int(arrays["height"]), int(arrays["width"]))


def load_keep_masks(path, split: str, expected_index: np.ndarray | None = None) -> torch.Tensor:
    """Keep-masks of ``split`` as a (N, 1, H, W) bool tensor, checked against the images they belong to."""
    return load_packed_keep_masks(path, split, expected_index)[:]


def _random_keep_chunks(num_images: int, num_pixels: int, count: int, seed: int, chunk: int):
    """(N_chunk, H*W) bool keep-masks of ``count`` random pixels, ``chunk`` images at a time, from one stream."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_images, chunk):
        rows = np.zeros((min(chunk, num_images - start), num_pixels), dtype=bool)
        if count:
            picks = rng.random(rows.shape).argpartition(count - 1, axis=1)[:, :count]
            np.put_along_axis(rows, picks, True, axis=1)
        yield rows


def random_keep(num_images: int, num_pixels: int, count: int, seed: int, chunk: int = 4096) -> np.ndarray:
    """(N, H*W) bool keep-mask of ``count`` uniformly random distinct pixels per image, fixed by ``seed``."""
    parts = list(_random_keep_chunks(num_images, num_pixels, count, seed, chunk))
    return np.concatenate(parts) if parts else np.zeros((0, num_pixels), dtype=bool)


def random_keep_packed(num_images: int, num_pixels: int, count: int, seed: int, chunk: int = 256) -> np.ndarray:
    """:func:`random_keep` packed chunk by chunk (the same masks for the same seed): ImageNet's 1.28M masks fit
    in memory only packed."""
    parts = [pack_keep(rows) for rows in _random_keep_chunks(num_images, num_pixels, count, seed, chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, (num_pixels + 7) // 8), dtype=np.uint8)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("subsets", help="build pixel-subset keep-masks (backward selection or random)")
    sub = p.add_subparsers(dest="kind", required=True)
    b = sub.add_parser("backselect", help="keep the pixels removed last by backward selection")
    b.add_argument("--sis-train", nargs="+", default=None,
                   help="SIS results of the training split (.npz): the merged file, or its shards in order")
    b.add_argument("--sis-test", nargs="+", required=True,
                   help="SIS results of the test split (.npz): the merged file, or its shards in order")
    b.add_argument("--fraction", type=float, required=True,
                   help="share of each image's pixels (or of the steps, with --by steps) kept, e.g. 0.05")
    b.add_argument("--by", choices=["pixels", "steps"], default="pixels",
                   help="pixels: the last FRACTION of the pixels removed (CIFAR-10, default); steps: the pixels "
                        "removed in the last FRACTION of the steps (the paper's ImageNet subsets)")
    b.add_argument("--out", required=True, help="keep-mask file (.npz)")
    b.set_defaults(handler=run_backselect)
    r = sub.add_parser("random", help="the same number of uniformly random pixels per image")
    r.add_argument("--data", required=True, help="converted dataset (.npz)")
    r.add_argument("--train-size", type=int, default=None, help="class-balanced subset of the training split (default: all)")
    r.add_argument("--test-size", type=int, default=None, help="class-balanced subset of the test split (default: all)")
    r.add_argument("--fraction", type=float, required=True,
                   help="share of each image's pixels kept, e.g. 0.05 (or of the steps, with --by steps)")
    r.add_argument("--by", choices=["pixels", "steps"], default="pixels",
                   help="steps: as many pixels as a backward-selection subset of the last FRACTION of the gradient "
                        "method's steps keeps (default: pixels)")
    r.add_argument("--pixels-per-step", type=int, default=None, help="--by steps: the gradient method's pixels per step")
    r.add_argument("--seed-train", type=int, default=1234, help="seed of the training masks (default: 1234, the reference's)")
    r.add_argument("--seed-test", type=int, default=5678, help="seed of the test masks (default: 5678, the reference's)")
    r.add_argument("--out", required=True, help="keep-mask file (.npz)")
    r.set_defaults(handler=run_random)


def backselect_keep_packed(paths, fraction: float, by: str = "pixels") -> tuple[np.ndarray, np.ndarray, int, int]:
    """(index, packed keep-masks, height, width) of the backward-selection subsets in the result files
    ``paths``, one file at a time (a split's shards need not fit in memory together)."""
    from .sis import BackSelectResult, keep_last, keep_last_steps, read_step_arrays

    index, packed, shapes = [], [], set()
    for path in paths:
        if by == "steps":
            arrays = read_step_arrays([path], keys=("index", "removal_step"))
            keep = keep_last_steps(arrays["removal_step"], arrays["pixels_per_step"], fraction)
            shape = (arrays["height"], arrays["width"])
        else:
            result = BackSelectResult.load(path)
            keep, shape = keep_last(result, fraction=fraction), (result.height, result.width)
            arrays = {"index": result.index}
        index.append(arrays["index"])
        packed.append(pack_keep(keep))
        shapes.add(shape)
    if len(shapes) != 1:
        raise ValueError(f"the SIS results {[str(p) for p in paths]} are for different image sizes: {sorted(shapes)}")
    return np.concatenate(index).astype(np.int64), np.concatenate(packed), *shapes.pop()


def run_backselect(args) -> int:
    splits, shapes = {}, set()
    for split, paths in (("train", args.sis_train), ("test", args.sis_test)):
        if paths:
            index, bits, height, width = backselect_keep_packed(paths, args.fraction, args.by)
            splits[split] = (index, bits)
            shapes.add((height, width))
    if len(shapes) != 1:
        raise ValueError(f"the training and test SIS results are for different image sizes: {sorted(shapes)}")
    save_packed_keep_masks(args.out, *shapes.pop(), **splits)
    return 0


def run_random(args) -> int:
    from .data import load_split
    from .sis import kept_count, last_steps_kept

    if args.by == "steps" and not args.pixels_per_step:
        raise ValueError("--by steps needs --pixels-per-step, the gradient method's pixels per step")

    splits, shape = {}, None
    for split, size, seed in (("train", args.train_size, args.seed_train), ("test", args.test_size, args.seed_test)):
        data = load_split(args.data, split, size)
        shape = tuple(data.images.shape[2:])
        count = kept_count(shape[0] * shape[1], args.fraction)
        if args.by == "steps":
            _, count = last_steps_kept(shape[0] * shape[1], args.pixels_per_step, args.fraction)
        splits[split] = (data.index, random_keep_packed(len(data), shape[0] * shape[1], count, seed))
    save_packed_keep_masks(args.out, *shape, **splits)
    return 0
