"""Tables of the paper's comparisons, built from the evaluation summaries and SIS results on disk.

Every evaluation summary (JSON) carries its own metadata (architecture, condition, fraction, seed, who
was evaluated), so the tables are a group-by over whatever summaries the workflow passes in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .utils import atomic_path, load_json, save_dataframe

# How each condition is named in the tables, in display order.
CONDITIONS = {
    ("trained", "full"): "full images",
    ("trained", "bs"): "backward selection (trained and tested)",
    ("trained", "random"): "random (trained and tested)",
    ("trained", "positions"): "mask positions only (trained and tested)",
    ("original", "bs"): "backward selection (original model)",
    ("original", "random"): "random (original model)",
}


def read_summaries(paths) -> pd.DataFrame:
    return pd.DataFrame([load_json(p) for p in paths])


def _mean_std(group: pd.DataFrame, column: str):
    values = group[column].dropna() if column in group else pd.Series(dtype=float)
    return (float(values.mean()) if len(values) else np.nan,
            float(values.std(ddof=1)) if len(values) > 1 else np.nan)


def comparison_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """One row per (architecture, fraction, condition): accuracy mean/std over replicates, confidence,
    agreement with the selecting model (overall and on its errors)."""
    rows = []
    keys = ["architecture", "fraction", "evaluated", "subset"]
    for (arch, fraction, evaluated, subset), group in summaries.groupby(keys, dropna=False, sort=False):
        acc_mean, acc_std = _mean_std(group, "accuracy")
        rows.append({
            "architecture": arch,
            "fraction": fraction,
            "condition": CONDITIONS[(evaluated, subset)],
            "accuracy_mean": acc_mean,
            "accuracy_std": acc_std,
            **({"top5_mean": _mean_std(group, "top5_accuracy")[0], "top5_std": _mean_std(group, "top5_accuracy")[1]}
               if "top5_accuracy" in summaries else {}),
            "replicates": len(group),
            "test_images": int(group["n"].max()) if "n" in group else np.nan,  # as evaluated, not as configured
            "mean_confidence": _mean_std(group, "mean_confidence")[0],
            "agreement_with_selecting_model": _mean_std(group, "agreement")[0],
            "agreement_on_its_errors": _mean_std(group, "agreement_on_reference_errors")[0],
        })
    table = pd.DataFrame(rows)
    order = {name: i for i, name in enumerate(CONDITIONS.values())}
    table["_order"] = table["condition"].map(order)
    table = table.sort_values(["architecture", "fraction", "_order"], na_position="first")
    return table.drop(columns="_order").reset_index(drop=True)


def table1(summaries: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The paper's Table 1 (full / BS / random) plus the controls, at one kept fraction."""
    at_fraction = summaries[(summaries["subset"] == "full") | np.isclose(summaries["fraction"].astype(float), fraction)]
    table = comparison_table(at_fraction.assign(fraction=fraction))
    return table.drop(columns="fraction")


def markdown_table(table: pd.DataFrame) -> pd.DataFrame:
    """Human-readable columns: 'mean ± std' in percent, blanks for what does not apply."""
    def pct(mean, std=np.nan):
        if pd.isna(mean):
            return ""
        return f"{100 * mean:.1f}" + ("" if pd.isna(std) else f" ± {100 * std:.1f}")

    out = pd.DataFrame({
        "architecture": table["architecture"],
        **({"fraction kept": table["fraction"].map(lambda f: f"{100 * f:g}%")} if "fraction" in table else {}),
        "condition": table["condition"],
        "test accuracy (%)": [pct(m, s) for m, s in zip(table["accuracy_mean"], table["accuracy_std"])],
        **({"top-5 accuracy (%)": [pct(m, s) for m, s in zip(table["top5_mean"], table["top5_std"])]}
           if "top5_mean" in table else {}),
        "n": table["replicates"],
        "mean confidence (%)": table["mean_confidence"].map(pct),
        "agrees with selecting model (%)": table["agreement_with_selecting_model"].map(pct),
        "… on its errors (%)": table["agreement_on_its_errors"].map(pct),
    })
    return out


