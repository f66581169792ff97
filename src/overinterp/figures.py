"""Figures of the paper's results, drawn from the result files the workflow writes.

Every figure is written as PNG (screen, report) and PDF (print) from one call, with one colour-blind-safe
palette (Okabe-Ito) and fixed colours per condition, so a condition looks the same in every figure.
Tables for the HTML report are rendered here too (the report shows HTML inline, CSV only as a download).
"""
from __future__ import annotations

import html
import logging

import matplotlib

matplotlib.use("Agg")  # files only; never a display
logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting is chatty at INFO

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .analysis import CONDITIONS, readable_table  # noqa: E402
from .sis import BackSelectResult, read_step_arrays, sis_mask  # noqa: E402
from .data import add_normalization_arguments  # noqa: E402
from .utils import add_device_argument, atomic_path  # noqa: E402

# Okabe & Ito (2008): distinguishable with every common colour-vision deficiency, and in greyscale by
# lightness together with the hatching of the original-model conditions.
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7",
}
CYCLE = [OKABE_ITO[c] for c in ("blue", "orange", "green", "vermillion", "purple", "sky", "black")]
CONDITION_STYLE = {
    CONDITIONS[("trained", "full")]: {"color": "#555555"},
    CONDITIONS[("trained", "bs")]: {"color": OKABE_ITO["blue"]},
    CONDITIONS[("trained", "random")]: {"color": OKABE_ITO["orange"]},
    CONDITIONS[("trained", "positions")]: {"color": OKABE_ITO["green"]},
    CONDITIONS[("original", "bs")]: {"color": OKABE_ITO["sky"], "hatch": "///"},
    CONDITIONS[("original", "random")]: {"color": OKABE_ITO["vermillion"], "hatch": "///"},
}
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#dddddd", "grid.linewidth": 0.6, "axes.axisbelow": True,
    "axes.prop_cycle": matplotlib.cycler(color=CYCLE), "hatch.linewidth": 0.8, "hatch.color": "white",
    "savefig.bbox": "tight", "savefig.pad_inches": 0.03, "pdf.fonttype": 42,
}
PNG_DPI = 200
WIDTH = 7.0  # inches: a two-column page; readable printed and on screen at PNG_DPI


def save_figure(fig: Figure, prefix) -> Figure:
    """Write ``prefix``.png and ``prefix``.pdf atomically; returns the figure, released from pyplot."""
    for ext in ("png", "pdf"):
        with atomic_path(f"{prefix}.{ext}") as tmp:
            # No creation date: the same results give byte-identical PDFs.
            fig.savefig(tmp, format=ext, dpi=PNG_DPI, metadata={"CreationDate": None} if ext == "pdf" else None)
    plt.close(fig)
    return fig


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="#555555",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _percent_axis(ax, axis: str = "y") -> None:
    # decimals=None: as many as the axis range needs (a range of 0-0.1% must not read 0% at every tick)
    formatter = matplotlib.ticker.PercentFormatter(1.0, decimals=None)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)


# ----------------------------------------------------------------------------------------------------------
# Training curves


