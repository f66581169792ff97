"""Tables of the paper's comparisons, built from the evaluation summaries and SIS results on disk.

Every evaluation summary (JSON) carries its own metadata (architecture, condition, fraction, seed, who
was evaluated), so the tables are a group-by over whatever summaries the workflow passes in.
"""
from __future__ import annotations

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
        "n": table["replicates"],
        "mean confidence (%)": table["mean_confidence"].map(pct),
        "agrees with selecting model (%)": table["agreement_with_selecting_model"].map(pct),
        "… on its errors (%)": table["agreement_on_its_errors"].map(pct),
    })
    return out


def latex_table(table: pd.DataFrame) -> str:
    """The Markdown table's content as a LaTeX tabular (booktabs rules: needs ``\\usepackage{booktabs}``)."""
    readable = markdown_table(table)
    latex = (readable.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
             .to_latex(hrules=True, column_format="l" * (readable.columns.get_loc("condition") + 1) + "r" * 5))
    return latex.replace("±", r"$\pm$").replace("…", r"\ldots{}")


def sis_sizes(sis_path, predictions_path, tau: float) -> pd.DataFrame:
    """Per test image with full-image confidence >= tau: SIS size as a fraction of the image, and whether
    the model classifies the image correctly."""
    from .sis import BackSelectResult, sis_size

    result = BackSelectResult.load(sis_path)
    predictions = pd.read_csv(predictions_path).set_index("index")
    sizes = np.asarray(sis_size(result, tau), dtype=float)
    index = np.asarray(result.index)
    frame = pd.DataFrame({
        "index": index,
        "label": predictions.loc[index, "label"].to_numpy(),
        "prediction": predictions.loc[index, "prediction"].to_numpy(),
        "full_confidence": np.asarray(result.full_confidence, dtype=float),
        "sis_size": sizes,
        "sis_fraction": sizes / (result.height * result.width),
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
    s.add_argument("--entry", nargs=3, action="append", required=True, metavar=("MODEL", "SIS", "PREDICTIONS"),
                   help="a model name, its test-split SIS result and its full-image predictions")
    s.add_argument("--per-image-dir", required=True, help="writes <dir>/<model>.csv")
    s.add_argument("--summary", required=True, help="output prefix: PREFIX.csv and PREFIX.md")
    s.set_defaults(handler=run_sis_sizes)
    m = sub.add_parser("mitigation", help="ensembles and input dropout against single models")
    m.add_argument("--tau", type=float, required=True, help="SIS threshold: f (the predicted class's probability) the subset must keep")
    m.add_argument("--out", required=True, help="output prefix: PREFIX.csv and PREFIX.md")
    m.add_argument("--sis-sizes", nargs="+", required=True, help="per-image SIS sizes, <model>.csv each")
    m.add_argument("--summaries", nargs="+", required=True, help="evaluation summaries (.json)")
    m.set_defaults(handler=run_mitigation)


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
    for model, sis_path, predictions in args.entry:
        frames[model] = sis_sizes(sis_path, predictions, args.tau)
        save_dataframe(Path(args.per_image_dir) / f"{model}.csv", frames[model])
    summary = sis_size_summary(frames, args.tau)
    save_dataframe(f"{args.summary}.csv", summary)
    save_dataframe(f"{args.summary}.md", summary.round(4))
    return 0


def run_mitigation(args) -> int:
    sizes = {Path(p).stem: pd.read_csv(p) for p in args.sis_sizes}
    table = mitigation_table(read_summaries(args.summaries), sizes, args.tau)
    save_dataframe(f"{args.out}.csv", table)
    save_dataframe(f"{args.out}.md", table.round(4))
    return 0
