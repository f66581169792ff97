"""Backward selection (BackSelect) and sufficient input subsets (SIS): exact, and the batched gradient variant.

A pixel (all channels together) is the unit; a masked pixel takes ``baseline`` (0 = the dataset-mean colour
after normalisation). ``f`` is the softmax probability of the class the model predicts on the full image
(or of a given target class).

* :class:`BackSelect` is the exact algorithm: at every step it evaluates ``f`` with each still-present pixel
  additionally masked and masks the pixel that leaves ``f`` highest (ties go to the lowest row-major
  index). Its whole cost is model forwards (sum_{n=1..H*W} n per image), so the engine keeps the model
  busy: candidates are built on the model's device from per-image state held there, and candidates of
  several images at different steps are packed into every batch ("continuous batching"), so the late
  steps, with few candidates each, still fill batches. The host only schedules; it never waits for the
  device until an image is finished.
* :class:`GradientBackSelect` masks, per forward+backward, the ``pixels_per_step`` still-present pixels
  whose mask gradient is largest (removing them is predicted to hurt ``f`` least).

Both return a :class:`BackSelectResult` (numpy arrays): ``order`` (first removed first) and ``values``
(``f`` after each removal). :func:`sis_size`, :func:`sis_mask` and :func:`keep_last` derive SIS and
pixel-subset keep-masks from it, for any threshold, without rerunning the model. A gradient result can be
stored in its step form (each pixel's removal step, ``f`` after each step: 2 bytes a pixel), which
:func:`read_step_arrays`, :func:`sis_size_of_steps` and :func:`keep_last_steps` use without building
orderings, for splits too large for memory as orderings.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import incremental
from .utils import DataError, load_npz, save_npz

# Exact: the candidate batch sizes tried when none is given (the fastest one, measured, is used: it depends on
# the model, the image size, the evaluator and the machine). Gradient: images per forward+backward.
CANDIDATE_BATCH_SIZES = {"cpu": (32, 64, 128, 256, 512), "cuda": (2048, 4096, 8192, 16384)}
DEFAULT_GRADIENT_BATCH_SIZE = {"cpu": 64, "cuda": 256}


@dataclass
class BackSelectResult:
    """Backward-selection orderings of B images of ``height`` x ``width`` pixels.

    ``order[b, j]`` is the row-major index of the j-th pixel removed from image b; ``values[b, j]`` is
    ``f`` after the removals ``order[b, :j + 1]`` (so ``values[b, -1]`` is ``f`` of the fully masked
    image). ``pixels_per_step`` > 1 for the gradient method: positions ``j`` with the same
    ``j // pixels_per_step`` were removed in one step and share its value. ``index`` holds the dataset
    rows of the images when known.
    """

    order: np.ndarray
    values: np.ndarray
    target: np.ndarray
    full_confidence: np.ndarray
    height: int
    width: int
    pixels_per_step: int = 1
    index: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        # int64 indices, or int32 for large images read from a file (half the memory of an ImageNet shard)
        self.order = np.asarray(self.order)
        if self.order.dtype != np.int32:
            self.order = self.order.astype(np.int64, copy=False)
        self.values = np.asarray(self.values)
        self.target = np.asarray(self.target).astype(np.int64, copy=False)
        self.full_confidence = np.asarray(self.full_confidence)
        if self.index is not None:
            self.index = np.asarray(self.index).astype(np.int64, copy=False)
        pixels = self.height * self.width
        b = len(self.target)
        if self.order.shape != (b, pixels) or self.values.shape != (b, pixels) or self.full_confidence.shape != (b,):
            raise ValueError(
                f"inconsistent BackSelect result: order {self.order.shape}, values {self.values.shape}, "
                f"target {self.target.shape}, full_confidence {self.full_confidence.shape} for "
                f"{self.height}x{self.width} images"
            )
        if self.index is not None and self.index.shape != (b,):
            raise ValueError(f"index has shape {self.index.shape}, expected ({b},)")

    def __len__(self) -> int:
        return len(self.target)

    @property
    def num_pixels(self) -> int:
        return self.height * self.width

    def select(self, rows) -> "BackSelectResult":
        """The result restricted to ``rows`` (positions, a slice or a boolean mask)."""
        return BackSelectResult(
            self.order[rows], self.values[rows], self.target[rows], self.full_confidence[rows],
            self.height, self.width, self.pixels_per_step,
            None if self.index is None else self.index[rows], dict(self.meta),
        )

    @property
    def num_steps(self) -> int:
        return math.ceil(self.num_pixels / self.pixels_per_step)

    def removal_step(self) -> np.ndarray:
        """(B, H*W): the step at which each pixel (by pixel index) was removed; 0 = first."""
        steps = np.empty_like(self.order)
        positions = np.arange(self.num_pixels) // self.pixels_per_step
        np.put_along_axis(steps, self.order, np.broadcast_to(positions, self.order.shape), axis=1)
        return steps

    def step_values(self) -> np.ndarray:
        """(B, steps): f after each step (the pixels of one step share its value)."""
        return self.values[:, :: self.pixels_per_step]

    @classmethod
    def from_steps(cls, removal_step, step_values, target, full_confidence, height: int, width: int,
                   pixels_per_step: int, index=None, meta: dict | None = None) -> "BackSelectResult":
        """A result from its step form: each pixel's removal step and f after each step (what the reference
        records for the gradient method, and what ``save(steps=True)`` stores). The pixels of one step are
        ordered by pixel index: the order within a step is not recorded, and they share the step's value."""
        pixels = height * width
        order = np.argsort(removal_step, axis=1, kind="stable").astype(np.int64 if pixels <= 1 << 16 else np.int32)
        values = np.repeat(np.asarray(step_values), pixels_per_step, axis=1)[:, :pixels]
        return cls(order, values, target, full_confidence, height, width, pixels_per_step, index, meta or {})

    @classmethod
    def concatenate(cls, results: list["BackSelectResult"]) -> "BackSelectResult":
        if not results:
            raise ValueError("nothing to concatenate")
        first = results[0]
        for r in results[1:]:
            if (r.height, r.width, r.pixels_per_step) != (first.height, first.width, first.pixels_per_step):
                raise ValueError("cannot concatenate results of different image sizes or pixels_per_step")
        with_index = [r.index is not None for r in results]
        if any(with_index) and not all(with_index):
            raise ValueError("cannot concatenate results with and without dataset indices")
        return cls(
            np.concatenate([r.order for r in results]), np.concatenate([r.values for r in results]),
            np.concatenate([r.target for r in results]),
            np.concatenate([r.full_confidence for r in results]), first.height, first.width,
            first.pixels_per_step, np.concatenate([r.index for r in results]) if all(with_index) else None,
            dict(first.meta),
        )

    def to_arrays(self, steps: bool = False) -> dict[str, np.ndarray]:
        """Compact arrays: orders as uint16 while H*W fits (int32 beyond, e.g. 299x299), values float32.

        ``steps`` stores the step form instead (see :meth:`from_steps`): each pixel's removal step (uint16 while
        the steps fit) and one value per step: 2 bytes a pixel instead of 6-8, for the gradient method on large
        images; the order within a step is dropped."""
        index = self.index if self.index is not None else np.arange(len(self), dtype=np.int64)
        if steps:
            step_dtype = np.uint16 if self.num_steps <= np.iinfo(np.uint16).max + 1 else np.int32
            ordering = {"removal_step": self.removal_step().astype(step_dtype),
                        "step_values": self.step_values().astype(np.float32)}
        else:
            order_dtype = np.uint16 if self.num_pixels <= np.iinfo(np.uint16).max + 1 else np.int32
            ordering = {"order": self.order.astype(order_dtype), "values": self.values.astype(np.float32)}
        return {
            "index": index.astype(np.int64),
            **ordering,
            "target": self.target.astype(np.int64),
            "full_confidence": self.full_confidence.astype(np.float32),
            "height": np.int64(self.height),
            "width": np.int64(self.width),
            "pixels_per_step": np.int64(self.pixels_per_step),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }

    def save(self, path, compressed: bool = True, steps: bool = False) -> None:
        """Write atomically to ``path`` (.npz), in the step form with ``steps``; ``index`` defaults to 0..B-1."""
        save_npz(path, compressed=compressed, **self.to_arrays(steps))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "BackSelectResult":
        shape = (int(arrays["height"]), int(arrays["width"]), int(arrays.get("pixels_per_step", 1)))
        meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        if "removal_step" in arrays:
            return cls.from_steps(arrays["removal_step"], arrays["step_values"], arrays["target"],
                                  arrays["full_confidence"], *shape, arrays["index"], meta)
        return cls(arrays["order"], arrays["values"], arrays["target"], arrays["full_confidence"], *shape,
                   arrays["index"], meta)

    @classmethod
    def load(cls, path) -> "BackSelectResult":
        arrays = load_npz(path, required=("index", "target", "full_confidence", "height", "width"))
        if not ({"order", "values"} <= set(arrays) or {"removal_step", "step_values"} <= set(arrays)):
            raise DataError(f"{path} is not a backward-selection result: it has neither order and values nor "
                            "removal_step and step_values. Recompute it with `overinterp sis`.")
        return cls.from_arrays(arrays)