# Columns of the other tables as people read them: header, and "%" (a share, shown in percent), "int", "p"
# (a p-value) or "g" (a number, 3 significant digits). CSV files keep the machine names and raw values.
READABLE_COLUMNS = {
    "test_accuracy": ("test accuracy (%)", "%"),
    "tau": ("τ", "g"),
    "images_at_tau": ("images with f ≥ τ", "int"),
    "sis_fraction_median": ("SIS size, median (% of image)", "%"),
    "sis_fraction_mean": ("SIS size, mean (% of image)", "%"),
    "own_bs_fraction": ("its BS subsets keep (% of pixels)", "%"),
    "own_bs_accuracy": ("accuracy on its BS subsets (%)", "%"),
    "own_bs_confidence": ("confidence on its BS subsets (%)", "%"),
    "retrained_bs_accuracy": ("retrained on BS subsets: accuracy (%)", "%"),
    "correct_n": ("correct: images", "int"),
    "correct_median": ("correct: median SIS (% of image)", "%"),
    "correct_mean": ("correct: mean SIS (% of image)", "%"),
    "incorrect_n": ("misclassified: images", "int"),
    "incorrect_median": ("misclassified: median SIS (% of image)", "%"),
    "incorrect_mean": ("misclassified: mean SIS (% of image)", "%"),
    "mannwhitney_u": ("Mann-Whitney U", "g"),
    "p_value": ("p (two-sided)", "p"),
    "images": ("images", "int"),
    "kept_pixels": ("kept pixels", "int"),
    "overlap_mean": ("kept pixels shared, mean (%)", "%"),
    "overlap_sd": ("… sd (%)", "%"),
    "overlap_median": ("… median (%)", "%"),
    "overlap_chance": ("… by chance (%)", "%"),
    "spearman_mean": ("rank correlation of orderings, mean", "g"),
    "spearman_median": ("… median", "g"),
    "exact_kept_confidence_mean": ("confidence on exact subsets (%)", "%"),
    "gradient_kept_confidence_mean": ("confidence on gradient subsets (%)", "%"),
    "same_target": ("same class followed (%)", "%"),
    "median_difference": ("median SIS, misclassified minus correct (points)", "%"),
    "median_difference_low": ("… 95% CI low (points)", "%"),
    "median_difference_high": ("… 95% CI high (points)", "%"),
    "cliffs_delta": ("Cliff's delta (misclassified vs correct)", "g"),
    "cliffs_delta_low": ("Cliff's delta: 95% CI low", "g"),
    "cliffs_delta_high": ("Cliff's delta: 95% CI high", "g"),
    "clean_accuracy": ("clean accuracy (%)", "%"),
    "robust_accuracy": ("PGD accuracy (%)", "%"),
    "epsilon": ("ε (pixel units)", "g"),
    "step_size": ("step (pixel units)", "g"),
    "steps": ("PGD steps", "int"),
    # controls (controls.py)
    "kept_share": ("kept (% of pixels)", "%"),
    "dilated_share": ("dilated (% of pixels)", "%"),
    "confidence_subset": ("f on the subset (%)", "%"),
    "confidence_dilated": ("f on the dilated subset (%)", "%"),
    "confidence_random": ("f on random pixels of the dilated size (%)", "%"),
    "predicted_subset": ("still predicted on the subset (%)", "%"),
    "predicted_dilated": ("still predicted on the dilated subset (%)", "%"),
    "predicted_random": ("still predicted on random pixels (%)", "%"),
    "accuracy_subset": ("accuracy on the subset (%)", "%"),
    "accuracy_dilated": ("accuracy on the dilated subset (%)", "%"),
    "accuracy_random": ("accuracy on random pixels of the dilated size (%)", "%"),
    "confidence_drop_low": ("drop of f when dilated, 95% CI low (%)", "%"),
    "confidence_drop_high": ("drop of f when dilated, 95% CI high (%)", "%"),
    "classes": ("classes", "int"),
    "predicted_pairs": ("predicted class: pairs", "int"),
    "predicted_reach_at_fraction": ("predicted class: reaches τ within the kept fraction (%)", "%"),
    "predicted_reach_anywhere": ("predicted class: reaches τ on some subset (%)", "%"),
    "predicted_median_smallest": ("predicted class: smallest subset reaching τ, median (% of image)", "%"),
    "predicted_confidence_at_fraction": ("predicted class: mean f on the kept-fraction subset (%)", "%"),
    "other_pairs": ("other classes: pairs", "int"),
    "other_reach_at_fraction": ("other classes: reach τ within the kept fraction (%)", "%"),
    "other_reach_anywhere": ("other classes: reach τ on some subset (%)", "%"),
    "other_median_smallest": ("other classes: smallest subset reaching τ, median (% of image)", "%"),
    "other_confidence_at_fraction": ("other classes: mean f on the kept-fraction subsets (%)", "%"),
    "every_class_at_fraction": ("images where every class reaches τ within the kept fraction (%)", "%"),
    "bs_accuracy": ("backward selection: accuracy (%)", "%"),
    "bs_sd": ("backward selection: sd (%)", "%"),
    "random_accuracy": ("random: accuracy (%)", "%"),
    "random_sd": ("random: sd (%)", "%"),
    "positions_accuracy": ("mask positions only: accuracy (%)", "%"),
    "positions_sd": ("mask positions only: sd (%)", "%"),
    "bs_minus_random": ("backward selection minus random (points)", "%"),
    "train_images": ("training images", "int"),
    "accuracy_own": ("accuracy on its own subsets (%)", "%"),
    "follows_positions": ("follows the positions (%)", "%"),
    "follows_positions_low": ("follows the positions: 95% CI low (%)", "%"),
    "follows_positions_high": ("follows the positions: 95% CI high (%)", "%"),
    "follows_pixels": ("follows the pixels (%)", "%"),
    "follows_pixels_low": ("follows the pixels: 95% CI low (%)", "%"),
    "follows_pixels_high": ("follows the pixels: 95% CI high (%)", "%"),
    "neither": ("another class (%)", "%"),
}