def training_curves(entries: list[tuple[str, pd.DataFrame]], prefix, title: str | None = None) -> Figure:
    """Loss and accuracy per epoch; ``entries`` are (group, metrics) pairs. A group (an architecture or a
    subset) has one colour; its replicates (seeds), in the order given, one marker each. Test accuracy solid,
    train accuracy dashed."""
    groups = list(dict.fromkeys(group for group, _ in entries))
    markers = "osD^v<>"
    replicate: dict[str, int] = {}
    with plt.rc_context(STYLE):
        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(WIDTH, 2.6), layout="constrained")
        for group, metrics in entries:
            color = CYCLE[groups.index(group) % len(CYCLE)]
            k = replicate[group] = replicate.get(group, -1) + 1
            marker = markers[k % len(markers)]
            style = {"color": color, "marker": marker, "markersize": 3,
                     "markevery": max(1, len(metrics) // 8), "markerfacecolor": "white"}
            loss_ax.plot(metrics["epoch"], metrics["train_loss"], lw=1.2, alpha=0.9, **style)
            acc_ax.plot(metrics["epoch"], metrics["train_accuracy"], lw=1.0, ls="--", alpha=0.8, **style)
            acc_ax.plot(metrics["epoch"], metrics["test_accuracy"], lw=1.4, **style)
        loss_ax.set(xlabel="epoch", ylabel="training loss", title="(a) training loss")
        acc_ax.set(xlabel="epoch", ylabel="accuracy", title="(b) accuracy", ylim=(0, 1))
        _percent_axis(acc_ax)
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        handles = [plt.Line2D([], [], color=CYCLE[i % len(CYCLE)], lw=1.4, label=g) for i, g in enumerate(groups)]
        handles += [plt.Line2D([], [], color="#555555", lw=0, marker=markers[k], markersize=3,
                               markerfacecolor="white", label=f"replicate {k + 1}")
                    for k in range(min(max(replicate.values(), default=0) + 1, len(markers)))]
        handles += [plt.Line2D([], [], color="#555555", lw=1.4, label="test"),
                    plt.Line2D([], [], color="#555555", lw=1.0, ls="--", label="train")]
        fig.legend(handles=handles, loc="outside right center", frameon=False)
        if title:
            fig.suptitle(title, fontsize=9)
        return save_figure(fig, prefix)


# ----------------------------------------------------------------------------------------------------------
# Table 1 and the kept-fraction sweep


def _conditions_in(table: pd.DataFrame) -> list[str]:
    present = set(table["condition"])
    return [c for c in CONDITIONS.values() if c in present]


def _bars(ax, table: pd.DataFrame, value: str, error: str | None, conditions, architectures,
          label_values: bool = True, light: bool = False, shift: float = 0.0, scale: float = 1.0) -> None:
    """One bar per condition in each architecture's group; ``light`` draws tinted bars with a coloured
    edge, ``shift``/``scale`` place narrower bars side by side within a condition's slot."""
    width = 0.84 / len(conditions)
    for j, condition in enumerate(conditions):
        rows = table[table["condition"] == condition].set_index("architecture").reindex(architectures)
        x = np.arange(len(architectures)) + (j - (len(conditions) - 1) / 2 + shift) * width
        heights = rows[value].to_numpy(dtype=float)
        style = CONDITION_STYLE[condition]
        if light:
            ax.bar(x, np.nan_to_num(heights), width * scale, color=style["color"], alpha=0.35, linewidth=0)
            ax.bar(x, np.nan_to_num(heights), width * scale, fill=False, edgecolor=style["color"], linewidth=1)
        else:
            ax.bar(x, np.nan_to_num(heights), width * scale, color=style["color"], hatch=style.get("hatch"),
                   edgecolor="white", linewidth=0.4, label=condition)
        errors = rows[error].to_numpy(dtype=float) if error else np.full_like(heights, np.nan)
        has_error = np.isfinite(errors) & np.isfinite(heights)
        if has_error.any():
            ax.errorbar(x[has_error], heights[has_error], errors[has_error], fmt="none", ecolor="#222222",
                        elinewidth=0.9, capsize=2)
        if label_values:
            for xi, h, e in zip(x, heights, np.nan_to_num(errors)):
                if np.isfinite(h):
                    ax.text(xi, h + e + 0.015, f"{100 * h:.1f}", ha="center", va="bottom", fontsize=5.5,
                            rotation=90 if len(conditions) > 4 else 0)


def table1_figure(table: pd.DataFrame, prefix, fraction: float, chance: float = 0.1) -> Figure:
    """Table 1 as grouped bars: (a) test accuracy (mean ± std over replicates) of every condition per
    architecture; (b) how often each retrained model agrees with the model whose backward selection made
    its subsets, on all test images and on the images that model misclassifies."""
    conditions = _conditions_in(table)
    architectures = list(dict.fromkeys(table["architecture"]))
    agreeing = table.dropna(subset=["agreement_with_selecting_model"])
    agree_conditions = _conditions_in(agreeing)
    n = max(len(architectures), 1)
    with plt.rc_context(STYLE):
        widths = [max(2.5, 1.3 * n), max(1.8, 0.9 * n)] if agree_conditions else [1]
        fig, axes = plt.subplots(1, len(widths), figsize=(WIDTH, 3.2), width_ratios=widths, layout="constrained",
                                 squeeze=False)
        acc_ax = axes[0, 0]
        _bars(acc_ax, table, "accuracy_mean", "accuracy_std", conditions, architectures)
        acc_ax.axhline(chance, color="#555555", lw=0.8, ls=":", label="chance")
        acc_ax.set(ylim=(0, 1.12), ylabel="test accuracy", xticks=range(n), xticklabels=architectures,
                   title=f"(a) test accuracy, {100 * fraction:g}% of the pixels kept")
        acc_ax.set_yticks(np.linspace(0, 1, 6))
        _percent_axis(acc_ax)
        handles, labels = acc_ax.get_legend_handles_labels()
        handles.append(handles.pop(labels.index("chance")))  # conditions first
        labels = [h.get_label() for h in handles]
        if agree_conditions:
            ax = axes[0, 1]
            _bars(ax, agreeing, "agreement_with_selecting_model", None, agree_conditions, architectures,
                  label_values=False, shift=-0.22, scale=0.46)
            _bars(ax, agreeing, "agreement_on_its_errors", None, agree_conditions, architectures,
                  label_values=False, light=True, shift=0.22, scale=0.46)
            ax.set(ylim=(0, 1.05), ylabel="same prediction", xticks=range(n), xticklabels=architectures,
                   title="(b) agreement with the selecting model")
            _percent_axis(ax)
            handles += [Patch(facecolor="#777777", label="(b) on all test images"),
                        Patch(facecolor="#cccccc", edgecolor="#777777", label="(b) on its misclassified images")]
            labels += [h.get_label() for h in handles[-2:]]
        for ax in axes[0]:
            ax.grid(axis="x", visible=False)
        fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False)
        return save_figure(fig, prefix)


def fraction_sweep_figure(sweep: pd.DataFrame, table: pd.DataFrame | None, prefix, chance: float = 0.1) -> Figure:
    """Test accuracy against the fraction of pixels kept, one panel per architecture: backward selection
    against random subsets, retrained (solid) and the original model (dashed); full-image accuracy dotted."""
    architectures = list(dict.fromkeys(sweep["architecture"]))
    conditions = _conditions_in(sweep)
    full = {} if table is None else table[table["condition"] == CONDITIONS[("trained", "full")]].set_index(
        "architecture")["accuracy_mean"].to_dict()
    fractions = np.sort(sweep["fraction"].unique())
    n = max(len(architectures), 1)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, n, figsize=(min(WIDTH, 2.9 * n + 0.6), 2.9), sharey=True, layout="constrained",
                                 squeeze=False)
        for ax, arch in zip(axes[0], architectures):
            rows = sweep[sweep["architecture"] == arch]
            for condition in conditions:
                data = rows[rows["condition"] == condition].sort_values("fraction")
                if data.empty:
                    continue
                original = condition.endswith("(original model)")
                std = data["accuracy_std"]
                ax.errorbar(data["fraction"], data["accuracy_mean"], yerr=None if std.isna().all() else std.fillna(0),
                            color=CONDITION_STYLE[condition]["color"], ls="--" if original else "-",
                            marker="s" if original else "o", ms=3.5, lw=1.3, capsize=2, label=condition)
            if arch in full:
                ax.axhline(full[arch], color=CONDITION_STYLE[CONDITIONS[("trained", "full")]]["color"], lw=1, ls=":",
                           label=CONDITIONS[("trained", "full")])
            ax.axhline(chance, color="#999999", lw=0.8, ls="-.", label="chance")
            ax.set_xscale("log")
            ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set(xlabel="pixels kept", title=arch, ylim=(0, 1.02))
            _percent_axis(ax)
        axes[0, 0].set_ylabel("test accuracy")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        first = [i for i, label in enumerate(labels) if label in conditions]  # conditions before the lines
        order = first + [i for i in range(len(labels)) if i not in first]
        fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center",
                   ncols=2 if n == 1 else 3, frameon=False)
        return save_figure(fig, prefix)


