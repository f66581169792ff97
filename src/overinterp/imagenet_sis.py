"""Batched Gradient SIS on ImageNet, sharded over images and streamed from disk.

A shard file is a backward-selection result (:class:`overinterp.sis.BackSelectResult`) in its step form:
each pixel's removal step (uint16: 895 steps at 299x299 with 100 pixels per step) and f after each step, 2
bytes a pixel instead of the 8 of an int64 ordering. The subsets (``overinterp subsets backselect --by
steps``) and the SIS sizes (``overinterp tables sis-sizes``) read the shards without building orderings.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .imagenet import ImageNetDataset, IndexedSplit
from .sis import GradientBackSelect, read_step_arrays
from .utils import save_npz

log = logging.getLogger(__name__)

STEP_KEYS = ("index", "target", "full_confidence", "removal_step", "step_values")


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
    settings = {"method": "gradient", "pixels_per_step": pixels_per_step, "resize": resize, "crop": crop,
                "shard": shard, "shards": shards, **(meta or {})}
    scalars = {"height": np.int64(crop), "width": np.int64(crop), "pixels_per_step": np.int64(pixels_per_step),
               "meta": np.array(json.dumps(settings, sort_keys=True))}
    done: dict[str, list[np.ndarray]] = {key: [] for key in STEP_KEYS}
    start = 0
    if partial.exists():
        arrays = read_step_arrays([partial], keys=STEP_KEYS)
        if arrays["meta"] == settings and np.array_equal(arrays["index"],
                                                          split.index[positions[:len(arrays["index"])]]):
            done = {key: [arrays[key]] for key in STEP_KEYS}
            start = len(arrays["index"])
            log.info("resuming %s after %d of %d images", out, start, len(positions))
        else:
            log.warning("ignoring %s: it was made with other settings or images", partial)

    def merged() -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts) for key, parts in done.items() if parts}

    engine = GradientBackSelect(model, pixels_per_step=pixels_per_step, batch_size=batch_size, bf16=bf16,
                                progress=False)
    dataset = torch.utils.data.Subset(ImageNetDataset(split, resize, crop), positions[start:].tolist())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    last_save = time.monotonic()
    with tqdm(total=len(positions), initial=start, desc=f"gradient SIS shard {shard}/{shards}", unit="img",
              disable=not progress) as bar:
        for x, _, items in loader:
            result = engine.attribute(x)
            result.index = split.index[items.numpy()]
            for key, array in result.to_arrays(steps=True).items():
                if key in done:
                    done[key].append(array)
            bar.update(len(items))
            if time.monotonic() - last_save > save_every_s:
                save_npz(partial, **scalars, **merged())
                last_save = time.monotonic()
    save_npz(out, compressed=True, **scalars, **merged())
    partial.unlink(missing_ok=True)
    return out
