"""Batched Gradient SIS on ImageNet, sharded over images, and the 10% pixel subsets derived from it.

A shard file (``.npz``) stores, for its images: ``index`` (rows of the split's index CSV), ``label``,
``target`` (the class followed: the prediction on the full image), ``full_confidence``, ``removal_step``
((N, H*W) uint16: the step at which each pixel, row-major, was removed; 895 steps at 299x299 with 100 pixels
per step) and ``step_values`` ((N, steps) float32: f on the target class after each step), plus ``height``,
``width`` and ``pixels_per_step``. That is 2 bytes per pixel instead of the 8 of an int64 ordering; the
order within a step is not kept because every pixel of a step shares its value.

* SIS at tau: the pixels removed after the last step whose value is still >= tau (target class column only),
  for images whose full-image confidence reaches tau.
* Backward-selection subset: the pixels removed in the last ``fraction`` of the steps (ceil(0.1 * 895) = 90
  steps = 8,901 of 89,401 pixels at 299x299); the random baseline keeps as many uniformly random pixels.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu
from tqdm import tqdm

from .imagenet import ImageNetDataset, IndexedSplit
from .sis import GradientBackSelect, kept_count
from .subsets import pack_keep, random_keep
from .utils import load_npz, save_npz

log = logging.getLogger(__name__)

SHARD_KEYS = ("index", "label", "target", "full_confidence", "removal_step", "step_values")


def shard_positions(n: int, shard: int, shards: int) -> np.ndarray:
    """Positions (into the split) of shard ``shard`` of ``shards``: contiguous, sizes differing by at most 1."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    return np.array_split(np.arange(n), shards)[shard]