# ----------------------------------------------------------------------------------------------------------
# Backward selection: confidence along the removals, SIS sizes, SIS examples


def confidence_curves(entries: list[tuple[str, dict]], prefix, tau: float,
                      band: tuple[float, float] = (0.1, 0.9), zoom: float = 0.9) -> Figure:
    """Per model (columns), f (the probability of the full-image prediction) against the fraction of
    pixels removed by backward selection: mean, median and the ``band`` quantiles over the images; the
    lower row zooms into the removals after ``zoom``, where f falls. An entry's arrays are
    :func:`~overinterp.sis.read_step_arrays`' (full_confidence, step_values)."""
    n = max(len(entries), 1)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, n, figsize=(min(WIDTH, 2.9 * n + 0.6), 4.6), sharey=True, layout="constrained",
                                 squeeze=False)
        for i, (name, result) in enumerate(entries):
            color = CYCLE[i % len(CYCLE)]
            # f before any removal, then after each step.
            values = np.concatenate([result["full_confidence"][:, None], result["step_values"]], axis=1).astype(float)
            pixels = result["height"] * result["width"]
            removed = np.minimum(np.arange(values.shape[1]) * result["pixels_per_step"], pixels) / pixels
            low, median, high = np.quantile(values, [band[0], 0.5, band[1]], axis=0)
            for ax, xlim in ((axes[0, i], (0, 1)), (axes[1, i], (zoom, 1))):
                ax.fill_between(removed, low, high, color=color, alpha=0.25, lw=0,
                                label=f"{100 * band[0]:g}th–{100 * band[1]:g}th percentile")
                ax.plot(removed, values.mean(0), color=color, lw=1.6, label="mean")
                ax.plot(removed, median, color=color, lw=1.0, ls="--", label="median")
                ax.axhline(tau, color="#555555", lw=0.8, ls=":", label=f"τ = {tau:g}")
                ax.set(xlim=xlim, ylim=(0, 1.02))
                _percent_axis(ax, "x")
            axes[0, i].set_title(f"{name} ({len(values)} test images)")
            axes[1, i].set(xlabel="pixels removed", title=f"last {100 * (1 - zoom):g}% of the removals")
            axes[0, i].legend(loc="lower left", frameon=False)
        for ax in axes[:, 0]:
            ax.set_ylabel("f (probability of the\nfull-image prediction)")
        return save_figure(fig, prefix)