def readable_table(table: pd.DataFrame) -> pd.DataFrame:
    """Any of the workflow's tables with readable headers and one unit convention: shares in percent."""
    if {"condition", "accuracy_mean", "accuracy_std"} <= set(table.columns):
        return markdown_table(table)

    def show(value, kind):
        if pd.isna(value):
            return ""
        return {"%": lambda v: f"{100 * v:.1f}", "int": lambda v: f"{int(v):,}",
                "p": lambda v: f"{v:.2g}" if v >= 1e-4 else "< 0.0001", "g": lambda v: f"{v:.3g}"}[kind](value)

    out = {}
    for column in table.columns:
        header, kind = READABLE_COLUMNS.get(column, (column.replace("_", " "), None))
        if header in out:  # a header shared by two columns would drop one of them
            raise ValueError(f"two columns of the table read {header!r}; give {column!r} its own header")
        values = table[column]
        if kind is None and pd.api.types.is_float_dtype(values):
            kind = "g"
        out[header] = values.map(lambda v, k=kind: show(v, k)) if kind else values
    return pd.DataFrame(out)


def headline(table1: pd.DataFrame, sis_sizes: pd.DataFrame | None, settings: dict) -> str:
    """The report's front page (reStructuredText): this run's configuration in words, its key numbers and
    Table 1."""
    pct = lambda v: "n/a" if pd.isna(v) else f"{100 * v:.1f}%"  # noqa: E731
    fraction = settings["fraction"]
    method = {"exact": "exact backward selection", "gradient": "batched gradient backward selection "
              f"({settings['pixels_per_step']} pixels per step)"}[settings["method"]]
    dataset = settings.get("dataset", "CIFAR-10")
    trained_on = "all" if settings["train_size"] is None else f"{settings['train_size']:,}"
    tested_on = int(table1["test_images"].max())  # as evaluated
    title = f"Overinterpretation on {dataset}: this run's results"
    models = []
    if settings["architectures"]:
        models.append(f"{', '.join(settings['architectures'])} trained for {settings['epochs']} epochs on "
                      f"{trained_on} training images of {dataset} (seeds {', '.join(map(str, settings['seeds']))})")
    models += [f"{name} ({entry['model']} with the weights {entry['weights']}, not trained here)"
               for name, entry in settings.get("pretrained", {}).items()]
    lines = [title, "=" * len(title), "",
             f"**Configuration.** {'; '.join(models)}; tested on {tested_on:,} test images. "
             f"Pixel subsets by {method}; SIS threshold "
             f"τ = {settings['tau']:g} on the predicted class's probability. Table 1 keeps "
             f"{100 * fraction:g}% of the pixels; fresh models were trained and tested on the subsets with seeds "
             f"{', '.join(map(str, settings['retrain_seeds']))}. Masked pixels take the dataset-mean colour.", "",
             "Key numbers", "-----------", ""]
    chance = settings.get("chance", 0.1)
    for arch, rows in table1.groupby("architecture", sort=False):
        acc = dict(zip(rows["condition"], zip(rows["accuracy_mean"], rows["accuracy_std"])))

        def cell(condition):
            mean, std = acc.get(condition, (np.nan, np.nan))
            return pct(mean) + ("" if pd.isna(std) else f" ± {100 * std:.1f}")

        lines.append(
            f"- **{arch}**: {cell('full images')} test accuracy on full images; trained and tested on "
            f"{100 * fraction:g}% of the pixels chosen by backward selection: "
            f"**{cell('backward selection (trained and tested)')}**, on as many random pixels: "
            f"{cell('random (trained and tested)')} (chance {pct(chance)}).")
        controls = [f"{name}: {cell(condition)}" for name, condition in (
            ("the mask positions alone", "mask positions only (trained and tested)"),
            ("the original model on its own subsets", "backward selection (original model)"),
            ("the original model on random subsets", "random (original model)")) if condition in acc]
        if controls:
            lines.append(f"  Controls: {'; '.join(controls)}.")
    if sis_sizes is not None:
        selecting = settings.get("sis_models")
        for row in sis_sizes[sis_sizes["model"].isin(selecting)].itertuples() if selecting else sis_sizes.itertuples():
            test = "" if pd.isna(row.p_value) else f", Mann-Whitney p = {row.p_value:.2g}"
            lines.append(
                f"- **SIS sizes of {row.model}** at τ = {row.tau:g} ({row.images_at_tau:,} test images reach τ): "
                f"median {pct(row.correct_median)} of the image for correctly classified images, "
                f"{pct(row.incorrect_median)} for misclassified ones{test}.")
    lines += ["", f"Table 1: {100 * fraction:g}% of the pixels kept", "-" * 40, "", ".. list-table::",
              "   :header-rows: 1", ""]
    readable = markdown_table(table1)
    for row in [list(readable.columns)] + readable.astype(str).values.tolist():
        lines.append("   * - " + "\n     - ".join(v or " " for v in row))
    lines += ["", "Every figure and table of the run is under the categories on the left; the workflow's "
              "steps and their run times under Workflow_ and Statistics_.", ""]
    return "\n".join(lines)


