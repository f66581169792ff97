"""Controls that test what backward-selection subsets mean: sufficient evidence of the class, or an
adversarial pattern the model reads?

* **smoothed** (Springer 2022): a sufficient subset should stay sufficient when more of the true image is
  shown. Each SIS (and BS subset) is dilated by a 3x3 box; the selecting model's confidence on the subset,
  on the dilated subset and on random pixels of the dilated size.
* **targeted**: backward selection towards every class, not only the predicted one. If nearly any class
  reaches tau on 5% of the pixels, a subset's confidence is weak evidence of class content.
* **masking**: the BS-vs-random retraining gap with masked pixels filled by noise or ROAD's imputation, which
  hide where the kept pixels are (BS computed under the same fill; :mod:`overinterp.fills`). Here only the
  table and figure; the runs are the pipeline's own stages with ``--fill``.
* **swap**: a model retrained on subsets, shown the kept positions of one test image filled with the pixels
  of an image of another class at those positions: does it follow the shape or the pixels?

Each control writes a per-image (or per-pair) CSV; ``overinterp controls report`` turns one control's CSVs
into a table (CSV + Markdown) and a figure (PNG + PDF).
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .analysis import bootstrap_interval
from .data import add_normalization_arguments, load_split, normalizer_from_args
from .utils import add_device_argument, resolve_device, save_dataframe

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The controls


def dilate(keep: torch.Tensor, size: int = 3) -> torch.Tensor:
    """(N, 1, H, W) bool keep-masks grown by a ``size`` x ``size`` box (every neighbour of a kept pixel)."""
    return F.max_pool2d(keep.float(), size, stride=1, padding=size // 2).bool()


def random_keep_like(counts: np.ndarray, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
    """(N, 1, H, W) keep-masks of ``counts[i]`` random pixels each."""
    keep = np.zeros((len(counts), height * width), dtype=bool)
    for i, n in enumerate(counts):
        keep[i, rng.choice(height * width, int(n), replace=False)] = True
    return torch.from_numpy(keep).view(-1, 1, height, width)


def _class_probabilities(model, normalizer, images, keep, classes, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(probability of ``classes[i]``, predicted class) of each image reduced to ``keep``."""
    from .evaluate import predict

    device = next(model.parameters()).device
    probs = torch.cat([predict(model, normalizer(images[s].to(device), keep[s].to(device)))
                       for s in (slice(i, i + batch_size) for i in range(0, len(images), batch_size))])
    chosen = probs.gather(1, torch.as_tensor(classes, device=probs.device).view(-1, 1)).squeeze(1)
    return chosen.cpu().numpy(), probs.argmax(1).cpu().numpy()