def sis_size_figure(frames: dict[str, pd.DataFrame], summary: pd.DataFrame, prefix, tau: float) -> Figure:
    """Per model, histograms of SIS size (fraction of the image) of correctly and incorrectly classified
    test images, with medians and the two-sided Mann-Whitney U test from ``summary``."""
    n = max(len(frames), 1)
    stats_by_model = summary.set_index("model") if len(summary) else pd.DataFrame()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, n, figsize=(min(WIDTH, 3.2 * n + 0.4), 3.2), layout="constrained",
                                 squeeze=False)
        for ax, (model, frame) in zip(axes[0], frames.items()):
            if frame.empty:
                _empty_note(ax, f"no test image reaches\nfull-image confidence τ = {tau:g}")
                ax.set_title(model)
                continue
            sizes = frame["sis_fraction"].to_numpy(dtype=float)
            top = max(float(sizes.max()), 1e-3)
            bins = np.linspace(0, top * 1.02, 21)
            width = bins[1] - bins[0]
            groups = (("correct", frame["correct"].to_numpy(bool), OKABE_ITO["blue"], -1),
                      ("incorrect", ~frame["correct"].to_numpy(bool), OKABE_ITO["vermillion"], 1))
            for label, rows, color, side in groups:
                if rows.any():
                    # Each group sums to 1 (comparable shapes); the two groups' bars stand side by side in a bin.
                    share = np.histogram(sizes[rows], bins=bins)[0] / rows.sum()
                    median = np.median(sizes[rows])
                    ax.bar(bins[:-1] + width * (0.5 + side / 4), share, width / 2, color=color, alpha=0.8,
                           label=f"{label}: n = {rows.sum()}, median {100 * median:.1f}%")
                    ax.axvline(median, color=color, lw=1.1, ls="--")
            if not sizes.any():
                ax.text(0.5, 0.55, "every SIS is empty: the fully\nmasked image already reaches τ", ha="center",
                        va="center", transform=ax.transAxes, fontsize=6.5, color="#555555")
            ax.set_xlim(0, bins[-1])
            ax.set(xlabel="SIS size (fraction of the image)", ylabel="fraction of images", title=model)
            _percent_axis(ax, "x")
            row = stats_by_model.loc[model] if model in stats_by_model.index else None
            if row is not None and np.isfinite(row["mannwhitney_u"]):
                text = f"Mann-Whitney U = {row['mannwhitney_u']:,.0f}\np = {row['p_value']:.2g} (two-sided)"
            else:
                text = "Mann-Whitney test needs\ncorrect and incorrect images"
            ax.text(0.98, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=6.5,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "#cccccc", "lw": 0.5})
            ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # room for the test statistic
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, fontsize=6.5,
                      title="dashed lines: medians", title_fontsize=6)
        fig.suptitle(f"SIS sizes at τ = {tau:g} (test images with full-image confidence ≥ τ)", fontsize=9)
        return save_figure(fig, prefix)


def misclassified_figure(images: pd.DataFrame, table: pd.DataFrame, prefix) -> Figure:
    """Per model, SIS size distributions of correct and misclassified images at each threshold (boxes:
    quartiles, whiskers 5th-95th percentile, points beyond), with the counts and Cliff's delta."""
    models = list(dict.fromkeys(table["model"]))
    colors = {True: OKABE_ITO["blue"], False: OKABE_ITO["vermillion"]}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, max(len(models), 1), figsize=(min(WIDTH, 3.4 * len(models) + 0.4), 3.3),
                                 layout="constrained", squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = table[table["model"] == model].sort_values("tau", ascending=False)
            for x, (_, row) in enumerate(rows.iterrows()):
                part = images[(images["model"] == model) & np.isclose(images["tau"], row["tau"])]
                for side, correct in ((-1, True), (1, False)):
                    values = part.loc[part["correct"] == correct, "sis_fraction"].to_numpy(float)
                    if len(values):
                        ax.boxplot(values, positions=[x + side * 0.18], widths=0.3, whis=(5, 95),
                                   patch_artist=True,
                                   boxprops={"facecolor": colors[correct], "alpha": 0.75, "lw": 0.6},
                                   medianprops={"color": "black", "lw": 1}, flierprops={"ms": 2},
                                   whiskerprops={"lw": 0.6}, capprops={"lw": 0.6})
                    ax.text(x + side * 0.18, -0.06, f"{len(values):,}", ha="center", va="top", fontsize=6,
                            color=colors[correct], transform=ax.get_xaxis_transform())
                delta = row["cliffs_delta"]
                if np.isfinite(delta):
                    interval = (f"\n[{row['cliffs_delta_low']:.2f}, {row['cliffs_delta_high']:.2f}]"
                                if np.isfinite(row["cliffs_delta_low"]) else "")
                    ax.text(x, 1.01, f"δ = {delta:.2f}{interval}", ha="center", va="bottom", fontsize=6,
                            transform=ax.get_xaxis_transform())
            ax.set_xticks(range(len(rows)), [f"τ = {t:g}" for t in rows["tau"]])
            ax.tick_params(axis="x", pad=12)
            ax.set_xlim(-0.6, len(rows) - 0.4)
            ax.set(ylabel="SIS size (fraction of the image)")
            ax.set_title(model, pad=22)
            _percent_axis(ax)
        handles = [Patch(color=colors[c], alpha=0.75, label=name)
                   for c, name in ((True, "correct"), (False, "misclassified"))]
        fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False, fontsize=7,
                   title="counts under the boxes; δ: Cliff's delta, misclassified vs correct, 95% bootstrap CI",
                   title_fontsize=6.5)
        fig.suptitle("SIS sizes of misclassified and correct test images by threshold", fontsize=9)
        return save_figure(fig, prefix)