def run_sis_shard(model: torch.nn.Module, split: IndexedSplit, resize: int, crop: int, out: str | Path,
                  shard: int = 0, shards: int = 1, pixels_per_step: int = 100, batch_size: int = 32,
                  workers: int = 4, bf16: bool = False, save_every_s: float = 600.0, meta: dict | None = None,
                  progress: bool = True) -> Path:
    """Gradient BackSelect of one shard of ``split``; resumable at batch granularity from ``{out}.partial.npz``."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial.npz")
    positions = shard_positions(len(split), shard, shards)
    settings = {"pixels_per_step": pixels_per_step, "height": crop, "width": crop, "resize": resize,
                "shard": shard, "shards": shards, **(meta or {})}
    done: dict[str, list[np.ndarray]] = {key: [] for key in SHARD_KEYS}
    start = 0
    if partial.exists():
        arrays = load_npz(partial)
        if json.loads(str(arrays["settings"])) == settings and np.array_equal(
                arrays["index"], split.index[positions[:len(arrays["index"])]]):
            done = {key: [arrays[key]] for key in SHARD_KEYS}
            start = len(arrays["index"])
            log.info("resuming %s after %d of %d images", out, start, len(positions))
        else:
            log.warning("ignoring %s: it was made with other settings or images", partial)

    def merged() -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts) if parts else np.empty(0) for key, parts in done.items()}

    engine = GradientBackSelect(model, pixels_per_step=pixels_per_step, batch_size=batch_size, bf16=bf16,
                                progress=False)
    dataset = torch.utils.data.Subset(ImageNetDataset(split, resize, crop), positions[start:].tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    last_save = time.monotonic()
    with tqdm(total=len(positions), initial=start, desc=f"gradient SIS shard {shard}/{shards}", unit="img",
              disable=not progress) as bar:
        for x, labels, items in loader:
            result = engine.attribute(x)
            rows = items.numpy()  # positions in the split
            done["index"].append(split.index[rows])
            done["label"].append(labels.numpy())
            done["target"].append(result.target)
            done["full_confidence"].append(result.full_confidence.astype(np.float32))
            done["removal_step"].append(result.removal_step().astype(np.uint16))
            done["step_values"].append(result.values[:, ::pixels_per_step].astype(np.float32))
            bar.update(len(rows))
            if time.monotonic() - last_save > save_every_s:
                save_npz(partial, settings=np.array(json.dumps(settings, sort_keys=True)), **merged())
                last_save = time.monotonic()
    arrays = merged()
    save_npz(out, compressed=True, height=np.int64(crop), width=np.int64(crop),
             pixels_per_step=np.int64(pixels_per_step), meta=np.array(json.dumps(settings, sort_keys=True)),
             **arrays)
    partial.unlink(missing_ok=True)
    return out


def load_shards(paths: list[str | Path], keys=SHARD_KEYS) -> dict[str, np.ndarray]:
    """The shards of one split, concatenated in order (only ``keys``, so the large maps can stay on disk)."""
    if not paths:
        raise ValueError("no SIS shard files given")
    parts = []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:  # reads only the arrays asked for
            parts.append({key: z[key] for key in (*keys, "height", "width", "pixels_per_step", "meta")})
    shape = {(int(a["height"]), int(a["width"]), int(a["pixels_per_step"])) for a in parts}
    if len(shape) != 1:
        raise ValueError(f"SIS shards {paths} disagree on image size or pixels per step: {sorted(shape)}")
    height, width, k = shape.pop()
    arrays = {key: np.concatenate([a[key] for a in parts]) for key in keys}
    arrays.update(height=height, width=width, pixels_per_step=k, meta=json.loads(str(parts[0]["meta"])))
    return arrays


def num_steps(num_pixels: int, pixels_per_step: int) -> int:
    return math.ceil(num_pixels / pixels_per_step)


def last_steps_kept(num_pixels: int, pixels_per_step: int, fraction: float) -> tuple[int, int]:
    """(first kept step, pixels kept) for the subset of the pixels removed in the last ``fraction`` of steps."""
    steps = num_steps(num_pixels, pixels_per_step)
    first = steps - kept_count(steps, fraction)
    return first, num_pixels - first * pixels_per_step


def backselect_keep(removal_step: np.ndarray, pixels_per_step: int, fraction: float) -> np.ndarray:
    """(N, H*W) bool keep-mask (True = kept) of the pixels removed in the last ``fraction`` of the steps."""
    first, _ = last_steps_kept(removal_step.shape[1], pixels_per_step, fraction)
    return removal_step >= first


def random_keep_bits(n: int, num_pixels: int, count: int, seed: int, chunk: int = 256) -> np.ndarray:
    """Packed keep-masks of ``count`` uniformly random pixels per image, fixed by ``seed`` (chunk c draws from
    the seed sequence (seed, c)); packed chunk by chunk, as 1.28M unpacked masks would not fit in memory."""
    parts = [pack_keep(random_keep(min(chunk, n - start), num_pixels, count, [seed, start // chunk]))
             for start in range(0, n, chunk)]
    return np.concatenate(parts) if parts else np.empty((0, (num_pixels + 7) // 8), dtype=np.uint8)


def backselect_subsets(shards_by_split: dict[str, list], fraction: float, out: str | Path) -> dict:
    """Keep-mask file (see :mod:`overinterp.subsets`) of the BS subsets of each split, built shard by shard."""
    arrays, info = {}, {}
    for split, paths in shards_by_split.items():
        index, packed = [], []
        for path in paths:
            shard = load_shards([path], keys=("index", "removal_step"))
            keep = backselect_keep(shard["removal_step"], shard["pixels_per_step"], fraction)
            index.append(shard["index"])
            packed.append(pack_keep(keep))
            height, width = shard["height"], shard["width"]
        arrays[f"{split}_index"] = np.concatenate(index).astype(np.int64)
        arrays[f"{split}_keep"] = np.concatenate(packed)
        info[split] = int(keep[0].sum()) if len(keep) else 0
    save_npz(out, height=np.int64(height), width=np.int64(width), **arrays)
    return {"height": height, "width": width, "kept_pixels": info}


def random_subsets(index_by_split: dict[str, np.ndarray], size: int, count: int, seeds: dict[str, int],
                   out: str | Path) -> None:
    """Keep-mask file of random subsets of ``count`` pixels per ``size`` x ``size`` image for each split."""
    arrays = {"height": np.int64(size), "width": np.int64(size)}
    for split, index in index_by_split.items():
        arrays[f"{split}_index"] = np.asarray(index, dtype=np.int64)
        arrays[f"{split}_keep"] = random_keep_bits(len(index), size * size, count, seeds[split])
    save_npz(out, **arrays)


def sis_sizes(arrays: dict, tau: float) -> pd.DataFrame:
    """Per image with full confidence >= tau: the SIS size at ``tau`` (pixels and fraction of the image).

    The SIS is every pixel removed after the last step whose value (target class) is still >= tau; none of
    the steps reaching tau means the whole image, the fully masked image reaching tau an empty SIS.
    """
    values = arrays["step_values"]
    pixels, k = arrays["height"] * arrays["width"], arrays["pixels_per_step"]
    ok = values >= tau
    last = np.where(ok.any(1), values.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
    size = pixels - np.minimum((last + 1) * k, pixels)
    table = pd.DataFrame({
        "index": arrays["index"], "label": arrays["label"], "target": arrays["target"],
        "full_confidence": arrays["full_confidence"], "correct": arrays["target"] == arrays["label"],
        "last_step": last, "sis_size": size, "sis_fraction": size / pixels,
    })
    return table[table["full_confidence"] >= tau].reset_index(drop=True)


def summarize_sis_sizes(table: pd.DataFrame, tau: float, n_images: int) -> dict:
    """Median SIS fraction for correct and misclassified images and a two-sided Mann-Whitney U test."""
    right = table.loc[table["correct"], "sis_fraction"]
    wrong = table.loc[~table["correct"], "sis_fraction"]
    summary = {"tau": tau, "images": n_images, "with_sis": int(len(table)),
               "correct": int(len(right)), "misclassified": int(len(wrong)),
               "median_fraction_correct": float(right.median()) if len(right) else None,
               "median_fraction_misclassified": float(wrong.median()) if len(wrong) else None,
               "mannwhitney_u": None, "mannwhitney_p": None}
    if len(right) and len(wrong):
        test = mannwhitneyu(right, wrong, alternative="two-sided")
        summary.update(mannwhitney_u=float(test.statistic), mannwhitney_p=float(test.pvalue))
    return summary