# The arrays of a result file that describe the whole file rather than one image.
RESULT_SCALARS = ("height", "width", "pixels_per_step", "meta")


def read_step_arrays(paths, keys=("index", "target", "full_confidence", "step_values")) -> dict:
    """``keys`` of result files (any of index, target, full_confidence, removal_step, step_values), read
    file by file and concatenated in order, plus height, width, pixels_per_step and the first file's meta.
    A file in the step form is read without building its orderings, so the results of a split too large
    for memory as orderings (ImageNet's) can be summarised."""
    if not paths:
        raise ValueError("no backward-selection result files given")
    parts = []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:  # reads only the arrays asked for
            if "removal_step" in z.files:
                parts.append({key: z[key] for key in (*keys, *RESULT_SCALARS) if key in z.files})
                continue
        result = BackSelectResult.load(path)
        arrays = result.to_arrays(steps=True)
        parts.append({key: arrays[key] for key in (*keys, *RESULT_SCALARS)})
    shapes = {tuple(int(part[key]) for key in RESULT_SCALARS[:3]) for part in parts}
    if len(shapes) != 1:
        raise ValueError(f"the result files {[str(p) for p in paths]} disagree on image size or pixels per step: "
                         f"{sorted(shapes)}")
    height, width, pixels_per_step = shapes.pop()
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in keys}
    meta = json.loads(str(parts[0]["meta"])) if "meta" in parts[0] else {}
    return {**arrays, "height": height, "width": width, "pixels_per_step": pixels_per_step, "meta": meta}


# ----------------------------------------------------------------------------------------------------------
# SIS and keep-masks from a stored result


def _last_at_least(values: np.ndarray, tau: float) -> np.ndarray:
    """Per row of ``values``, the last position whose value is still >= tau; -1 where there is none."""
    ok = values >= tau
    last = values.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    return np.where(ok.any(axis=1), last, -1)


def sis_size_of_steps(step_values: np.ndarray, full_confidence: np.ndarray, num_pixels: int,
                      pixels_per_step: int, tau: float) -> np.ndarray:
    """:func:`sis_size` from f after each step (see :func:`read_step_arrays`)."""
    removed = np.minimum((_last_at_least(step_values, tau) + 1) * pixels_per_step, num_pixels)
    size = (num_pixels - removed).astype(np.float64)
    size[np.asarray(full_confidence) < tau] = np.nan
    return size