def smoothed(model, normalizer, split, result, tau: float, fraction: float, seed: int) -> pd.DataFrame:
    """Per test image and subset kind (``sis`` at ``tau``, where the image has one; ``bs``, the pixels
    removed last, ``fraction`` of the image): the selected class's probability, whether it is still the
    prediction and whether the prediction is the label, on the subset, on the subset dilated by 3x3, and on random pixels as many as the dilated
    subset has."""
    from .sis import keep_last, sis_mask

    position = {int(row): i for i, row in enumerate(split.index)}
    missing = [int(r) for r in result.index if int(r) not in position]
    if missing:
        raise ValueError(f"the SIS result has {len(missing)} images the dataset split does not (first: row "
                         f"{missing[0]}); give the dataset and sizes it was made from")
    rows = np.array([position[int(r)] for r in result.index])
    images, labels = split.images[torch.from_numpy(rows)], split.labels[rows].numpy()
    h, w = result.height, result.width
    masks = sis_mask(result, tau)
    has_sis = np.array([m is not None for m in masks])
    kinds = {"bs": (np.arange(len(result)), torch.from_numpy(keep_last(result, fraction=fraction)).view(-1, 1, h, w))}
    if has_sis.any():
        kinds["sis"] = (np.flatnonzero(has_sis),
                        torch.from_numpy(np.stack([m for m in masks if m is not None])).view(-1, 1, h, w))
    rng = np.random.default_rng(seed)
    frames = []
    for kind, (picked, keep) in kinds.items():
        grown = dilate(keep)
        counts = grown.flatten(1).sum(1).numpy()
        random = random_keep_like(counts, h, w, rng)
        target = result.target[picked]
        frame = pd.DataFrame({"index": result.index[picked], "subset": kind, "label": labels[picked],
                              "target": target, "full_confidence": result.full_confidence[picked],
                              "kept": keep.flatten(1).sum(1).numpy(), "dilated_kept": counts, "pixels": h * w})
        for name, mask in (("subset", keep), ("dilated", grown), ("random", random)):
            confidence, prediction = _class_probabilities(model, normalizer, images[picked], mask, target)
            frame[f"confidence_{name}"] = confidence
            frame[f"predicted_{name}"] = prediction == target
            frame[f"correct_{name}"] = prediction == labels[picked]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def targeted(model, normalizer, split, sample: int, seed: int, pixels_per_step: int, tau: float, fraction: float,
             batch_size: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Gradient backward selection of ``sample`` test images (drawn with ``seed``) towards every class.
    Per (image, class): whether the class is the prediction, f on the full image, the smallest subset along
    the selection path whose f reaches ``tau`` (NaN: none does), and f on the ``fraction`` subset."""
    from .sis import GradientBackSelect, keep_last, kept_count, smallest_reaching

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(split), min(sample, len(split)), replace=False))
    images = split.images[torch.from_numpy(rows)]
    x = normalizer(images)
    engine = GradientBackSelect(model, pixels_per_step=pixels_per_step, batch_size=batch_size, progress=progress)
    num_classes = int(engine.probabilities(x[:1].to(engine.device)).shape[1])
    frames = []
    for c in range(num_classes):
        result = engine.attribute(x, target=c)
        n = kept_count(result.num_pixels, fraction)
        keep = torch.from_numpy(keep_last(result, n=n)).view(-1, 1, result.height, result.width)
        at_fraction, _ = _class_probabilities(model, normalizer, images, keep, result.target)
        frames.append(pd.DataFrame({
            "index": split.index[rows], "label": split.labels[rows].numpy(), "class": c,
            "full_confidence": result.full_confidence, "smallest_subset": smallest_reaching(result, tau),
            "pixels": result.num_pixels, "kept_at_fraction": n, "confidence_at_fraction": at_fraction,
        }))
        log.info("class %d of %d done", c + 1, num_classes)
    table = pd.concat(frames, ignore_index=True)
    best = table.loc[table.groupby("index")["full_confidence"].idxmax()].set_index("index")["class"]
    table["predicted"] = table["class"].to_numpy() == table["index"].map(best).to_numpy()
    return table


def swap_partners(labels: np.ndarray, seed: int) -> np.ndarray:
    """For each image, another image of a different class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    others = {c: np.flatnonzero(labels != c) for c in np.unique(labels)}
    if any(len(o) == 0 for o in others.values()):
        raise ValueError("the swap test needs images of at least two classes")
    return np.array([others[c][rng.integers(len(others[c]))] for c in labels])


def swap(model, normalizer, split, keep, partners: np.ndarray, batch_size: int = 1000) -> pd.DataFrame:
    """Per test image: the model's prediction on its own subset, and on its kept positions filled with the
    pixels of ``partners[i]`` (an image of another class) at those positions."""
    from .evaluate import predict

    device = next(model.parameters()).device
    own, swapped = [], []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        mask = keep[rows].to(device)
        own.append(predict(model, normalizer(split.images[rows].to(device), mask)).argmax(1).cpu())
        donor = split.images[torch.from_numpy(partners[rows])].to(device)
        swapped.append(predict(model, normalizer(donor, mask)).argmax(1).cpu())
    labels = split.labels.numpy()
    return pd.DataFrame({"index": split.index, "partner": split.index[partners], "label": labels,
                         "partner_label": labels[partners], "prediction_own": torch.cat(own).numpy(),
                         "prediction_swapped": torch.cat(swapped).numpy()})


# ----------------------------------------------------------------------------------------------------------
# Tables


def _bootstrap_mean(values) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (none of fewer than two values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    low, high = bootstrap_interval(np.mean, (values,))
    return float(low), float(high)


def smoothed_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for model, frame in frames.items():
        for kind, part in frame.groupby("subset", sort=False):
            row = {"model": model, "subset": kind, "images": len(part),
                   "kept_share": (part["kept"] / part["pixels"]).mean(),
                   "dilated_share": (part["dilated_kept"] / part["pixels"]).mean()}
            for name in ("subset", "dilated", "random"):
                row[f"confidence_{name}"] = part[f"confidence_{name}"].mean()
                row[f"predicted_{name}"] = part[f"predicted_{name}"].mean()
                if f"correct_{name}" in part:
                    row[f"accuracy_{name}"] = part[f"correct_{name}"].mean()
            row["confidence_drop_low"], row["confidence_drop_high"] = _bootstrap_mean(
                part["confidence_subset"] - part["confidence_dilated"])
            rows.append(row)
    return pd.DataFrame(rows)


def targeted_table(frames: dict[str, pd.DataFrame], tau: float) -> pd.DataFrame:
    rows = []
    for model, frame in frames.items():
        small = frame["smallest_subset"] <= frame["kept_at_fraction"]
        row = {"model": model, "images": frame["index"].nunique(), "classes": frame["class"].nunique()}
        for name, part in (("predicted", frame["predicted"]), ("other", ~frame["predicted"])):
            sizes = frame.loc[part, "smallest_subset"] / frame.loc[part, "pixels"]
            row[f"{name}_pairs"] = int(part.sum())
            row[f"{name}_reach_at_fraction"] = small[part].mean()
            row[f"{name}_reach_anywhere"] = sizes.notna().mean()
            row[f"{name}_median_smallest"] = sizes.median()
            row[f"{name}_confidence_at_fraction"] = frame.loc[part, "confidence_at_fraction"].mean()
        # images on which every class reaches tau with the fraction's pixels
        row["every_class_at_fraction"] = small.groupby(frame["index"]).all().mean()
        row["tau"] = tau
        rows.append(row)
    return pd.DataFrame(rows)


def masking_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (mean and sd over seeds) per model, fill and subset kind, and the BS-over-random gap."""
    rows = []
    for (model, fill), part in summaries.groupby(["model", "fill"], sort=False):
        row = {"model": model, "fill": fill}
        for kind in ("bs", "random", "positions"):
            acc = part.loc[part["subset"] == kind, "accuracy"]
            row[f"{kind}_accuracy"] = acc.mean() if len(acc) else np.nan
            row[f"{kind}_sd"] = acc.std(ddof=1) if len(acc) > 1 else np.nan
        row["bs_minus_random"] = row["bs_accuracy"] - row["random_accuracy"]
        row["train_images"] = int(part["train_images"].iloc[0]) if "train_images" in part else np.nan
        rows.append(row)
    order = {f: i for i, f in enumerate(("mean", "noise", "impute"))}
    return pd.DataFrame(rows).sort_values(["model", "fill"], key=lambda s: s.map(order) if s.name == "fill" else s,
                                          kind="stable").reset_index(drop=True)


def swap_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for name, frame in frames.items():
        positions = frame["prediction_swapped"] == frame["label"]
        pixels = frame["prediction_swapped"] == frame["partner_label"]
        row = {"model": name, "images": len(frame),
               "accuracy_own": (frame["prediction_own"] == frame["label"]).mean()}
        for column, follows in (("follows_positions", positions), ("follows_pixels", pixels)):
            row[column] = follows.mean()
            row[f"{column}_low"], row[f"{column}_high"] = _bootstrap_mean(follows.to_numpy())
        row["neither"] = (~positions & ~pixels).mean()
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Figures


def _grouped_bars(ax, groups: list[str], series: dict[str, np.ndarray], colors: list[str], errors=None):
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        err = None if errors is None or name not in errors else errors[name]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=colors[i % len(colors)],
               yerr=err, capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(x, groups)


def smoothed_figure(table: pd.DataFrame, prefix):
    from .figures import CYCLE, STYLE, WIDTH, _percent_axis, plt, save_figure

    kinds = [k for k in ("sis", "bs") if k in set(table["subset"])]
    names = {"sis": "SIS at τ", "bs": "backward-selection subset"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(kinds), figsize=(WIDTH, 2.9), layout="constrained", squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            part = table[table["subset"] == kind]
            series = {"the subset": part["confidence_subset"].to_numpy(),
                      "dilated 3×3 (more of the true image)": part["confidence_dilated"].to_numpy(),
                      "random pixels, dilated size": part["confidence_random"].to_numpy()}
            _grouped_bars(ax, part["model"].tolist(), series, CYCLE)
            for x, (_, row) in enumerate(part.iterrows()):
                ax.text(x, 1.02, f"{100 * row['kept_share']:.1f}% → {100 * row['dilated_share']:.1f}% of pixels",
                        ha="center", fontsize=6, color="#555555")
            ax.set_ylim(0, 1.1)
            _percent_axis(ax)
            ax.set(ylabel="mean f of the selected class", title=names[kind])
        axes[0][-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False, fontsize=6.5, ncol=1)
        fig.suptitle("Smoothed subsets: does showing more of the true image keep the class?", fontsize=9)
        return save_figure(fig, prefix)


def targeted_figure(frames: dict[str, pd.DataFrame], prefix, tau: float):
    from .figures import OKABE_ITO, STYLE, WIDTH, _percent_axis, plt, save_figure

    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(len(frames), 1), figsize=(min(WIDTH, 3.3 * len(frames) + 0.5), 3.0),
                                 layout="constrained", squeeze=False)
        for ax, (model, frame) in zip(axes[0], frames.items()):
            share = frame["smallest_subset"] / frame["pixels"]
            for name, rows, color in (("predicted class", frame["predicted"], OKABE_ITO["blue"]),
                                      ("every other class", ~frame["predicted"], OKABE_ITO["vermillion"])):
                values = np.sort(share[rows].fillna(np.inf).to_numpy())
                if not len(values):
                    continue
                reached = np.isfinite(values)
                ax.step(np.r_[0, values[reached]], np.r_[0, np.arange(1, reached.sum() + 1) / len(values)],
                        where="post", color=color, label=f"{name} ({len(values):,} pairs)")
            fraction = frame["kept_at_fraction"].iloc[0] / frame["pixels"].iloc[0]
            ax.axvline(fraction, color="#555555", ls="--", lw=0.8)
            ax.text(fraction, 0.98, f" {100 * fraction:.0f}% of the pixels", fontsize=6.5, color="#555555", va="top")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            _percent_axis(ax, "x")
            _percent_axis(ax)
            ax.set(xlabel="smallest subset on the path with f ≥ τ", ylabel="share of (image, class) pairs",
                   title=model)
            ax.legend(loc="lower right", fontsize=6.5, frameon=False)
        fig.suptitle(f"Backward selection towards every class: how few pixels reach τ = {tau:g}?", fontsize=9)
        return save_figure(fig, prefix)


def masking_figure(table: pd.DataFrame, prefix, chance: float):
    from .figures import OKABE_ITO, STYLE, WIDTH, _percent_axis, plt, save_figure

    names = {"mean": "mean colour\n(the paper's)", "noise": "noise", "impute": "ROAD imputation"}
    models = table["model"].unique().tolist()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(models), figsize=(min(WIDTH, 3.5 * len(models) + 0.5), 3.0),
                                 layout="constrained", squeeze=False)
        for ax, model in zip(axes[0], models):
            part = table[table["model"] == model]
            series = {"backward selection": part["bs_accuracy"].to_numpy(),
                      "random": part["random_accuracy"].to_numpy(),
                      "mask positions only": part["positions_accuracy"].to_numpy()}
            errors = {"backward selection": part["bs_sd"].fillna(0).to_numpy(),
                      "random": part["random_sd"].fillna(0).to_numpy(),
                      "mask positions only": part["positions_sd"].fillna(0).to_numpy()}
            _grouped_bars(ax, [names.get(f, f) for f in part["fill"]], series,
                          [OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["green"]], errors)
            ax.axhline(chance, color="#555555", ls=":", lw=0.8)
            ax.set_ylim(0, 1)
            _percent_axis(ax)
            ax.set(ylabel="test accuracy, retrained", xlabel="masked pixels filled with", title=model)
        axes[0][-1].legend(loc="upper right", fontsize=6.5, frameon=False)
        fig.suptitle("Does the backward-selection advantage survive a fill that hides the mask?", fontsize=9)
        return save_figure(fig, prefix)


def swap_figure(table: pd.DataFrame, prefix, chance: float):
    from .figures import OKABE_ITO, STYLE, WIDTH, _percent_axis, plt, save_figure

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.42 * len(table) + 1.3), layout="constrained")
        y = np.arange(len(table))[::-1]
        left = np.zeros(len(table))
        parts = (("follows_positions", "label of the image whose positions are kept", OKABE_ITO["blue"]),
                 ("follows_pixels", "label of the image whose pixels fill them", OKABE_ITO["orange"]),
                 ("neither", "another class", "#bbbbbb"))
        for column, label, color in parts:
            ax.barh(y, table[column], left=left, color=color, label=label, height=0.6)
            left += table[column].to_numpy()
        for yi, (_, row) in zip(y, table.iterrows()):
            ax.text(1.01, yi, f"own subset: {100 * row['accuracy_own']:.0f}% correct", va="center", fontsize=6.5)
        ax.set_yticks(y, table["model"])
        ax.set_xlim(0, 1.3)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
        _percent_axis(ax, "x")
        ax.set_xlabel("share of swapped test images predicted as ...")
        ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.25), ncol=3, frameon=False, fontsize=6.5)
        fig.suptitle(f"Shape of one image, pixels of another (chance {100 * chance:.0f}%)", fontsize=9)
        return save_figure(fig, prefix)


# ----------------------------------------------------------------------------------------------------------
# Command line


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("controls", help="controls of what backward-selection subsets mean")
    sub = p.add_subparsers(dest="control", required=True)

    def add(name, handler, help, data=True):
        s = sub.add_parser(name, help=help)
        if data:
            s.add_argument("--data", required=True, help="converted dataset (.npz)")
            s.add_argument("--size", type=int, default=None, help="class-balanced subset size of the test split")
            add_normalization_arguments(s)
            add_device_argument(s)
        s.set_defaults(handler=handler)
        return s

    s = add("smoothed", run_smoothed, "confidence on SIS, on SIS dilated by 3x3, and on random pixels of that size")
    s.add_argument("--model", required=True, help="the selecting model (.pt)")
    s.add_argument("--sis", required=True, help="its BackSelect result on the test split (.npz)")
    s.add_argument("--tau", type=float, required=True, help="SIS threshold")
    s.add_argument("--fraction", type=float, required=True, help="kept fraction of the BS subsets")
    s.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default: 0)")
    s.add_argument("--out", required=True, help="per-image table (.csv)")
    s = add("targeted", run_targeted, "gradient backward selection of a sample of test images towards every class")
    s.add_argument("--model", required=True, help="the selecting model (.pt)")
    s.add_argument("--sample", type=int, required=True, help="test images drawn")
    s.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    s.add_argument("--pixels-per-step", type=int, default=10, help="pixels masked per step (default: 10)")
    s.add_argument("--batch-size", type=int, default=None, help="images per forward+backward (default per device)")
    s.add_argument("--tau", type=float, required=True, help="the threshold a subset must reach")
    s.add_argument("--fraction", type=float, required=True, help="the subset size compared (e.g. 0.05)")
    s.add_argument("--out", required=True, help="per (image, class) table (.csv)")
    s = add("swap", run_swap, "models on kept positions of one image filled with another image's pixels")
    s.add_argument("--entry", nargs=3, action="append", required=True, metavar=("NAME", "MODEL", "KEEP_MASKS"),
                   help="a row name, a model (.pt) and the keep-masks (.npz) whose test positions it is shown")
    s.add_argument("--seed", type=int, default=0, help="seed of the pairing (default: 0)")
    s.add_argument("--out", required=True, help="per-image table (.csv), all entries")
    s = add("report", run_report, "one control's table (CSV + Markdown) and figure (PNG + PDF)", data=False)
    s.add_argument("control", choices=["smoothed", "targeted", "masking", "swap"], help="which control")
    s.add_argument("--entry", nargs=2, action="append", default=[], metavar=("NAME", "CSV"),
                   help="a model and its control table (smoothed, targeted, swap)")
    s.add_argument("--summaries", nargs="*", default=[],
                   help="masking: the evaluation summaries (.json) of the models retrained under each fill")
    s.add_argument("--tau", type=float, default=None, help="targeted: the threshold")
    s.add_argument("--chance", type=float, default=0.1, help="chance accuracy (default: 0.1)")
    s.add_argument("--table", required=True, help="output prefix: writes TABLE.csv and TABLE.md")
    s.add_argument("--figure", required=True, help="output prefix: writes FIGURE.png and FIGURE.pdf")


def _model_and_split(args):
    from .models import load_model

    return (load_model(args.model, resolve_device(args.device)), normalizer_from_args(args),
            load_split(args.data, "test", args.size))


def run_smoothed(args) -> int:
    from .sis import BackSelectResult

    model, normalizer, split = _model_and_split(args)
    table = smoothed(model, normalizer, split, BackSelectResult.load(args.sis), args.tau, args.fraction, args.seed)
    save_dataframe(args.out, table)
    return 0


def run_targeted(args) -> int:
    model, normalizer, split = _model_and_split(args)
    save_dataframe(args.out, targeted(model, normalizer, split, args.sample, args.seed, args.pixels_per_step,
                                      args.tau, args.fraction, args.batch_size))
    return 0


def run_swap(args) -> int:
    from .models import load_model
    from .subsets import load_packed_keep_masks

    split = load_split(args.data, "test", args.size)
    normalizer, device = normalizer_from_args(args), resolve_device(args.device)
    partners = swap_partners(split.labels.numpy(), args.seed)
    frames = []
    for name, model_path, masks in args.entry:
        keep = load_packed_keep_masks(masks, "test", split.index)
        frame = swap(load_model(model_path, device), normalizer, split, keep, partners)
        frames.append(frame.assign(model=name))
    save_dataframe(args.out, pd.concat(frames, ignore_index=True))
    return 0


def run_report(args) -> int:
    from .analysis import read_summaries, readable_table

    frames = {name: pd.read_csv(path) for name, path in args.entry}
    if args.control == "smoothed":
        table = smoothed_table(frames)
        smoothed_figure(table, args.figure)
    elif args.control == "targeted":
        if args.tau is None:
            raise ValueError("controls report targeted needs --tau")
        table = targeted_table(frames, args.tau)
        targeted_figure(frames, args.figure, args.tau)
    elif args.control == "masking":
        table = masking_table(read_summaries(args.summaries))
        masking_figure(table, args.figure, args.chance)
    else:
        rows = {f"{model}: {name}": part for model, frame in frames.items()
                for name, part in frame.groupby("model", sort=False)}
        table = swap_table(rows)
        swap_figure(table, args.figure, args.chance)
    save_dataframe(f"{args.table}.csv", table)
    save_dataframe(f"{args.table}.md", readable_table(table))
    return 0