def mitigation_figure(frames: dict[str, pd.DataFrame], table: pd.DataFrame, prefix, tau: float) -> Figure:
    """Single models against input-dropout models and ensembles: (a) SIS size distributions at tau,
    (b) each model's accuracy and mean confidence on its own backward-selection subsets."""
    models = list(frames)
    kinds = table.set_index("model")["kind"].reindex(models).fillna("single").tolist()
    colors = {"single": OKABE_ITO["blue"], "input_dropout": OKABE_ITO["orange"], "ensemble": OKABE_ITO["green"],
              "adversarial": OKABE_ITO["purple"]}
    with plt.rc_context(STYLE):
        fig, (ax_sizes, ax_own) = plt.subplots(1, 2, figsize=(WIDTH, 0.45 * len(models) + 1.6), layout="constrained")
        data = [frames[m]["sis_fraction"].dropna().to_numpy(float) for m in models]
        positions = np.arange(len(models))[::-1]
        if any(len(d) for d in data):
            boxes = ax_sizes.boxplot([d if len(d) else [np.nan] for d in data], positions=positions, vert=False,
                                     widths=0.6, patch_artist=True, showfliers=False,
                                     medianprops={"color": "black"})
            for patch, kind in zip(boxes["boxes"], kinds):
                patch.set_facecolor(colors.get(kind, "#999999"))
                patch.set_alpha(0.7)
            ax_sizes.set_yticks(positions, [f"{m} (n = {len(d)})" for m, d in zip(models, data)])
            ax_sizes.set_xlabel(f"SIS size at τ = {tau:g} (fraction of the image)")
            ax_sizes.set_xlim(0, max(1e-3, 1.05 * max((float(d.max()) for d in data if len(d)), default=0)))
            _percent_axis(ax_sizes, "x")
            if not any(d.any() for d in data):
                ax_sizes.text(0.5, 0.5, "every SIS is empty: the fully\nmasked image already reaches τ",
                              ha="center", va="center", transform=ax_sizes.transAxes, fontsize=6.5, color="#555555")
        else:
            _empty_note(ax_sizes, f"no test image reaches\nfull-image confidence τ = {tau:g}")
        ax_sizes.set_title("(a) SIS size: larger = less overinterpretation")
        own = table.set_index("model").reindex(models)
        height = 0.38
        ax_own.barh(positions + height / 2, own["own_bs_accuracy"], height, color=OKABE_ITO["sky"],
                    label="accuracy")
        ax_own.barh(positions - height / 2, own["own_bs_confidence"], height, color=OKABE_ITO["vermillion"],
                    label="mean confidence")
        ax_own.set_yticks(positions, models)
        ax_own.set_xlim(0, 1)
        _percent_axis(ax_own, "x")
        fraction = own["own_bs_fraction"].dropna()
        kept = f"{100 * fraction.iloc[0]:g}%" if len(fraction) else "the"
        ax_own.set_title(f"(b) on its own backward-selection {kept} subsets")
        ax_own.legend(loc="lower right", frameon=False)
        handles = [Patch(color=c, alpha=0.7, label=k.replace("_", " ")) for k, c in colors.items() if k in kinds]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        return save_figure(fig, prefix)


def pick_examples(result: BackSelectResult, labels: np.ndarray, tau: float, per_class: int,
                  num_classes: int) -> list[list[int]]:
    """Positions in ``result`` of the first ``per_class`` images of each true class (dataset order) whose
    full-image confidence reaches ``tau``, so that every shown image has an SIS."""
    confident = result.full_confidence >= tau
    order = np.argsort(result.index, kind="stable")
    return [[int(i) for i in order if labels[i] == c and confident[i]][:per_class] for c in range(num_classes)]