def sis_size(result: BackSelectResult, tau: float) -> np.ndarray:
    """Number of pixels in each image's SIS at threshold ``tau``; NaN where f(full image) < tau.

    The SIS is the tail of the ordering after the last removal whose value is still >= tau; if even the
    fully masked image reaches tau it is empty, if no removal keeps f >= tau it is the whole image.
    """
    return sis_size_of_steps(result.step_values(), result.full_confidence, result.num_pixels,
                             result.pixels_per_step, tau)


def smallest_reaching(result: BackSelectResult, tau: float) -> np.ndarray:
    """Per image, the number of pixels of the smallest subset along the ordering whose f is >= ``tau``,
    whether or not the full image reaches it (a target other than the prediction usually does not); the
    whole image if only it does, NaN if nothing does."""
    last = _last_at_least(result.values, tau)
    size = np.where(last >= 0, result.num_pixels - (last + 1), result.num_pixels).astype(np.float64)
    size[(last < 0) & (np.asarray(result.full_confidence) < tau)] = np.nan
    return size


def sis_mask(result: BackSelectResult, tau: float) -> list[np.ndarray | None]:
    """Per image, the (H, W) bool mask of its SIS at ``tau`` (True = in the SIS), None where f(full) < tau."""
    last = _last_at_least(result.values, tau)
    masks: list[np.ndarray | None] = []
    for b in range(len(result)):
        if result.full_confidence[b] < tau:
            masks.append(None)
            continue
        mask = np.zeros(result.num_pixels, dtype=bool)
        mask[result.order[b, last[b] + 1:]] = True
        masks.append(mask.reshape(result.height, result.width))
    return masks