def latex_table(table: pd.DataFrame) -> str:
    """The Markdown table's content as a LaTeX tabular (booktabs rules: needs ``\\usepackage{booktabs}``)."""
    readable = markdown_table(table)
    latex = (readable.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
             .to_latex(hrules=True, column_format="l" * (readable.columns.get_loc("condition") + 1)
                       + "r" * (len(readable.columns) - readable.columns.get_loc("condition") - 1)))
    return latex.replace("±", r"$\pm$").replace("…", r"\ldots{}")


def sis_sizes(sis_paths, predictions_path, tau: float) -> pd.DataFrame:
    """Per test image with full-image confidence >= tau: SIS size as a fraction of the image, and whether
    the model classifies the image correctly. ``sis_paths``: the split's result file, or its shards in order
    (read without building orderings)."""
    from .sis import read_step_arrays, sis_size_of_steps

    arrays = read_step_arrays([sis_paths] if isinstance(sis_paths, (str, Path)) else sis_paths)
    pixels = arrays["height"] * arrays["width"]
    predictions = pd.read_csv(predictions_path).set_index("index")
    sizes = sis_size_of_steps(arrays["step_values"], arrays["full_confidence"], pixels,
                              arrays["pixels_per_step"], tau)
    index = np.asarray(arrays["index"])
    frame = pd.DataFrame({
        "index": index,
        "label": predictions.loc[index, "label"].to_numpy(),
        "prediction": predictions.loc[index, "prediction"].to_numpy(),
        "full_confidence": np.asarray(arrays["full_confidence"], dtype=float),
        "sis_size": sizes,
        "sis_fraction": sizes / pixels,
    })
    frame["correct"] = frame["label"] == frame["prediction"]
    return frame[frame["full_confidence"] >= tau].reset_index(drop=True)