def sis_examples(images: np.ndarray, labels: np.ndarray, result: BackSelectResult,
                 masks: list[np.ndarray | None], sis_confidence: np.ndarray, picks: list[list[int]],
                 classes: list[str], normalizer, prefix, tau: float, title: str,
                 shown: list[int] | None = None) -> Figure:
    """The paper's Figure 1 for one model: per class (rows) and example, the original image with the
    model's prediction and confidence, its SIS at ``tau`` with every other pixel in the mean colour, and
    the SIS mask. ``images`` are uint8 CHW images by position in ``result`` (an array, or a dict of the
    picked ones); ``sis_confidence`` is the
    model's f on each SIS-only image. ``shown`` lists the classes of the rows (default: all), and
    ``picks`` holds one list per shown class."""
    shown = list(range(len(classes))) if shown is None else shown
    if not any(picks):  # e.g. an undertrained model: say so on a small sheet instead of ten empty rows
        with plt.rc_context(STYLE):
            fig, ax = plt.subplots(figsize=(WIDTH, 1.2), layout="constrained")
            _empty_note(ax, f"No test image reaches full-image confidence τ = {tau:g}: the highest of the "
                            f"{len(result)} images is {result.full_confidence.max(initial=0):.3f}.")
            fig.suptitle(title, fontsize=9)
            return save_figure(fig, prefix)
    per_class = max(len(p) for p in picks)
    height, width = result.height, result.width
    # Three panels per example, a narrow empty column between examples.
    ratios = ([1, 1, 1, 0.3] * per_class)[:-1]
    with plt.rc_context({**STYLE, "axes.grid": False}):
        size = (0.95 * sum(ratios) + 0.7, 1.0 * len(shown) + 0.4)
        fig, grid = plt.subplots(len(shown), len(ratios), figsize=size, width_ratios=ratios, squeeze=False,
                                 layout="constrained")
        for ax in grid.flat:
            ax.set_axis_off()
        axes = np.delete(grid, np.arange(3, len(ratios), 4), axis=1)  # without the spacers
        for c, row in zip(shown, axes):
            row[0].text(-0.12, 0.5, classes[c], transform=row[0].transAxes, ha="right", va="center", fontsize=8)
            picked = picks[shown.index(c)]
            if not picked:
                best = result.full_confidence[labels == c].max(initial=0)
                note = row[0].text(0, 0.5, f"no {classes[c]} test image reaches full-image confidence τ = {tau:g} "
                                   f"(highest: {best:.3f})", transform=row[0].transAxes, ha="left", va="center",
                                   fontsize=6.5, color="#555555")
                note.set_in_layout(False)  # may run across the empty panels
                continue
            for k, i in enumerate(picked):
                image = torch.from_numpy(images[i][None])
                keep = torch.from_numpy(masks[i].reshape(1, 1, height, width))
                ax_img, ax_sis, ax_mask = row[3 * k: 3 * k + 3]
                ax_img.imshow(normalizer.denormalize(normalizer(image))[0].permute(1, 2, 0).numpy(),
                              interpolation="nearest")
                ax_sis.imshow(normalizer.denormalize(normalizer(image, keep))[0].permute(1, 2, 0).numpy(),
                              interpolation="nearest")
                ax_mask.imshow(masks[i].reshape(height, width), cmap="gray_r", vmin=0, vmax=1,
                               interpolation="nearest")
                ax_mask.add_patch(plt.Rectangle((-0.5, -0.5), width, height, fill=False, ec="#999999", lw=0.6))
                predicted = int(result.target[i])
                wrong = predicted != int(labels[i])
                ax_img.set_title(f"{classes[predicted]} {result.full_confidence[i]:.3f}" + (" ✗" if wrong else ""),
                                 fontsize=6.5, color=OKABE_ITO["vermillion"] if wrong else "black")
                ax_sis.set_title(f"f = {sis_confidence[i]:.3f}", fontsize=6.5)
                ax_mask.set_title(f"{int(masks[i].sum())} px ({100 * masks[i].mean():.1f}%)", fontsize=6.5)
                if not masks[i].any():
                    ax_sis.text(0.5, 0.5, "empty SIS:\nthe masked image\nalready reaches τ", ha="center",
                                va="center", transform=ax_sis.transAxes, fontsize=5.5, color="white",
                                bbox={"fc": "#555555", "ec": "none", "alpha": 0.8, "pad": 1.5})
        fig.suptitle(f"{title}\nper example: the image (prediction and its probability f; ✗ = wrong), "
                     "its SIS (f on the SIS alone), the SIS mask", fontsize=8)
        fig.get_layout_engine().set(h_pad=0.02, hspace=0.12)
        return save_figure(fig, prefix)


# ----------------------------------------------------------------------------------------------------------
# Audit figures (overinterp audit)


def audit_sis_sizes(predictions: pd.DataFrame, taus, prefix) -> Figure:
    """Per threshold, the distribution (ECDF) of SIS sizes of correctly classified vs misclassified images."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(taus), figsize=(WIDTH, 2.4), sharey=True, squeeze=False, layout="constrained")
        for ax, tau in zip(axes[0], taus):
            size = predictions[f"sis_percent_tau{tau:g}"]
            drawn = False
            for correct, name, colour in ((True, "correct", OKABE_ITO["blue"]),
                                          (False, "misclassified", OKABE_ITO["vermillion"])):
                values = np.sort(size[size.notna() & (predictions["correct"] == correct)].to_numpy())
                if len(values):
                    ax.step(np.concatenate([[0], values]), np.arange(len(values) + 1) / len(values), where="post",
                            color=colour, label=f"{name} (n = {len(values)})")
                    drawn = True
            ax.set_title(f"τ = {tau:g}", fontsize=9)
            ax.set_xlabel("SIS size (% of pixels)")
            ax.set_xlim(left=0)
            if drawn:
                ax.legend(fontsize=7, loc="best")
            else:
                _empty_note(ax, f"no image reaches\nconfidence {tau:g}")
        axes[0][0].set_ylabel("share of images with SIS ≤ x")
        _percent_axis(axes[0][0])
        fig.suptitle("SIS sizes of the images whose full-image confidence reaches τ", fontsize=9)
        return save_figure(fig, prefix)


def audit_subsets(sweep: pd.DataFrame, prefix, chance: float, tau: float) -> Figure:
    """Accuracy and confidence on the model's own backward-selection subsets vs random subsets of each size."""
    style = {"backselect": (OKABE_ITO["blue"], "o", "its backward-selection subset"),
             "random": (OKABE_ITO["orange"], "s", "random pixels")}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.9), layout="constrained")
        for ax, column, label in ((axes[0], "accuracy", "accuracy"),
                                  (axes[1], "confidence", "confidence (predicted class)")):
            for subset, (colour, marker, name) in style.items():
                rows = sweep[sweep["subset"] == subset]
                ax.plot(100 * rows["fraction"], rows[column], marker=marker, color=colour, label=name)
            if column == "accuracy":
                ax.axhline(chance, color="#777777", ls=":", lw=1, label="chance")
            else:
                ax.axhline(tau, color="#777777", ls="--", lw=1, label=f"τ = {tau:g}")
            ax.set_xscale("log")
            ax.set_xticks(100 * sweep["fraction"].unique())
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("pixels kept")
            ax.set_ylabel(label)
            ax.set_ylim(0, 1.02)
            _percent_axis(ax)
        handles = axes[0].get_legend_handles_labels()[0] + axes[1].get_legend_handles_labels()[0][-1:]
        fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
        fig.suptitle("The model on a few of its pixels, every other pixel in the mean colour", fontsize=9)
        return save_figure(fig, prefix)


