"""The ImageNet table (top-1 / top-5 for full images, BS 10% and random 10%, the positions-only control and
agreement with the selecting model) and its figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .sis import last_steps_kept, read_step_arrays, sis_size_of_steps
from .utils import atomic_path, save_dataframe

# (row label, evaluation file stem or retrained variant, trained on, tested on)
SELECTING_ROWS = [("full", "full", "full images", "full images"),
                  ("full-on-bs", "full-on-bs", "full images", "BS {pct}"),
                  ("full-on-random", "full-on-random", "full images", "random {pct}")]
RETRAINED_ROWS = [("bs", "BS {pct}", "BS {pct}"), ("random", "random {pct}", "random {pct}"),
                  ("positions", "BS {pct} positions only", "BS {pct} positions only")]


def _agreement(table: pd.DataFrame, reference: pd.DataFrame) -> tuple[float, float]:
    """Share of images where ``table`` predicts what ``reference`` (the selecting model on full images) does,
    overall and on the images the reference misclassifies (NaN where there are none)."""
    merged = table.merge(reference, on="index", suffixes=("", "_ref"), validate="one_to_one")
    same = merged["prediction"] == merged["prediction_ref"]
    wrong = merged["prediction_ref"] != merged["label_ref"]
    return float(same.mean()), float(same[wrong].mean()) if wrong.any() else float("nan")


def imagenet_table(eval_dir: str | Path, archs: list[str], seeds: list[int], fraction: float,
                   positions_only: bool = True) -> pd.DataFrame:
    """One row per (architecture, model, trained on, tested on); mean and std over replicate seeds."""
    eval_dir = Path(eval_dir)
    pct = f"{fraction:.0%}"
    rows = []
    for arch in archs:
        reference = pd.read_csv(eval_dir / arch / "full.csv")

        def add(model, trained, tested, stems):
            tables = [pd.read_csv(eval_dir / arch / f"{stem}.csv") for stem in stems]
            top1 = [(t["prediction"] == t["label"]).mean() for t in tables]
            top5 = [t["top5"].mean() for t in tables]
            agree = np.array([_agreement(t, reference) for t in tables])
            rows.append({
                "architecture": arch, "model": model, "trained_on": trained.format(pct=pct),
                "tested_on": tested.format(pct=pct), "replicates": len(tables), "images": len(tables[0]),
                "top1": np.mean(top1), "top1_std": np.std(top1, ddof=1) if len(top1) > 1 else np.nan,
                "top5": np.mean(top5), "top5_std": np.std(top5, ddof=1) if len(top5) > 1 else np.nan,
                "mean_confidence": np.mean([t["confidence"].mean() for t in tables]),
                "agreement": np.nan if stems == ["full"] else agree[:, 0].mean(),
                "agreement_where_selecting_wrong": np.nan if stems == ["full"] else agree[:, 1].mean(),
            })

        for _, stem, trained, tested in SELECTING_ROWS:
            add("selecting", trained, tested, [stem])
        for variant, trained, tested in RETRAINED_ROWS:
            if variant == "positions" and not positions_only:
                continue
            add("retrained", trained, tested, [f"{variant}-s{seed}" for seed in seeds])
    return pd.DataFrame(rows)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    for suffix in (".png", ".pdf"):
        with atomic_path(path.with_suffix(suffix)) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(fig)


def accuracy_figure(table: pd.DataFrame, out: str | Path) -> None:
    """Grouped bars: top-1 of the selecting model on full images and of the retrained models, per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = table[(table["model"] == "retrained") | (table["tested_on"] == "full images")]
    conditions = list(dict.fromkeys(bars["tested_on"]))
    archs = list(dict.fromkeys(bars["architecture"]))
    colours = ["#0072B2", "#E69F00", "#009E73", "#CC79A7"]  # Okabe-Ito, colour-blind-safe
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(archs), 3.2))
    width = 0.8 / len(conditions)
    for i, condition in enumerate(conditions):
        part = bars[bars["tested_on"] == condition].set_index("architecture").reindex(archs)
        x = np.arange(len(archs)) + (i - (len(conditions) - 1) / 2) * width
        ax.bar(x, 100 * part["top1"], width, yerr=100 * part["top1_std"].fillna(0), label=condition,
               color=colours[i % len(colours)], capsize=3)
    ax.set_xticks(np.arange(len(archs)), archs)
    ax.set_ylabel("ImageNet val top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(title="trained and tested on", fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_title("Models trained on pixel subsets")
    _save_figure(fig, Path(out))


def confidence_figure(shards_by_arch: dict[str, list], out: str | Path) -> None:
    """Median (and interquartile band) of f on the target class against the fraction of pixels removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for colour, (arch, paths) in zip(["#0072B2", "#D55E00", "#009E73"], shards_by_arch.items()):
        arrays = read_step_arrays(paths, keys=("full_confidence", "step_values"))
        values = np.column_stack([arrays["full_confidence"], arrays["step_values"]])
        pixels, k = arrays["height"] * arrays["width"], arrays["pixels_per_step"]
        removed = np.minimum(np.arange(values.shape[1]) * k, pixels) / pixels
        q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75], axis=0)
        ax.plot(removed, median, color=colour, label=arch)
        ax.fill_between(removed, q1, q3, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("confidence in the predicted class")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False)
    ax.set_title("Batched Gradient BackSelect on ImageNet val")
    _save_figure(fig, Path(out))


def examples_figure(shard_paths: list, split, fraction: float, tau: float, count: int, out: str | Path) -> None:
    """For ``count`` val images: the image, its BS subset and its SIS at tau (masked pixels in the mean colour).

    The confidences shown are the stored backward-selection values, f on the kept pixels alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .datasets import imagenet_class_names as class_names, load_frame

    arrays = read_step_arrays(shard_paths, keys=("index", "target", "full_confidence", "removal_step", "step_values"))
    resize, crop = arrays["meta"]["resize"], arrays["height"]
    pixels, k = arrays["height"] * arrays["width"], arrays["pixels_per_step"]
    first, _ = last_steps_kept(pixels, k, fraction)
    sis_sizes = sis_size_of_steps(arrays["step_values"], arrays["full_confidence"], pixels, k, tau)
    mean = np.array([0.485, 0.456, 0.406])
    shown = min(count, len(arrays["index"]))
    fig, axes = plt.subplots(shown, 3, figsize=(6, 2.1 * shown), squeeze=False)
    position_of = {row: i for i, row in enumerate(split.index)}
    for r in range(shown):
        row = int(arrays["index"][r])
        image = load_frame(split.root / split.paths[position_of[row]], (resize, crop)).permute(1, 2, 0).numpy() / 255
        step = arrays["removal_step"][r].reshape(arrays["height"], arrays["width"])
        values = arrays["step_values"][r]
        target = class_names()[int(arrays["target"][r])]
        panels = [(image, f"{target}\nf = {arrays['full_confidence'][r]:.2f}"),
                  (np.where((step >= first)[..., None], image, mean), f"BS {fraction:.0%}: f = {values[first - 1]:.2f}")]
        if not np.isnan(sis_sizes[r]):
            kept = step >= -(-(pixels - sis_sizes[r]) // k)  # the steps after the last one still >= tau
            panels.append((np.where(kept[..., None], image, mean), f"SIS at {tau}: {kept.mean():.1%} of pixels"))
        else:
            panels.append((np.broadcast_to(mean, image.shape), f"no SIS (f < {tau})"))
        for ax, (picture, title) in zip(axes[r], panels):
            ax.imshow(picture)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    _save_figure(fig, Path(out))


def save_table(table: pd.DataFrame, csv: str | Path, markdown: str | Path) -> None:
    save_dataframe(csv, table)
    shown = table.copy()
    for col in ("top1", "top1_std", "top5", "top5_std", "agreement", "agreement_where_selecting_wrong"):
        shown[col] = (100 * shown[col]).round(1)
    shown["mean_confidence"] = shown["mean_confidence"].round(3)
    save_dataframe(markdown, shown)