def kept_count(num_pixels: int, fraction: float) -> int:
    """ceil(fraction * num_pixels), robust to float error (5% of 1024 = 52)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"kept fraction must lie in [0, 1], not {fraction}")
    return math.ceil(round(fraction * num_pixels, 9))


def last_steps_kept(num_pixels: int, pixels_per_step: int, fraction: float) -> tuple[int, int]:
    """(first kept step, pixels kept) of the subset of the pixels removed in the last ``fraction`` of the
    steps (the paper's ImageNet subsets: ceil(0.1 * 895) = 90 steps, 8,901 of 89,401 pixels at 299x299)."""
    steps = math.ceil(num_pixels / pixels_per_step)
    first = steps - kept_count(steps, fraction)
    return first, num_pixels - first * pixels_per_step


def keep_last_steps(removal_step: np.ndarray, pixels_per_step: int, fraction: float) -> np.ndarray:
    """(B, H*W) bool keep-mask (True = kept) of the pixels removed in the last ``fraction`` of the steps, from
    the removal steps alone."""
    first, _ = last_steps_kept(removal_step.shape[1], pixels_per_step, fraction)
    return removal_step >= first


def keep_last(result: BackSelectResult, n: int | None = None, fraction: float | None = None) -> np.ndarray:
    """(B, H*W) bool keep-mask (True = kept) of the ``n`` (or ceil(fraction * H*W)) last-removed pixels."""
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n and fraction")
    if n is None:
        n = kept_count(result.num_pixels, fraction)
    if not 0 <= n <= result.num_pixels:
        raise ValueError(f"cannot keep {n} of {result.num_pixels} pixels")
    keep = np.zeros((len(result), result.num_pixels), dtype=bool)
    if n:
        np.put_along_axis(keep, result.order[:, result.num_pixels - n:], True, axis=1)
    return keep


# ----------------------------------------------------------------------------------------------------------
# Engines


class SelectOutput(torch.nn.Module):
    """The logits out of a model that returns more than a tensor: ``select`` is a key of its dict output, an
    index of its tuple output, or a callable taking the output."""

    def __init__(self, module: torch.nn.Module, select):
        super().__init__()
        self.module, self.select = module, select

    def forward(self, x):
        out = self.module(x)
        return self.select(out) if callable(self.select) else out[self.select]


class FeatureModel(torch.nn.Module):
    """The model as a function of which features (groups of pixels) are present, for SIS over features.

    Its input is (N, 1, 1, F): 1 = feature present, 0 = masked. ``image`` (1 or N, C, H, W) is shown with
    the pixels of masked features set to ``baseline`` (a scalar or a tensor broadcastable to the image);
    ``features`` (H, W) holds each pixel's feature id in 0..F-1.
    """

    def __init__(self, module: torch.nn.Module, image: torch.Tensor, baseline, features: torch.Tensor,
                 memory_format):
        super().__init__()
        self.module, self.memory_format = module, memory_format
        self.register_buffer("image", image)
        self.register_buffer("baseline", torch.as_tensor(baseline, dtype=image.dtype, device=image.device))
        self.register_buffer("features", features.flatten())

    def forward(self, present):
        n, (_, channels, height, width) = len(present), self.image.shape
        keep = present.reshape(n, -1)[:, self.features].view(n, 1, height, width)
        x = self.image * keep + self.baseline * (1 - keep)
        return self.module(x.contiguous(memory_format=self.memory_format))


def _prepare_model(model: torch.nn.Module, dtype: torch.dtype, memory_format, select_output=None) -> torch.nn.Module:
    """A copy of the model in eval mode and ``memory_format``, computing in ``dtype``: the caller's model keeps
    its mode, layout and dtype."""
    model = copy.deepcopy(model).eval().to(dtype).to(memory_format=memory_format)
    return model if select_output is None else SelectOutput(model, select_output)


def _as_baseline(baselines, images: torch.Tensor) -> float | torch.Tensor:
    """``baselines`` as a float, or as a (1 or B, C, H or 1, W or 1) tensor: a scalar, one value per channel,
    or a tensor broadcastable to the (B, C, H, W) inputs."""
    if isinstance(baselines, (int, float)):
        return float(baselines)
    b = torch.as_tensor(baselines, dtype=images.dtype)
    batch, channels = images.shape[:2]
    if b.numel() == 1:
        return float(b)
    if b.ndim == 1 and len(b) == channels:  # one value per channel
        b = b.view(1, channels, 1, 1)
    while b.ndim < 4:
        b = b.unsqueeze(0)
    try:
        torch.broadcast_shapes(b.shape, images.shape)
    except RuntimeError:
        raise ValueError(f"baselines of shape {tuple(torch.as_tensor(baselines).shape)} do not broadcast to the "
                         f"inputs {tuple(images.shape)}: give a scalar, {channels} per-channel values or a "
                         "tensor broadcastable to the inputs") from None
    if b.shape[0] > 1 and bool((b == b[:1]).all()):
        b = b[:1]
    return b


def _feature_ids(feature_mask, images: torch.Tensor) -> torch.Tensor:
    """``feature_mask`` as (1 or B, H, W) long tensor of feature ids 0..F-1 (Captum's form: (H, W), (1, 1, H,
    W), (B, 1, H, W), any ids; they are renumbered in ascending order)."""
    batch, _, height, width = images.shape
    ids = torch.as_tensor(feature_mask)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"feature_mask must hold integer feature ids, not {ids.dtype}")
    if ids.shape[-2:] != (height, width) or ids.ndim > 4 or (ids.ndim == 4 and ids.shape[1] != 1) or (
            ids.ndim >= 3 and ids.shape[0] not in (1, batch)):
        raise ValueError(f"feature_mask of shape {tuple(ids.shape)} does not fit the inputs {tuple(images.shape)}: "
                         f"give (H, W), (1, 1, H, W) or (B, 1, H, W) feature ids")
    ids = ids.reshape(-1, height, width).long()
    return torch.stack([torch.unique(m, return_inverse=True)[1] for m in ids])


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class _Engine:
    def __init__(self, model, baseline, batch_size, dtype, bf16, progress, defaults, memory_format, select_output):
        if memory_format not in (torch.channels_last, torch.contiguous_format):
            raise ValueError("memory_format must be torch.channels_last or torch.contiguous_format")
        self.memory_format = memory_format
        self.model = _prepare_model(model, dtype, memory_format, select_output)
        self.device = _model_device(self.model)
        self.dtype = dtype
        self.baseline = float(baseline)
        if batch_size is None and defaults is None:
            self.batch_size = None  # measured at first use
        else:
            self.batch_size = int(batch_size or defaults.get(self.device.type, defaults["cpu"]))
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be positive, not {batch_size}")
        if bf16 and self.device.type != "cuda":
            raise ValueError("bf16 mode needs the model on a CUDA device; drop bf16 on the CPU")
        self.bf16 = bool(bf16)
        self.progress = progress

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes of the model's output on (N, C, H, W) ``x``, in the result dtype."""
        with self.autocast():
            logits = self.model(x.contiguous(memory_format=self.memory_format))
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError(f"the model returned {type(logits).__name__}"
                             f"{'' if not isinstance(logits, torch.Tensor) else ' of shape ' + str(tuple(logits.shape))}"
                             ", not (N, classes) logits: pass select_output (a key, an index or a callable that "
                             "picks the logits from the output)")
        return logits.to(self.dtype).softmax(1)

    def progress_bar(self, total: int, unit: str, desc: str) -> tqdm:
        # Into a log file (not a terminal), update rarely: runs last hours and batches take milliseconds.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not self.progress,
                    mininterval=interval, maxinterval=max(10.0, interval))

    def check_inputs(self, images, target):
        images = torch.as_tensor(images)
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"inputs must be a float (B, C, H, W) tensor of normalised images, not {images.dtype} "
                             f"{tuple(images.shape)}")
        if target is not None:
            target = torch.as_tensor(target, dtype=torch.long)
            target = target.expand(len(images)) if target.ndim == 0 else target.flatten()
            if len(target) != len(images):
                raise ValueError(f"{len(target)} targets for {len(images)} images")
        return images, target

    def attribute(self, inputs, target=None, baselines=None, feature_mask=None) -> BackSelectResult:
        """Orderings of all ``inputs`` ((B, C, H, W), normalised), as :meth:`attribute_iter`."""
        rows: list[BackSelectResult | None] = [None] * len(inputs)
        for i, row in self.attribute_iter(inputs, target, baselines, feature_mask):
            rows[i] = row
        return BackSelectResult.concatenate(rows)

    def attribute_iter(self, inputs, target=None, baselines=None,
                       feature_mask=None) -> Iterator[tuple[int, BackSelectResult]]:
        """Yield ``(i, result of image i)`` as images finish.

        ``target``: the class whose probability is f: an int for every image, one per image, or None (the
        prediction on the full image). ``baselines``: what a masked pixel becomes: a scalar, one value per
        channel, or a tensor broadcastable to the inputs (per-image baselines run image by image in the exact
        method); default: the engine's ``baseline``. The gradient method also takes a callable
        ``(images, keep, rows) -> baselines`` of a batch (``rows``: the batch's positions in ``inputs``;
        ``keep``: (N, 1, H, W), 1 = present), called at every step, for fills that depend on the mask such
        as :mod:`overinterp.fills`' imputation. ``feature_mask``: (H, W) or (B, 1, H, W) integer ids grouping pixels into
        features (e.g. superpixels) that are removed together; the result then orders pixels feature by
        feature (a feature's pixels consecutive, in ascending index, sharing its value) and ``meta["features"]``
        counts them.
        """
        images, target = self.check_inputs(inputs, target)
        if callable(baselines):
            if not isinstance(self, GradientBackSelect) or feature_mask is not None:
                raise ValueError("a baseline that depends on the mask (a callable) needs GradientBackSelect "
                                 "without a feature_mask: the exact method masks one fixed value per pixel")
            yield from self._attribute_iter(images, target, baselines)
            return
        baseline = self.baseline if baselines is None else _as_baseline(baselines, images)
        if feature_mask is not None:
            yield from self._feature_iter(images, target, baseline, _feature_ids(feature_mask, images))
        elif isinstance(baseline, float):
            engine = self if baseline == self.baseline else self._derived(self.model, baseline, **self._fresh_plans())
            yield from engine._attribute_iter(images, target)
        else:
            yield from self._baseline_iter(images, target, baseline)

    def _attribute_iter(self, images, target) -> Iterator[tuple[int, BackSelectResult]]:
        raise NotImplementedError

    def _derived(self, model: torch.nn.Module, baseline: float, **settings) -> "_Engine":
        """This engine with another model (already prepared) and scalar baseline."""
        engine = copy.copy(self)
        engine.model, engine.baseline = model, baseline
        engine.__dict__.update(settings)
        return engine

    def _baseline_iter(self, images, target, baseline: torch.Tensor) -> Iterator[tuple[int, BackSelectResult]]:
        """A tensor baseline b: the model on (x - b) + b, with masked inputs at 0, is the model on x with masked
        pixels at b. One shared b keeps batching; per-image baselines run image by image."""
        groups = [(torch.arange(len(images)), baseline)] if len(baseline) == 1 else \
            [(torch.tensor([i]), baseline[i : i + 1]) for i in range(len(images))]
        for rows, b in groups:
            b = b.to(self.device, self.dtype)
            engine = self._derived(ShiftedInput(self.model, b), 0.0, **self._fresh_plans())
            shifted = images[rows].to(self.device, self.dtype) - b
            for i, row in engine._attribute_iter(shifted, None if target is None else target[rows]):
                yield int(rows[i]), row

    def _fresh_plans(self) -> dict:
        return {}

    def _feature_iter(self, images, target, baseline, features) -> Iterator[tuple[int, BackSelectResult]]:
        """SIS over features: BackSelect of each image's :class:`FeatureModel`, whose "pixels" are features,
        mapped back to pixels."""
        bar = self.progress_bar(len(images), "img", f"{type(self).__name__} over features")
        for i in range(len(images)):
            ids = features[min(i, len(features) - 1)].to(self.device)
            count = int(ids.max()) + 1
            b = baseline if isinstance(baseline, float) else baseline[min(i, len(baseline) - 1)].to(self.device)
            model = FeatureModel(self.model, images[i : i + 1].to(self.device, self.dtype), b, ids, self.memory_format)
            engine = self._derived(model, 0.0, progress=False, **self._feature_settings(count))
            present = torch.ones(1, 1, 1, count, device=self.device, dtype=self.dtype)
            ((_, row),) = engine._attribute_iter(present, None if target is None else target[i : i + 1])
            bar.update(1)
            yield i, _pixels_of_features(row, ids.cpu().numpy(), count)
        bar.close()

    def _feature_settings(self, count: int) -> dict:
        return {}