def audit_examples(audit, masks, sis_confidence: np.ndarray, settings, prefix) -> Figure:
    """Figure-1-style sheet of an audit: the classes with the most confident images, a few examples each."""
    from .data import Normalizer

    result, images = audit.result, audit.images
    confident = result.full_confidence >= settings.tau
    counts = np.bincount(images.labels[confident], minlength=len(images.classes))
    shown = [int(c) for c in np.argsort(-counts, kind="stable")[:5] if counts[c]] or [0]
    picks = [[int(i) for i in np.flatnonzero((images.labels == c) & confident)[:settings.examples]] for c in shown]
    colour = audit.summary["mean_colour"]
    return sis_examples(images.images.numpy(), images.labels, result, masks, sis_confidence, picks,
                        list(images.classes), Normalizer(colour, (1.0, 1.0, 1.0)), prefix, settings.tau,
                        f"{audit.summary['model']}: SIS at τ = {settings.tau:g}", shown=shown)


# ----------------------------------------------------------------------------------------------------------
# Tables for the report


TABLE_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 13px; margin: 0.5em; }
table { border-collapse: collapse; max-width: 100%; }
th, td { padding: 3px 9px; text-align: right; border-bottom: 1px solid #ddd; }
th { border-bottom: 2px solid #333; background: #f6f6f6; white-space: normal; max-width: 11em;
     vertical-align: bottom; }
td { white-space: nowrap; }
td:first-child, th:first-child, td.text { text-align: left; }
caption { text-align: left; font-weight: bold; padding-bottom: 6px; }
"""


def table_html(frame: pd.DataFrame, title: str) -> str:
    """A standalone HTML page of ``frame`` in its readable form (headers in words, shares in percent), with
    headers that wrap so that the table fits a narrow window."""
    body = readable_table(frame).to_html(index=False, na_rep="", border=0, escape=True)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{TABLE_CSS}</style></head><body><h3>{html.escape(title)}</h3>\n{body}\n</body></html>\n")


# ----------------------------------------------------------------------------------------------------------
# Command line


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("figures", help="figures (PNG + PDF) and report tables from result files")
    sub = p.add_subparsers(dest="figure", required=True)

    def add(name, handler, help):
        s = sub.add_parser(name, help=help)
        s.add_argument("--out", required=True, help="output prefix: writes PREFIX.png and PREFIX.pdf")
        s.set_defaults(handler=handler)
        return s

    s = add("training-curves", run_training_curves, "loss and accuracy per epoch")
    s.add_argument("--entry", nargs=2, action="append", required=True, metavar=("GROUP", "METRICS"),
                   help="a legend group (replicates share one) and a metrics.csv written by training")
    s.add_argument("--title", default=None, help="figure title (default: none)")
    s = add("table1", run_table1, "Table 1 as grouped bars with error bars")
    s.add_argument("--table", required=True, help="table1.csv")
    s.add_argument("--fraction", type=float, required=True, help="the kept fraction of Table 1")
    s.add_argument("--chance", type=float, default=0.1, help="chance accuracy (1 / number of classes)")
    s = add("fraction-sweep", run_fraction_sweep, "accuracy against the fraction of pixels kept")
    s.add_argument("--sweep", required=True, help="fraction_sweep.csv")
    s.add_argument("--table", default=None, help="table1.csv, for the full-image accuracy")
    s.add_argument("--chance", type=float, default=0.1, help="chance accuracy (1 / number of classes; default: 0.1)")
    s = add("confidence-curves", run_confidence_curves, "f along backward selection")
    s.add_argument("--entry", nargs=2, action="append", required=True, metavar=("MODEL", "SIS"),
                   help="a model name and its BackSelect result (.npz)")
    s.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    s = add("sis-sizes", run_sis_sizes, "SIS sizes of correct vs incorrect images")
    s.add_argument("--entry", nargs=2, action="append", required=True, metavar=("MODEL", "CSV"),
                   help="a model name and its per-image SIS size table")
    s.add_argument("--summary", required=True, help="the SIS size summary (.csv) with the Mann-Whitney test")
    s.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    s = add("sis-examples", run_sis_examples, "sample test images with their SIS (the paper's Figure 1)")
    s.add_argument("--data", required=True, help="converted dataset (.npz)")
    s.add_argument("--model", required=True, help="the model file whose SIS are shown")
    s.add_argument("--sis", required=True, help="its BackSelect result on the test split (.npz)")
    s.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    s.add_argument("--per-class", type=int, default=2, help="examples per class")
    s.add_argument("--classes", type=int, default=None,
                   help="rows for at most this many classes, the first with an image that reaches tau (default: "
                        "every class); only their images are read (ImageNet: 50,000 test images, 1,000 classes)")
    s.add_argument("--title", default=None, help="figure title (default: none)")
    add_normalization_arguments(s)
    add_device_argument(s)
    s = add("misclassified", run_misclassified, "SIS sizes of misclassified vs correct images by threshold")
    s.add_argument("--table", required=True, help="misclassified_sis.csv (`overinterp tables misclassified`)")
    s.add_argument("--images", required=True, help="its per-image table (misclassified_sis-images.csv)")
    s = add("mitigation", run_mitigation, "ensembles and input dropout against single models")
    s.add_argument("--entry", nargs=2, action="append", required=True, metavar=("MODEL", "CSV"),
                   help="a model name and its per-image SIS size table")
    s.add_argument("--table", required=True, help="mitigation.csv")
    s.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    t = sub.add_parser("table-html", help="a result table (.csv) as an HTML page for the report")
    t.add_argument("--table", required=True, help="a table (.csv) of results/tables/")
    t.add_argument("--title", required=True, help="the heading shown above it")
    t.add_argument("--out", required=True, help="the .html file")
    t.set_defaults(handler=run_table_html)


def run_training_curves(args) -> int:
    training_curves([(group, pd.read_csv(path)) for group, path in args.entry], args.out, args.title)
    return 0


def run_table1(args) -> int:
    table1_figure(pd.read_csv(args.table), args.out, args.fraction, args.chance)
    return 0


def run_fraction_sweep(args) -> int:
    table = pd.read_csv(args.table) if args.table else None
    fraction_sweep_figure(pd.read_csv(args.sweep), table, args.out, args.chance)
    return 0


def run_confidence_curves(args) -> int:
    keys = ("full_confidence", "step_values")
    confidence_curves([(model, read_step_arrays([path], keys)) for model, path in args.entry], args.out, args.tau)
    return 0


def run_sis_sizes(args) -> int:
    frames = {model: pd.read_csv(path) for model, path in args.entry}
    sis_size_figure(frames, pd.read_csv(args.summary), args.out, args.tau)
    return 0


def run_misclassified(args) -> int:
    misclassified_figure(pd.read_csv(args.images), pd.read_csv(args.table), args.out)
    return 0


def run_mitigation(args) -> int:
    frames = {model: pd.read_csv(path) for model, path in args.entry}
    mitigation_figure(frames, pd.read_csv(args.table), args.out, args.tau)
    return 0


def run_sis_examples(args) -> int:
    from .data import load_split
    from .evaluate import predict
    from .models import load_model
    from .data import normalizer_from_args
    from .utils import resolve_device

    arrays = read_step_arrays([args.sis], ("index", "target", "full_confidence", "removal_step", "step_values"))
    split = load_split(args.data, "test")  # the whole split: the result's index holds dataset rows
    if arrays["index"].max(initial=-1) >= len(split):
        raise ValueError(f"{args.sis} refers to test image {arrays['index'].max()} but {args.data} has {len(split)}")
    labels = split.labels.numpy()[arrays["index"]]
    rows_of = None  # the classes of the sheet's rows (default: all)
    rows = np.arange(len(labels))
    confident_classes = np.unique(labels[arrays["full_confidence"] >= args.tau])
    if args.classes is not None and len(confident_classes):  # the first classes with an image at tau, and their images
        rows_of = confident_classes[:args.classes].tolist()
        rows = np.flatnonzero(np.isin(labels, rows_of))
    # The SIS are whole steps, so a result rebuilt from its steps gives the same SIS.
    result = BackSelectResult.from_steps(
        *(arrays[key][rows] for key in ("removal_step", "step_values", "target", "full_confidence")),
        arrays["height"], arrays["width"], arrays["pixels_per_step"], arrays["index"][rows])
    labels = labels[rows]
    picks = pick_examples(result, labels, args.tau, args.per_class, len(split.classes))
    if rows_of is not None:
        picks = [picks[c] for c in rows_of]
    masks = sis_mask(result, args.tau)
    normalizer = normalizer_from_args(args)
    shown = [i for p in picks for i in p]
    images = dict(zip(shown, split.images[result.index[shown]].numpy()))  # the shown images alone are read
    sis_confidence = np.full(len(result), np.nan)
    if shown:
        keep = torch.from_numpy(np.stack([masks[i] for i in shown]).reshape(-1, 1, result.height, result.width))
        probs = predict(load_model(args.model, resolve_device(args.device)),
                        normalizer(torch.from_numpy(np.stack([images[i] for i in shown])), keep))
        sis_confidence[shown] = probs.cpu().gather(1, torch.from_numpy(result.target[shown]).view(-1, 1))[:, 0]
    title = args.title or f"Sufficient input subsets at τ = {args.tau:g}"
    sis_examples(images, labels, result, masks, sis_confidence, picks, split.classes, normalizer, args.out,
                 args.tau, title, rows_of)
    return 0


def run_table_html(args) -> int:
    with atomic_path(args.out) as tmp:
        tmp.write_text(table_html(pd.read_csv(args.table), args.title))
    return 0