def sis_size_summary(frames: dict[str, pd.DataFrame], tau: float) -> pd.DataFrame:
    """Per model: SIS size (fraction of the image) of correctly vs incorrectly classified images, with a
    two-sided Mann-Whitney U test."""
    rows = []
    for model, frame in frames.items():
        right, wrong = frame.loc[frame["correct"], "sis_fraction"], frame.loc[~frame["correct"], "sis_fraction"]
        if len(right) and len(wrong):
            test = stats.mannwhitneyu(right, wrong, alternative="two-sided")
            u, p = float(test.statistic), float(test.pvalue)
        else:
            u = p = np.nan
        rows.append({
            "model": model, "tau": tau, "images_at_tau": len(frame),
            "correct_n": len(right), "correct_median": right.median(), "correct_mean": right.mean(),
            "incorrect_n": len(wrong), "incorrect_median": wrong.median(), "incorrect_mean": wrong.mean(),
            "mannwhitney_u": u, "p_value": p,
        })
    return pd.DataFrame(rows)


def cliffs_delta(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) - P(a < b) over all pairs: -1..1, 0 = no difference (the Mann-Whitney U, rescaled)."""
    if not len(a) or not len(b):
        return float("nan")
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2 * u / (len(a) * len(b)) - 1)


def bootstrap_interval(statistic, samples, draws: int = 2000, seed: int = 0, level: float = 0.95) -> np.ndarray:
    """Percentile bootstrap interval of ``statistic(*samples)``, each sample resampled with replacement on its
    own: [low, high], or a (2, k) array for a statistic that returns k values."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(*(sample[rng.integers(0, len(sample), len(sample))] for sample in samples))
                       for _ in range(draws)])
    return np.quantile(values, [(1 - level) / 2, (1 + level) / 2], axis=0)


# Fewer images than this in either group and a bootstrap interval would only restate the few values drawn
# (two errors give three possible medians): no interval is given.
MIN_BOOTSTRAP_GROUP = 10


def misclassified_comparison(sizes: pd.DataFrame, draws: int = 2000, seed: int = 0) -> dict:
    """SIS size (fraction of the image) of misclassified vs correctly classified images: counts, medians,
    the difference of medians (misclassified minus correct) and Cliff's delta (misclassified vs correct;
    negative = misclassified images have smaller SIS), each with a 95% percentile bootstrap interval
    (both groups resampled; only with at least MIN_BOOTSTRAP_GROUP images in each), and the two-sided
    Mann-Whitney p."""
    right = sizes.loc[sizes["correct"], "sis_fraction"].to_numpy(float)
    wrong = sizes.loc[~sizes["correct"], "sis_fraction"].to_numpy(float)
    row = {"correct_n": len(right), "incorrect_n": len(wrong),
           "correct_median": np.median(right) if len(right) else np.nan,
           "incorrect_median": np.median(wrong) if len(wrong) else np.nan}
    row["median_difference"] = row["incorrect_median"] - row["correct_median"]
    row["median_difference_low"] = row["median_difference_high"] = np.nan
    row["cliffs_delta"] = cliffs_delta(wrong, right)
    row["cliffs_delta_low"] = row["cliffs_delta_high"] = np.nan
    row["p_value"] = (float(stats.mannwhitneyu(wrong, right, alternative="two-sided").pvalue)
                      if len(right) and len(wrong) else np.nan)
    if min(len(right), len(wrong)) >= MIN_BOOTSTRAP_GROUP:
        (row["median_difference_low"], row["cliffs_delta_low"]), (row["median_difference_high"],
                                                                  row["cliffs_delta_high"]) = bootstrap_interval(
            lambda r, w: (np.median(w) - np.median(r), cliffs_delta(w, r)), (right, wrong), draws, seed)
    return row