class ShiftedInput(torch.nn.Module):
    """``module(x + shift)``: lets the masking baseline be 0 whatever it stands for (a colour, a tensor)."""

    def __init__(self, module: torch.nn.Module, shift: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("shift", shift.double())

    def forward(self, x):
        return self.module(x + self.shift.to(x.dtype))


def _pixels_of_features(row: BackSelectResult, ids: np.ndarray, count: int) -> BackSelectResult:
    """A result over ``count`` features (a 1 x F "image") as a result over the pixels of ``ids`` (H, W)."""
    flat = ids.reshape(-1)
    members = [np.flatnonzero(flat == f) for f in range(count)]
    order = np.concatenate([members[f] for f in row.order[0]])
    values = np.repeat(row.values[0], [len(members[f]) for f in row.order[0]])
    meta = dict(row.meta, features=count)
    return BackSelectResult(order[None], values[None], row.target, row.full_confidence, *ids.shape, meta=meta)


class BackSelect(_Engine):
    """Exact backward selection.

    ``batch_size`` is the number of masked candidates per forward (default: the fastest of
    ``CANDIDATE_BATCH_SIZES`` for the device, measured once per image size in a few seconds).
    ``dtype`` is the compute dtype (use torch.float64 for exact comparisons; a converted copy of the model
    is used if its parameters differ). ``bf16=True`` runs the model under bfloat16 autocast on CUDA: much
    faster, but approximate (near-ties may resolve differently from float32). Note that PyTorch's default
    TF32 convolutions on CUDA are approximate too; ``overinterp sis`` turns them off unless asked.
    ``memory_format`` is the layout of the model and of the candidate batches (channels_last is usually
    fastest; some CPU set-ups run small nets faster contiguous). The model is put in eval mode.

    ``evaluator`` chooses how candidates are computed: "incremental" recomputes only the receptive-field
    cone of the masked pixel in each layer (see :mod:`overinterp.incremental`; the same function, faster),
    "full" runs plain forwards, "auto" (default) measures both (with the batch sizes) and takes the faster.
    ``evaluator_for(image_shape)`` says which one runs and why; results record it in ``meta``.
    ``select_output`` picks the logits out of a model whose output is a dict or tuple (a key, an index or a
    callable). :meth:`attribute` takes Captum's ``target``, ``baselines`` and ``feature_mask`` forms.
    """

    def __init__(self, model: torch.nn.Module, baseline: float = 0.0, batch_size: int | None = None,
                 dtype: torch.dtype = torch.float32, bf16: bool = False, progress: bool = True,
                 memory_format=torch.channels_last, evaluator: str = "auto", select_output=None):
        super().__init__(model, baseline, batch_size, dtype, bf16, progress, None, memory_format, select_output)
        if evaluator not in incremental.EVALUATORS:
            raise ValueError(f"evaluator must be one of {', '.join(incremental.EVALUATORS)}, not {evaluator!r}")
        if bf16 and evaluator == "incremental":
            raise ValueError("the incremental evaluator computes in the engine's dtype; it does not run under bf16")
        self.evaluator = "full" if bf16 else evaluator
        self._plans: dict[tuple[int, int, int], tuple[incremental.IncrementalForward | None, int, str]] = {}

    def _plan(self, image_shape: tuple[int, int, int]) -> tuple[incremental.IncrementalForward | None, int, str]:
        """(incremental evaluator or None, candidate batch size, description) for images of ``image_shape``: the
        ones asked for, else the fastest combination, measured here in a few seconds."""
        image_shape = tuple(image_shape)
        if image_shape not in self._plans:
            forward, description = incremental.build(self.model, image_shape, self.baseline, self.dtype,
                                                     self.device, self.evaluator)
            choices = [forward] + ([None] if forward is not None and self.evaluator == "auto" else [])
            sizes = [self.batch_size] if self.batch_size else \
                CANDIDATE_BATCH_SIZES.get(self.device.type, CANDIDATE_BATCH_SIZES["cpu"])
            if len(choices) * len(sizes) == 1:
                self._plans[image_shape] = (forward, sizes[0], description)
            else:
                fastest = [self._fastest(choice, image_shape, sizes) for choice in choices]  # (rate, size)
                best = max(range(len(choices)), key=lambda i: fastest[i][0])
                if len(choices) > 1:
                    ratio = fastest[0][0] / fastest[1][0]
                    description = (f"{description}; measured {ratio:.2f}x the full-forward rate" if best == 0 else
                                   f"full forwards (measured faster than incremental here, x{1 / ratio:.2f})")
                self._plans[image_shape] = (choices[best], fastest[best][1], description)
        return self._plans[image_shape]

    def evaluator_for(self, image_shape: tuple[int, int, int]) -> str:
        """Which evaluator runs for images of ``image_shape`` (C, H, W), and why (results record it in ``meta``)."""
        return self._plan(image_shape)[2]

    def batch_size_for(self, image_shape: tuple[int, int, int]) -> int:
        """The candidate batch size for images of ``image_shape``: the one given, else the fastest, measured."""
        return self._plan(image_shape)[1]

    def _fastest(self, forward, image_shape: tuple[int, int, int], sizes) -> tuple[float, int]:
        """(rate, batch size) of the fastest of ``sizes`` for ``forward``, tried in ascending order up to where
        the rate falls past its peak or one timing takes over 2 s (large models)."""
        best = (0.0, sizes[0])
        for size in sizes:
            rate, seconds = self._rate(forward, image_shape, size)
            best = max(best, (rate, size))
            if seconds > 2.0 or rate < 0.9 * best[0]:
                break
        return best

    @torch.inference_mode()
    def _rate(self, forward, image_shape: tuple[int, int, int], size: int) -> tuple[float, float]:
        """Candidate evaluations/s of ``forward`` (None: full forwards) at ``size`` (the best of two timings),
        and the seconds of that timing."""
        channels, height, width = image_shape
        image = torch.randn(1, *image_shape, generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)
        pixels = torch.arange(size, device=self.device) % (height * width)
        slots = torch.zeros(size, dtype=torch.long, device=self.device)
        if forward is not None:
            forward.ensure_capacity(1)
            forward.refresh(slots[:1], image)

        def run():
            if forward is None:
                batch = image.repeat(size, 1, 1, 1)
                batch.view(size, channels, -1)[torch.arange(size, device=self.device), :, pixels] = self.baseline
                self.probabilities(batch)
            else:
                forward.logits(slots, pixels)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        run()
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return size / min(seconds), min(seconds)

    def _fresh_plans(self) -> dict:
        return {"_plans": {}}

    def _feature_settings(self, count: int) -> dict:
        # Few candidates per step: plain forwards of at most all of them, nothing to measure.
        largest = max(CANDIDATE_BATCH_SIZES.get(self.device.type, CANDIDATE_BATCH_SIZES["cpu"]))
        return {"_plans": {}, "evaluator": "full", "batch_size": self.batch_size or min(count, largest)}

    def _attribute_iter(self, images, target) -> Iterator[tuple[int, BackSelectResult]]:
        """Yield ``(i, result of image i)`` as images finish (roughly in input order)."""
        num_images, channels, height, width = images.shape
        pixels = height * width
        if num_images == 0:
            return
        # Host-side schedule: the step each slot is at, how many of its candidates are already evaluated.
        step: dict[int, int] = {}
        cursor: dict[int, int] = {}
        image_of: dict[int, int] = {}
        queue: deque[int] = deque()
        next_image = 0
        bar = self.progress_bar(num_images * pixels * (pixels + 1) // 2, "eval", "BackSelect")
        forward, batch_size, evaluator = self._plan((channels, height, width))
        state = None
        while True:
            finished = []
            # Inference mode per batch, not around the yield: the caller's code must not run in it.
            with torch.inference_mode():
                if state is None:
                    state = _SlotState(self.device, self.dtype, pixels, channels,
                                       capacity=max(2, 2 * batch_size // pixels + 2),
                                       pixel_major=self.memory_format == torch.channels_last, forward=forward)
                # Fill one batch from the front of the queue; admit new images only once every active
                # image's current step fits, so batches stay full until the last images finish.
                parts, completed = [], []  # parts: (slot, first candidate rank, count)
                room = batch_size
                while room:
                    if not queue:
                        if next_image == num_images:
                            break
                        slot = state.admit(self, images[next_image],
                                           None if target is None else target[next_image])
                        step[slot], cursor[slot], image_of[slot] = 0, 0, next_image
                        queue.append(slot)
                        next_image += 1
                    slot = queue[0]
                    left = pixels - step[slot] - cursor[slot]
                    take = min(room, left)
                    parts.append((slot, cursor[slot], take))
                    cursor[slot] += take
                    room -= take
                    if take == left:
                        completed.append(queue.popleft())
                if not parts:
                    break
                state.evaluate(self, parts, height, width)
                state.complete(self, completed, [step[s] for s in completed])
                for slot in completed:
                    step[slot] += 1
                    cursor[slot] = 0
                    if step[slot] < pixels:
                        queue.append(slot)
                    else:
                        finished.append((image_of.pop(slot), state.release(slot, height, width, evaluator)))
            bar.update(batch_size - room)
            yield from finished
        bar.close()


class _SlotState:
    """Per-image state of the active images, on the model's device, one row ("slot") per image.

    ``current``: the image with its removed pixels masked, (pixels, channels) when ``pixel_major`` (so a
    batch of them is channels_last), else (channels, pixels) (contiguous NCHW);
    ``remaining``: its still-present pixels in ascending order, padded with ``pixels``;
    ``scores``: f of every candidate of the current step by pixel, -inf elsewhere (argmax -> lowest index).
    With an incremental evaluator (``forward``), the slots whose current image changed since its caches were
    filled are ``stale``; they are refreshed when a batch next holds their candidates.
    """

    def __init__(self, device, dtype, pixels, channels, capacity, pixel_major, forward=None):
        self.device, self.dtype, self.pixels, self.channels = device, dtype, pixels, channels
        self.pixel_major = pixel_major
        self.forward = forward
        self.stale: set[int] = set()
        self.capacity = 0
        self.free: list[int] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        p, c, dev, dt = self.pixels, self.channels, self.device, self.dtype
        new = capacity - self.capacity
        fresh = {
            "current": torch.empty((new, p, c) if self.pixel_major else (new, c, p), dtype=dt, device=dev),
            "remaining": torch.empty(new, p, dtype=torch.long, device=dev),
            "scores": torch.full((new, p), -torch.inf, dtype=dt, device=dev),
            "order": torch.empty(new, p, dtype=torch.long, device=dev),
            "values": torch.empty(new, p, dtype=dt, device=dev),
            "target": torch.empty(new, dtype=torch.long, device=dev),
            "full": torch.empty(new, dtype=dt, device=dev),
        }
        for name, tensor in fresh.items():
            old = self.tensors.get(name)
            self.tensors[name] = tensor if old is None else torch.cat([old, tensor])
        self.free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity
        if self.forward is not None:
            self.forward.ensure_capacity(capacity)

    def indices(self, values) -> torch.Tensor:
        # Pageable host memory is staged by the copy call itself, so non_blocking needs no host sync.
        return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(self.device, non_blocking=True)

    def admit(self, engine: BackSelect, image: torch.Tensor, target) -> int:
        if not self.free:
            self.grow(2 * self.capacity)
        slot = self.free.pop()
        t = self.tensors
        x = image.to(self.device, self.dtype)
        flat = x.reshape(self.channels, self.pixels)
        t["current"][slot] = flat.T if self.pixel_major else flat
        t["remaining"][slot] = torch.arange(self.pixels, device=self.device)
        probs = engine.probabilities(x.unsqueeze(0))[0]
        cls = (probs.argmax() if target is None else target.to(self.device)).view(1)
        t["target"][slot] = cls[0]
        t["full"][slot] = probs.gather(0, cls)[0]  # gather, not probs[cls], which would read cls on the host
        self.stale.add(slot)
        return slot

    def mask_pixels(self, images: torch.Tensor, rows: torch.Tensor, pixel: torch.Tensor, baseline: float) -> None:
        if self.pixel_major:
            images[rows, pixel] = baseline
        else:
            images[rows, :, pixel] = baseline

    def evaluate(self, engine: BackSelect, parts, height, width) -> None:
        """f of every candidate in the batch, given as (slot, first rank, count), written into ``scores``."""
        t = self.tensors
        rows = self.indices(np.concatenate([np.full(n, slot) for slot, _, n in parts]))
        ranks = self.indices(np.concatenate([np.arange(start, start + n) for _, start, n in parts]))
        pixel = t["remaining"][rows, ranks]
        if self.forward is None:
            x = t["current"][rows]
            self.mask_pixels(x, torch.arange(len(rows), device=self.device), pixel, engine.baseline)
            probs = engine.probabilities(self.images(x, height, width))
        else:
            stale = sorted(self.stale.intersection(slot for slot, _, _ in parts))
            if stale:
                refresh = self.indices(stale)
                self.forward.refresh(refresh, self.images(t["current"][refresh], height, width))
                self.stale.difference_update(stale)
            probs = self.forward.logits(rows, pixel).to(self.dtype).softmax(1)
        t["scores"][rows, pixel] = probs.gather(1, t["target"][rows].unsqueeze(1)).squeeze(1)

    def images(self, flat: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, C, H, W) views of rows of ``current``."""
        if self.pixel_major:
            return flat.view(len(flat), height, width, self.channels).permute(0, 3, 1, 2)
        return flat.view(len(flat), self.channels, height, width)

    def complete(self, engine: BackSelect, slots, steps) -> None:
        """Finish the current step of ``slots``: remove each one's best candidate and record it."""
        if not slots:
            return
        t = self.tensors
        rows, steps = self.indices(slots), self.indices(steps)
        scores = t["scores"][rows]
        best = scores.argmax(1)  # first maximum = lowest pixel index on ties
        t["order"][rows, steps] = best
        t["values"][rows, steps] = scores.gather(1, best.unsqueeze(1)).squeeze(1)
        self.mask_pixels(t["current"], rows, best, engine.baseline)
        self.stale.update(slots)
        remaining = t["remaining"][rows]
        shifted = torch.cat([remaining[:, 1:], torch.full_like(remaining[:, :1], self.pixels)], 1)
        t["remaining"][rows] = torch.where(remaining >= best.unsqueeze(1), shifted, remaining)
        t["scores"][rows] = -torch.inf

    def release(self, slot: int, height: int, width: int, evaluator: str) -> BackSelectResult:
        self.free.append(slot)
        # Copies: on the CPU, .cpu() would return views of storage the next image reuses.
        row = {name: self.tensors[name][slot : slot + 1].to("cpu", copy=True).numpy()
               for name in ("order", "values", "target", "full")}
        return BackSelectResult(row["order"], row["values"], row["target"], row["full"], height, width,
                                meta={"evaluator": evaluator})


class GradientBackSelect(_Engine):
    """Batched Gradient BackSelect: one forward+backward per step removes ``pixels_per_step`` pixels.

    A float mask M (B, 1, H, W) starts at 0 (present); the model sees ``x * (1 - M) + baseline * M``. Each
    step takes the gradient of sum_b f_b with respect to M and, per image, masks the ``pixels_per_step``
    still-present pixels with the largest gradient (stable sort: ties to the lowest index), in that order.
    A step's value is f after the step. ``batch_size`` is images per forward+backward (default 64 on a
    CPU, 256 on CUDA); ``dtype``, ``bf16`` and ``memory_format`` as in :class:`BackSelect`.
    """

    def __init__(self, model: torch.nn.Module, pixels_per_step: int = 10, baseline: float = 0.0,
                 batch_size: int | None = None, dtype: torch.dtype = torch.float32, bf16: bool = False,
                 progress: bool = True, memory_format=torch.channels_last, select_output=None):
        super().__init__(model, baseline, batch_size, dtype, bf16, progress, DEFAULT_GRADIENT_BATCH_SIZE,
                         memory_format, select_output)
        if pixels_per_step < 1:
            raise ValueError(f"pixels_per_step must be at least 1, not {pixels_per_step}")
        self.pixels_per_step = int(pixels_per_step)

    def _attribute_iter(self, images, target, fill=None) -> Iterator[tuple[int, BackSelectResult]]:
        """Yield ``(i, result of image i)``, one batch of images at a time; ``fill``: a callable baseline
        (see :meth:`attribute_iter`), else the engine's ``baseline``."""
        num_images, _, height, width = images.shape
        pixels, k = height * width, self.pixels_per_step
        steps = math.ceil(pixels / k)
        bar = self.progress_bar(num_images * steps, "img-step", "GradientBackSelect")
        for start in range(0, num_images, self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, num_images))
            x = images[rows].to(self.device, self.dtype)
            chunk_target = None if target is None else target[rows].to(self.device)
            batch_fill = None if fill is None else (lambda x, keep, rows=rows: fill(x, keep, rows).to(x))
            result = self._select(x, chunk_target, bar, batch_fill)
            for i in range(len(result)):
                yield start + i, result.select(slice(i, i + 1))
        bar.close()

    def _baseline_iter(self, images, target, baseline: torch.Tensor) -> Iterator[tuple[int, BackSelectResult]]:
        """Tensor baselines, per image or shared, masked in directly: batches stay whole."""
        def fill(x, keep, rows):
            return baseline if len(baseline) == 1 else baseline[rows]

        yield from self._attribute_iter(images, target, fill)

    def _confidence(self, x, mask, target, fill=None):
        """f of every image under ``mask`` (and the target, taken from the prediction when None); masked
        pixels take ``fill(x, keep)`` (computed from the mask without gradient), else the baseline."""
        baseline = self.baseline if fill is None else fill(x, 1 - mask.detach())
        masked = x * (1 - mask) + baseline * mask
        probs = self.probabilities(masked)
        if target is None:
            target = probs.detach().argmax(1)
        return probs.gather(1, target.unsqueeze(1)).squeeze(1), target

    def _select(self, x: torch.Tensor, target, bar, fill=None) -> BackSelectResult:
        n, _, height, width = x.shape
        pixels, k = height * width, self.pixels_per_step
        order = torch.empty(n, pixels, dtype=torch.long, device=self.device)
        values = torch.empty(n, pixels, dtype=self.dtype, device=self.device)
        removed = torch.zeros(n, pixels, dtype=torch.bool, device=self.device)
        full = None
        for pos in range(0, pixels, k):
            mask = removed.view(n, 1, height, width).to(self.dtype).requires_grad_()
            with torch.enable_grad():
                f, target = self._confidence(x, mask, target, fill)
                (grad,) = torch.autograd.grad(f.sum(), mask)
            if full is None:
                full = f.detach()
            else:
                values[:, pos - k : pos] = f.detach().unsqueeze(1)
            grad = grad.view(n, pixels).masked_fill(removed, -torch.inf)
            take = grad.sort(dim=1, descending=True, stable=True).indices[:, : min(k, pixels - pos)]
            order[:, pos : pos + take.shape[1]] = take
            removed.scatter_(1, take, True)
            bar.update(n)
        with torch.inference_mode():
            f, _ = self._confidence(x, removed.view(n, 1, height, width).to(self.dtype), target, fill)
        values[:, (math.ceil(pixels / k) - 1) * k :] = f.unsqueeze(1)
        return BackSelectResult(order.cpu().numpy(), values.cpu().numpy(), target.cpu().numpy(),
                                full.cpu().numpy(), height, width, pixels_per_step=k)
