"""SIS on the command line: resumable shard runs, merging shards, and exact-vs-gradient agreement.

``overinterp sis`` computes backward-selection orderings for one shard (``np.array_split`` of the split's
images) and checkpoints finished images to ``<out>.partial.npz`` beside the output, so a killed run
resumes at image granularity. ``overinterp sis-merge`` joins the shards of a split after checking that
they are complete and belong together. ``overinterp sis-agreement`` compares the kept pixels and the
orderings of the two methods on the same images; ``overinterp sis-agreement-table`` summarises them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .analysis import readable_table
from .incremental import EVALUATORS
from .sis import BackSelect, BackSelectResult, GradientBackSelect, keep_last, kept_count, read_step_arrays
from .data import add_normalization_arguments
from .utils import DataError, add_device_argument, resolve_device, save_dataframe, save_npz

log = logging.getLogger(__name__)

METHODS = ("exact", "gradient")
# float64/float32: exact arithmetic of that type; tf32 and bf16 are faster CUDA modes, approximate.
PRECISIONS = ("float32", "float64", "tf32", "bf16")
# How a shard was computed, not what: measured per run, and the results are the same function either way.
RUN_KEYS = ("evaluator",)
# Shards of one split must agree on everything in their metadata except these.
PER_SHARD_KEYS = ("shard", "images_sha1", *RUN_KEYS)


def partial_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".npz") + ".partial.npz")


def run_shard(engine, images: torch.Tensor, index: np.ndarray, out, meta: dict,
              checkpoint_seconds: float = 30.0, steps: bool = False, fill=None) -> BackSelectResult:
    """BackSelect ``images`` (rows ``index`` of the dataset) with ``engine`` and write ``out`` atomically,
    in the step form with ``steps`` (see :meth:`BackSelectResult.to_arrays`); masked pixels take ``fill``'s
    values (a :class:`~overinterp.fills.Fill`; default: the engine's baseline).

    Finished images are saved to a partial file beside ``out`` at most every ``checkpoint_seconds``; a
    rerun with the same ``meta`` (which should identify model, images and settings) continues from it.
    """
    partial = partial_path(out)
    done: dict[int, BackSelectResult] = {}
    previous = None
    if partial.exists():
        try:
            previous = BackSelectResult.load(partial)
        except (DataError, ValueError) as err:  # a damaged checkpoint costs its images, never the run
            log.warning("discarding the unreadable checkpoint %s and recomputing its images: %s", partial, err)
            partial.unlink()
    if previous is not None:
        if {k: v for k, v in previous.meta.items() if k not in RUN_KEYS} == \
                {k: v for k, v in meta.items() if k not in RUN_KEYS}:
            position = {int(row): i for i, row in enumerate(index)}
            done = {position[int(row)]: previous.select(slice(i, i + 1)) for i, row in enumerate(previous.index)}
            log.info("resuming %s: %d of %d images already done", out, len(done), len(index))
        else:
            log.warning("ignoring %s: it was made with other settings, images or model", partial)

    def checkpoint():
        rows = [done[i] for i in sorted(done)]
        result = BackSelectResult.concatenate(rows)
        result.meta = meta
        result.save(partial, compressed=False, steps=steps)

    todo = np.array([i for i in range(len(index)) if i not in done], dtype=np.int64)
    last_save = time.monotonic()
    if len(todo):
        baselines = None if fill is None else fill.for_rows(index[todo], tuple(images.shape[1:]))
        for i, row in engine.attribute_iter(images[torch.from_numpy(todo)], baselines=baselines):
            row.index = index[todo[i] : todo[i] + 1]
            done[int(todo[i])] = row
            if time.monotonic() - last_save >= checkpoint_seconds and len(done) < len(index):
                checkpoint()
                last_save = time.monotonic()
    result = BackSelectResult.concatenate([done[i] for i in range(len(index))])
    result.meta = meta
    result.save(out, steps=steps)
    partial.unlink(missing_ok=True)
    return result


def _merged_meta(paths, metas: list[dict]) -> tuple[list[int], dict]:
    """The order of the shards (by shard id) and the merged result's meta, after checking that the shards
    are complete and made with the same settings."""
    if not metas:
        raise ValueError("no shard files given to merge")
    common = [{k: v for k, v in m.items() if k not in PER_SHARD_KEYS} for m in metas]
    for path, c in zip(paths, common):
        differ = sorted(k for k in set(c) | set(common[0]) if c.get(k) != common[0].get(k))
        if differ:
            raise ValueError(f"{path} does not belong with {paths[0]}: their {', '.join(differ)} differ. "
                             "Delete the stale shard files and rerun.")
    count = common[0].get("shards")
    ids = sorted(m.get("shard", -1) for m in metas)
    if count is None or ids != list(range(count)):
        raise ValueError(f"expected shard files 0..{count - 1 if count else '?'} exactly once each, got shard ids {ids}")
    merged = dict(common[0])
    for key in RUN_KEYS:
        if any(key in m for m in metas):
            merged[key] = "; ".join(sorted({str(m.get(key)) for m in metas}))
    return sorted(range(len(metas)), key=lambda i: metas[i]["shard"]), merged


def merge_shards(paths) -> BackSelectResult:
    """One split's result from all its shard files (any order), checked for completeness and consistency."""
    shards = [BackSelectResult.load(p) for p in paths]
    order, meta = _merged_meta(paths, [s.meta for s in shards])
    merged = BackSelectResult.concatenate([shards[i] for i in order])
    if len(np.unique(merged.index)) != len(merged):
        raise ValueError("the shards overlap: some dataset rows appear in more than one shard")
    merged.meta = meta
    return merged


def merge_step_shards(paths, out) -> None:
    """:func:`merge_shards` for shards in the step form, without building orderings: ImageNet's 50,000
    validation images take 9 GB as steps, 36 GB as orderings."""
    keys = ("index", "target", "full_confidence", "removal_step", "step_values")
    parts = [read_step_arrays([p], keys) for p in paths]
    order, meta = _merged_meta(paths, [part["meta"] for part in parts])
    arrays = {key: np.concatenate([parts[i][key] for i in order]) for key in keys}
    if len(np.unique(arrays["index"])) != len(arrays["index"]):
        raise ValueError("the shards overlap: some dataset rows appear in more than one shard")
    shape = {key: np.int64(parts[0][key]) for key in ("height", "width", "pixels_per_step")}
    save_npz(out, meta=np.array(json.dumps(meta, sort_keys=True)), **shape, **arrays)


def run_merge(args: argparse.Namespace) -> int:
    try:
        with np.load(args.shards[0], allow_pickle=False) as first:
            steps = "removal_step" in first.files
    except Exception:  # a damaged file: merge_shards names it
        steps = False
    if steps:  # in the form its shards have
        merge_step_shards(args.shards, args.out)
    else:
        merge_shards(args.shards).save(args.out)
    return 0


def set_precision(precision: str, device: torch.device) -> dict:
    """Engine arguments for ``precision``; sets PyTorch's global TF32 switches to match it."""
    if precision in ("tf32", "bf16") and device.type != "cuda":
        raise ValueError(f"precision {precision} needs a CUDA device; use float32 on the CPU")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batches keep one shape, so the autotuned kernels pay off
    return {"dtype": torch.float64 if precision == "float64" else torch.float32, "bf16": precision == "bf16"}


def build_engine(method: str, model, args) -> BackSelect | GradientBackSelect:
    common = dict(baseline=args.baseline, batch_size=args.batch_size,
                  **set_precision(args.precision, next(model.parameters()).device))
    if method == "exact":
        return BackSelect(model, evaluator=args.evaluator, **common)
    return GradientBackSelect(model, pixels_per_step=args.pixels_per_step, **common)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("sis", help="backward-selection orderings of one shard of a split (resumable)")
    p.add_argument("--data", required=True, help="converted dataset (.npz)")
    p.add_argument("--model", required=True, help="model file (.pt)")
    p.add_argument("--split", required=True, choices=["train", "test"], help="which split's images")
    p.add_argument("--size", type=int, default=None, help="class-balanced subset size of the split")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT images (after --size)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="exact: the paper's BackSelect; gradient: Batched Gradient BackSelect (one forward+backward "
                        "per step)")
    p.add_argument("--pixels-per-step", type=int, default=10, help="gradient method: pixels masked per step")
    p.add_argument("--batch-size", type=int, default=None,
                   help="candidates per forward (exact; default: the fastest, measured at the start) or images per "
                        "step (gradient; default per device)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="float32 (default) or float64: exact; tf32, bf16: faster on CUDA, approximate")
    p.add_argument("--evaluator", default="auto", choices=EVALUATORS,
                   help="exact method: incremental (recompute only what the masked pixel changes; the same function), "
                        "full (plain forwards) or auto (default: measure both at the start, take the faster)")
    p.add_argument("--shard", type=int, default=0, help="which part of the split, 0..SHARDS-1 (default: 0)")
    p.add_argument("--shards", type=int, default=1, help="parts the split is cut into (default: 1)")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0, help="save finished images this often")
    p.add_argument("--steps", action="store_true",
                   help="gradient method: store the step form (each pixel's removal step and f after each step, "
                        "2 bytes a pixel; the order within a step is dropped), for large images")
    add_normalization_arguments(p)
    add_device_argument(p)
    p.add_argument("--out", required=True, help="result file (.npz)")
    p.set_defaults(handler=run_sis)

    p = subparsers.add_parser("sis-merge", help="merge the shard files of one split into one result file")
    p.add_argument("--out", required=True, help="merged result file (.npz)")
    p.add_argument("shards", nargs="+", help="the shard files (.npz), every shard of the split exactly once")
    p.set_defaults(handler=run_merge)

    p = subparsers.add_parser("sis-agreement", help="per-image agreement of exact and gradient orderings")
    p.add_argument("--exact", required=True, help="exact BackSelect result (.npz)")
    p.add_argument("--gradient", required=True, help="gradient BackSelect result (.npz)")
    p.add_argument("--fraction", type=float, default=0.05, help="kept fraction compared (default 0.05)")
    p.add_argument("--data", required=True, help="converted dataset, to evaluate the model on the kept pixels")
    p.add_argument("--model", required=True, help="the model both orderings were made for (.pt)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="the results' split (default: test)")
    add_normalization_arguments(p)
    add_device_argument(p)
    p.add_argument("--out", required=True, help="per-image table (.csv)")
    p.set_defaults(handler=run_agreement)

    p = subparsers.add_parser("sis-agreement-table", help="summary of per-image agreement tables, one row per model")
    p.add_argument("--csv", required=True, help="summary table (.csv)")
    p.add_argument("--markdown", required=True, help="the same as Markdown (.md)")
    p.add_argument("tables", nargs="+", metavar="MODEL=CSV", help="per-image tables of sis-agreement, by model")
    p.set_defaults(handler=run_agreement_table)


def run_sis(args: argparse.Namespace) -> int:
    from .data import load_split, md5sum
    from .models import load_model
    from .data import normalizer_from_args

    if not 0 <= args.shard < args.shards:
        raise ValueError(f"--shard must lie in 0..{args.shards - 1}, not {args.shard}")
    split = load_split(args.data, args.split, args.size)
    rows = np.arange(len(split) if args.limit is None else min(args.limit, len(split)))
    rows = np.array_split(rows, args.shards)[args.shard]
    images = split.images[torch.from_numpy(rows)]
    normalizer = normalizer_from_args(args)
    meta = {
        "method": args.method, "pixels_per_step": args.pixels_per_step if args.method == "gradient" else 1,
        "split": args.split, "size": args.size, "limit": args.limit, "shard": args.shard, "shards": args.shards,
        "mean": normalizer.mean.flatten().tolist(), "std": normalizer.std.flatten().tolist(),
        "baseline": normalizer.baseline, **normalizer.fill.describe(), "precision": args.precision,
        "storage": "steps" if args.steps else "orders",
        "model_md5": md5sum(args.model),
        "images_sha1": hashlib.sha1(images.numpy().tobytes()).hexdigest(),
    }
    model = load_model(args.model, resolve_device(args.device))
    engine = build_engine(args.method, model, args)
    if args.method == "exact":
        meta["evaluator"] = engine.evaluator_for(tuple(images.shape[1:]))
    log.info("%s BackSelect of %d %s images (shard %d of %d) on %s%s", args.method, len(rows), args.split,
             args.shard, args.shards, engine.device, f", {meta['evaluator']}" if "evaluator" in meta else "")
    if args.steps and args.method != "gradient":
        raise ValueError("--steps stores the gradient method's steps; the exact method removes one pixel a step")
    if args.fill == "impute" and args.method != "gradient":
        raise ValueError("--fill impute depends on the mask at every step; use --method gradient")
    run_shard(engine, normalizer(images), split.index[rows], args.out, meta, args.checkpoint_seconds, args.steps,
              normalizer.fill)
    return 0


def rank_correlation(a: BackSelectResult, b: BackSelectResult) -> np.ndarray:
    """Spearman correlation, per image, of the removal positions of every pixel in two orderings."""
    n = a.num_pixels
    pos_a, pos_b = np.argsort(a.order, axis=1), np.argsort(b.order, axis=1)
    d2 = ((pos_a - pos_b).astype(np.float64) ** 2).sum(1)
    return 1 - 6 * d2 / (n * (n * n - 1))


def agreement(exact: BackSelectResult, gradient: BackSelectResult, fraction: float):
    """Per image in both results: overlap of the kept pixels (|A & B| / |A|) and rank correlation.

    Returns the table and, for each method, its result restricted to those images and their keep-masks.
    """
    common, ie, ig = np.intersect1d(exact.index, gradient.index, return_indices=True)
    if not len(common):
        raise ValueError("the exact and gradient results share no images; run both on the same sample")
    if (exact.height, exact.width) != (gradient.height, gradient.width):
        raise ValueError("the exact and gradient results are for different image sizes")
    exact, gradient = exact.select(ie), gradient.select(ig)
    n = kept_count(exact.num_pixels, fraction)
    keep_e, keep_g = keep_last(exact, n=n), keep_last(gradient, n=n)
    return pd.DataFrame({
        "index": common,
        "target": exact.target,
        "same_target": exact.target == gradient.target,
        "full_confidence": exact.full_confidence,
        "pixels": exact.num_pixels,
        "kept_pixels": n,
        "overlap": (keep_e & keep_g).sum(1) / max(n, 1),
        "spearman": rank_correlation(exact, gradient),
    }), (exact, keep_e), (gradient, keep_g)


def kept_confidence(model, normalizer, images: torch.Tensor, keep: np.ndarray, target: np.ndarray, height, width):
    """f of ``target`` on the images reduced to their kept pixels."""
    from .evaluate import predict

    keep = torch.from_numpy(keep).view(-1, 1, height, width)
    device = next(model.parameters()).device
    probs = predict(model, normalizer(images.to(device), keep.to(device)))
    return probs.gather(1, torch.from_numpy(target).to(probs.device).unsqueeze(1)).squeeze(1).cpu().numpy()


def run_agreement(args: argparse.Namespace) -> int:
    from .data import load_split
    from .models import load_model
    from .data import normalizer_from_args

    table, (exact, keep_e), (gradient, keep_g) = agreement(
        BackSelectResult.load(args.exact), BackSelectResult.load(args.gradient), args.fraction)
    split = load_split(args.data, args.split)  # the whole split: result indices are dataset rows
    images = split.images[torch.from_numpy(exact.index)]
    model = load_model(args.model, resolve_device(args.device))
    normalizer = normalizer_from_args(args)
    h, w = exact.height, exact.width
    table["exact_kept_confidence"] = kept_confidence(model, normalizer, images, keep_e, exact.target, h, w)
    table["gradient_kept_confidence"] = kept_confidence(model, normalizer, images, keep_g, gradient.target, h, w)
    save_dataframe(args.out, table)
    return 0


def summarize_agreement(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for name, t in tables.items():
        rows.append({
            "model": name,
            "images": len(t),
            "kept_pixels": int(t["kept_pixels"].iloc[0]),
            "overlap_mean": t["overlap"].mean(),
            "overlap_sd": t["overlap"].std(ddof=1) if len(t) > 1 else float("nan"),
            "overlap_median": t["overlap"].median(),
            # Expected overlap of two independent random subsets of the same size.
            "overlap_chance": t["kept_pixels"].iloc[0] / t["pixels"].iloc[0],
            "spearman_mean": t["spearman"].mean(),
            "spearman_median": t["spearman"].median(),
            "exact_kept_confidence_mean": t["exact_kept_confidence"].mean(),
            "gradient_kept_confidence_mean": t["gradient_kept_confidence"].mean(),
            "same_target": t["same_target"].mean(),
        })
    return pd.DataFrame(rows)


def run_agreement_table(args: argparse.Namespace) -> int:
    tables = {}
    for item in args.tables:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"expected MODEL=CSV, got {item!r}")
        tables[name] = pd.read_csv(path)
    summary = summarize_agreement(tables)
    save_dataframe(args.csv, summary)
    save_dataframe(args.markdown, readable_table(summary))
    return 0