def misclassified_table(frames: dict[tuple[str, float], pd.DataFrame], draws: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, tau) of :func:`misclassified_comparison`; ``frames`` from :func:`sis_sizes`."""
    return pd.DataFrame([{"model": model, "tau": tau, "images_at_tau": len(frame),
                          **misclassified_comparison(frame, draws, seed)}
                         for (model, tau), frame in frames.items()])


def mitigation_table(summaries: pd.DataFrame, sis_sizes_by_model: dict[str, pd.DataFrame], tau: float) -> pd.DataFrame:
    """Per model (single, input dropout, ensemble): test accuracy, SIS size at tau, the model's accuracy and
    confidence on its own backward-selection subsets, and retrained accuracy where it was run."""
    rows = []
    for model, sizes in sis_sizes_by_model.items():
        mine = summaries[summaries["model"] == model]
        full = mine[mine["subset"] == "full"]
        own = mine[(mine["evaluated"] == "original") & (mine["subset"] == "bs")]
        retrained = mine[(mine["evaluated"] == "trained") & (mine["subset"] == "bs")]
        rows.append({
            "model": model,
            "kind": full["kind"].iloc[0] if "kind" in full and len(full) else "",
            "test_accuracy": full["accuracy"].mean(),
            "tau": tau,
            "images_at_tau": len(sizes),
            "sis_fraction_median": sizes["sis_fraction"].median(),
            "sis_fraction_mean": sizes["sis_fraction"].mean(),
            "own_bs_fraction": own["fraction"].iloc[0] if len(own) else np.nan,
            "own_bs_accuracy": own["accuracy"].mean(),
            "own_bs_confidence": own["mean_confidence"].mean(),
            "retrained_bs_accuracy": retrained["accuracy"].mean() if len(retrained) else np.nan,
        })
    return pd.DataFrame(rows)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tables", help="tables of the paper's comparisons")
    sub = p.add_subparsers(dest="table", required=True)
    t = sub.add_parser("comparison", help="Table 1 at one fraction and the fraction sweep, from eval summaries")
    t.add_argument("--fraction", type=float, required=True, help="the kept fraction of Table 1")
    t.add_argument("--table1", required=True, help="output prefix: writes PREFIX.csv, PREFIX.md and PREFIX.tex")
    t.add_argument("--sweep", required=True, help="output prefix for the fraction sweep")
    t.add_argument("summaries", nargs="+", help="evaluation summaries (.json)")
    t.set_defaults(handler=run_comparison)
    s = sub.add_parser("sis-sizes", help="SIS sizes of correct vs incorrect test images")
    s.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    s.add_argument("--entry", nargs="+", action="append", required=True, metavar="MODEL SIS... PREDICTIONS",
                   help="a model name, its test-split SIS result (the merged file, or its shards in order) and its "
                        "full-image predictions")
    s.add_argument("--per-image-dir", required=True, help="writes <dir>/<model>.csv")
    s.add_argument("--summary", required=True, help="output prefix: PREFIX.csv and PREFIX.md")
    s.set_defaults(handler=run_sis_sizes)
    s = sub.add_parser("misclassified", help="SIS sizes of misclassified vs correct images at several thresholds, "
                                             "with effect sizes and bootstrap intervals")
    s.add_argument("--taus", type=float, nargs="+", required=True, help="the thresholds compared")
    s.add_argument("--entry", nargs="+", action="append", required=True, metavar="MODEL SIS... PREDICTIONS",
                   help="as for sis-sizes")
    s.add_argument("--draws", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    s.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    s.add_argument("--out", required=True,
                   help="output prefix: PREFIX.csv and PREFIX.md (per model and threshold), PREFIX-images.csv (per image)")
    s.set_defaults(handler=run_misclassified)
    r = sub.add_parser("robustness", help="clean and PGD accuracy, one row per model")
    r.add_argument("--out", required=True, help="output prefix: PREFIX.csv and PREFIX.md")
    r.add_argument("summaries", nargs="+", help="robustness summaries (.json) of `overinterp robustness`")
    r.set_defaults(handler=run_robustness_table)
    m = sub.add_parser("mitigation", help="ensembles and input dropout against single models")
    m.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    m.add_argument("--out", required=True, help="output prefix: PREFIX.csv and PREFIX.md")
    m.add_argument("--sis-sizes", nargs="+", required=True, help="per-image SIS sizes, <model>.csv each")
    m.add_argument("--summaries", nargs="+", required=True, help="evaluation summaries (.json)")
    m.set_defaults(handler=run_mitigation)
    h = sub.add_parser("headline", help="the report's front page: configuration in words, key numbers, Table 1")
    h.add_argument("--table1", required=True, help="table1.csv")
    h.add_argument("--sis-sizes", default=None, help="the SIS size summary (.csv)")
    h.add_argument("--settings", required=True,
                   help="JSON object of the run's settings: dataset (its name), chance, architectures, seeds, epochs, "
                        "train_size (null: all), pretrained (name: {model, weights}), method, pixels_per_step, tau, "
                        "fraction, retrain_seeds, and sis_models (the models whose SIS sizes are quoted; default: "
                        "every model of the summary)")
    h.add_argument("--out", required=True, help="the page (.rst)")
    h.set_defaults(handler=run_headline)


def run_comparison(args) -> int:
    summaries = read_summaries(args.summaries)
    table = table1(summaries, args.fraction)
    save_dataframe(f"{args.table1}.csv", table)
    save_dataframe(f"{args.table1}.md", markdown_table(table))
    with atomic_path(f"{args.table1}.tex") as tmp:
        tmp.write_text(latex_table(table))
    sweep = comparison_table(summaries[summaries["subset"] != "full"])
    save_dataframe(f"{args.sweep}.csv", sweep)
    save_dataframe(f"{args.sweep}.md", markdown_table(sweep))
    return 0


def run_sis_sizes(args) -> int:
    frames = {}
    for entry in args.entry:
        if len(entry) < 3:
            raise ValueError(f"--entry needs MODEL SIS... PREDICTIONS, got {' '.join(entry)!r}")
        model, sis_paths, predictions = entry[0], entry[1:-1], entry[-1]
        frames[model] = sis_sizes(sis_paths, predictions, args.tau)
        save_dataframe(Path(args.per_image_dir) / f"{model}.csv", frames[model])
    summary = sis_size_summary(frames, args.tau)
    save_dataframe(f"{args.summary}.csv", summary)
    save_dataframe(f"{args.summary}.md", readable_table(summary))
    return 0


def run_misclassified(args) -> int:
    frames = {}
    for entry in args.entry:
        if len(entry) < 3:
            raise ValueError(f"--entry needs MODEL SIS... PREDICTIONS, got {' '.join(entry)!r}")
        for tau in args.taus:
            frames[entry[0], tau] = sis_sizes(entry[1:-1], entry[-1], tau)
    table = misclassified_table(frames, args.draws, args.seed)
    save_dataframe(f"{args.out}.csv", table)
    save_dataframe(f"{args.out}.md", readable_table(table))
    images = pd.concat([frame.assign(model=model, tau=tau) for (model, tau), frame in frames.items()],
                       ignore_index=True)
    save_dataframe(f"{args.out}-images.csv", images[["model", "tau", "index", "label", "prediction", "correct",
                                                     "full_confidence", "sis_fraction"]])
    return 0


def run_robustness_table(args) -> int:
    columns = ["model", "kind", "n", "clean_accuracy", "robust_accuracy", "epsilon", "step_size", "steps"]
    table = read_summaries(args.summaries).reindex(columns=columns)
    save_dataframe(f"{args.out}.csv", table)
    save_dataframe(f"{args.out}.md", readable_table(table))
    return 0


def run_mitigation(args) -> int:
    sizes = {Path(p).stem: pd.read_csv(p) for p in args.sis_sizes}
    table = mitigation_table(read_summaries(args.summaries), sizes, args.tau)
    save_dataframe(f"{args.out}.csv", table)
    save_dataframe(f"{args.out}.md", readable_table(table))
    return 0


def run_headline(args) -> int:
    sizes = pd.read_csv(args.sis_sizes) if args.sis_sizes else None
    page = headline(pd.read_csv(args.table1), sizes, json.loads(args.settings))
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return 0
