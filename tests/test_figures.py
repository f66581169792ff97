"""Figures and the report: each plotting command on small real inputs (tables built by the analysis
commands, a saved model, BackSelect results), and on the smoke run every figure, table and the report."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, snakemake
from overinterp import figures
from overinterp.analysis import CONDITIONS
from overinterp.cli import main
from overinterp.data import Normalizer, load_split
from overinterp.evaluate import predict
from overinterp.models import build_model, load_model, save_model
from overinterp.sis import BackSelectResult, read_step_arrays, sis_mask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_figure_files(prefix) -> None:
    png, pdf = prefix.with_suffix(".png"), prefix.with_suffix(".pdf")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.stat().st_size > 5000 and pdf.stat().st_size > 2000


def picture_axes(fig):
    """The panels of an image sheet that show a picture (not its spacers or empty rows)."""
    return [ax for ax in fig.axes if ax.images]


def backselect_result(n: int, seed: int, full_confidence, index=None) -> BackSelectResult:
    """Orderings of n 32x32 images with f falling as pixels go (what BackSelect stores)."""
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(1024) for _ in range(n)])
    full = np.asarray(full_confidence, dtype=float)
    remaining = 1 - np.arange(1, 1025) / 1024
    values = full[:, None] * np.clip(remaining[None] * rng.uniform(5, 30, (n, 1)), 0, 1)
    return BackSelectResult(order, values, rng.integers(0, 10, n), full, 32, 32,
                            index=np.arange(n) if index is None else index)


# --------------------------------------------------------------------------------------------------
# Unit tests of the plotting functions and commands


def test_training_curves_group_replicates(tmp_path):
    entries = []
    for group in ("resnet20", "vgg16_bn"):
        for seed in range(2):
            epochs = np.arange(1, 6)
            entries.append((group, pd.DataFrame({
                "epoch": epochs, "train_loss": 2 / epochs + seed * 0.01, "train_accuracy": 1 - 0.5 / epochs,
                "test_accuracy": 0.9 - 0.5 / epochs})))
    fig = figures.training_curves(entries, tmp_path / "curves", title="t")
    assert_figure_files(tmp_path / "curves")
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.lines) == 4 and len(acc_ax.lines) == 8  # train and test accuracy per run
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["resnet20", "vgg16_bn", "replicate 1", "replicate 2", "test", "train"]
    # A group shares its colour; its replicates are told apart by their markers.
    assert len({line.get_color() for line in loss_ax.lines}) == 2
    assert [line.get_marker() for line in loss_ax.lines] == ["o", "s", "o", "s"]


def write_summaries(directory, architectures=("resnet20", "tiny"), fractions=(0.05, 0.2)) -> list[str]:
    """Evaluation summaries as the evaluate command tags them, for every condition of the tables."""
    rng = np.random.default_rng(0)
    paths = []

    def write(name, **summary):
        path = directory / f"{name}.json"
        path.write_text(json.dumps(summary))
        paths.append(str(path))

    for arch in architectures:
        for seed in (0, 1):
            write(f"{arch}-full-{seed}", architecture=arch, model=f"{arch}-s{seed}", evaluated="trained",
                  subset="full", seed=seed, n=100, accuracy=0.9 + 0.01 * seed, mean_confidence=0.9)
        for fraction in fractions:
            for subset, accuracy in (("bs", 0.7), ("random", 0.4)):
                write(f"{arch}-orig-{subset}-{fraction}", architecture=arch, model=f"{arch}-s0",
                      evaluated="original", subset=subset, method="gradient" if subset == "bs" else None,
                      fraction=fraction, n=100, accuracy=accuracy + fraction / 2, mean_confidence=0.6)
                for seed in (0, 1):
                    write(f"{arch}-{subset}-{fraction}-{seed}", architecture=arch, model=f"{arch}-s0",
                          evaluated="trained", subset=subset, fraction=fraction, seed=seed, n=100,
                          accuracy=accuracy + fraction + rng.normal(0, 0.02), mean_confidence=0.7,
                          agreement=0.9 if subset == "bs" else 0.5,
                          agreement_on_reference_errors=0.8 if subset == "bs" else 0.1, reference_errors=10)
    return paths


@pytest.fixture(scope="module")
def comparison_tables(tmp_path_factory):
    """Table 1 and the sweep written by the analysis command from tagged summaries."""
    directory = tmp_path_factory.mktemp("tables")
    summaries = write_summaries(directory)
    assert main(["tables", "comparison", "--fraction", "0.05", "--table1", str(directory / "table1"),
                 "--sweep", str(directory / "fraction_sweep"), *summaries]) == 0
    return directory


def test_table1_latex(comparison_tables):
    tex = (comparison_tables / "table1.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex and "\\bottomrule" in tex
    table = pd.read_csv(comparison_tables / "table1.csv")
    assert tex.count("\\\\\n") == len(table) + 1  # header and one line per row
    assert "$\\pm$" in tex and "test accuracy (\\%)" in tex and "±" not in tex


def test_table1_figure_bars(comparison_tables, tmp_path):
    table = pd.read_csv(comparison_tables / "table1.csv")
    assert main(["figures", "table1", "--table", str(comparison_tables / "table1.csv"), "--fraction", "0.05",
                 "--out", str(tmp_path / "table1")]) == 0
    assert_figure_files(tmp_path / "table1")
    fig = figures.table1_figure(table, tmp_path / "again", 0.05)
    accuracy_ax, agreement_ax = fig.axes
    conditions = table["condition"].nunique()
    assert conditions == 5  # full, BS and random trained, BS and random on the original model
    bars = [p for p in accuracy_ax.patches if p.get_height() > 0]
    assert len(bars) == len(table) == 2 * conditions
    # Bar heights are the table's means (in table order per condition).
    heights = sorted(round(p.get_height(), 6) for p in bars)
    assert heights == sorted(round(v, 6) for v in table["accuracy_mean"])
    # Agreement: all images and the selecting model's errors, for the two retrained conditions.
    assert {round(p.get_height(), 6) for p in agreement_ax.patches if p.get_height() > 0} == {0.9, 0.8, 0.5, 0.1}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:conditions] == [c for c in CONDITIONS.values() if c in set(table["condition"])]


def test_fraction_sweep_figure(comparison_tables, tmp_path):
    assert main(["figures", "fraction-sweep", "--sweep", str(comparison_tables / "fraction_sweep.csv"),
                 "--table", str(comparison_tables / "table1.csv"), "--out", str(tmp_path / "sweep")]) == 0
    assert_figure_files(tmp_path / "sweep")
    sweep = pd.read_csv(comparison_tables / "fraction_sweep.csv")
    fig = figures.fraction_sweep_figure(sweep, pd.read_csv(comparison_tables / "table1.csv"), tmp_path / "s", 0.1)
    assert [ax.get_title() for ax in fig.axes] == ["resnet20", "tiny"]
    for ax in fig.axes:
        assert len(ax.containers) == 4  # one error-bar series per subset condition
        assert [t.get_text() for t in ax.get_xticklabels()] == ["5%", "20%"]


def test_table_html_pages(comparison_tables, tmp_path):
    out = tmp_path / "table1.html"
    assert main(["figures", "table-html", "--table", str(comparison_tables / "table1.csv"),
                 "--title", "Table 1 <test>", "--out", str(out)]) == 0
    page = out.read_text()
    assert "<title>Table 1 &lt;test&gt;</title>" in page
    table = pd.read_csv(comparison_tables / "table1.csv")
    assert page.count("<tr") == len(table) + 1
    assert "test accuracy (%)" in page and " ± " in page  # the Markdown table's readable form
    other = pd.DataFrame({"model": ["m"], "p_value": [0.000123456], "n": [3]})
    assert "<th>p (two-sided)</th>" in figures.table_html(other, "x") and "0.00012" in figures.table_html(other, "x")


def test_confidence_curves(tmp_path):
    paths = []
    for i, n in enumerate((6, 4)):
        path = tmp_path / f"sis{i}.npz"
        backselect_result(n, i, np.linspace(0.5, 1, n)).save(path)
        paths += ["--entry", f"model{i}", str(path)]
    assert main(["figures", "confidence-curves", *paths, "--tau", "0.9", "--out", str(tmp_path / "conf")]) == 0
    assert_figure_files(tmp_path / "conf")
    result = backselect_result(5, 0, np.full(5, 0.8))
    result.save(tmp_path / "five.npz", steps=True)
    arrays = read_step_arrays([tmp_path / "five.npz"], ("full_confidence", "step_values"))
    fig = figures.confidence_curves([("a", arrays), ("b", arrays), ("c", arrays)], tmp_path / "c3", 0.9)
    assert len(fig.axes) == 6  # per model: the whole ordering and the last removals
    mean_line = fig.axes[0].lines[0]
    assert mean_line.get_ydata()[0] == pytest.approx(0.8)  # starts at f of the full image
    assert mean_line.get_ydata()[-1] == pytest.approx(result.values[:, -1].mean())
    assert mean_line.get_xdata()[-1] == 1.0 and len(mean_line.get_xdata()) == result.num_steps + 1


def test_sis_size_figure_from_the_analysis_tables(tmp_path):
    """The SIS size tables written by the analysis command, plotted with their Mann-Whitney test; a model
    without any image at tau gets a note instead of an empty plot."""
    n = 40
    result = backselect_result(n, 3, np.linspace(0.95, 1.0, n))
    result.save(tmp_path / "sis.npz")
    labels = np.arange(n) % 10
    predictions = np.where(np.arange(n) % 4 == 0, (labels + 1) % 10, labels)
    pd.DataFrame({"index": np.arange(n), "label": labels, "prediction": predictions, "confidence": 0.99,
                  "label_probability": 0.5}).to_csv(tmp_path / "full.csv", index=False)
    backselect_result(5, 4, np.full(5, 0.5)).save(tmp_path / "low.npz")
    assert main(["tables", "sis-sizes", "--tau", "0.97", "--entry", "good", str(tmp_path / "sis.npz"),
                 str(tmp_path / "full.csv"), "--entry", "low", str(tmp_path / "low.npz"), str(tmp_path / "full.csv"),
                 "--per-image-dir", str(tmp_path / "sizes"), "--summary", str(tmp_path / "summary")]) == 0
    assert main(["figures", "sis-sizes", "--entry", "good", str(tmp_path / "sizes/good.csv"), "--entry", "low",
                 str(tmp_path / "sizes/low.csv"), "--summary", str(tmp_path / "summary.csv"), "--tau", "0.97",
                 "--out", str(tmp_path / "sizes_fig")]) == 0
    assert_figure_files(tmp_path / "sizes_fig")

    summary = pd.read_csv(tmp_path / "summary.csv")
    frames = {m: pd.read_csv(tmp_path / f"sizes/{m}.csv") for m in ("good", "low")}
    fig = figures.sis_size_figure(frames, summary, tmp_path / "again", 0.97)
    good, low = fig.axes
    texts = [t.get_text() for t in good.texts]
    u = summary.set_index("model").loc["good", "mannwhitney_u"]
    assert any(f"U = {u:,.0f}" in t for t in texts)
    legend = [t.get_text() for t in good.get_legend().get_texts()]
    assert legend[0].startswith(f"correct: n = {frames['good']['correct'].sum()}")
    assert "no test image reaches" in low.texts[0].get_text()


@pytest.fixture(scope="module")
def sis_example_inputs(cifar_npz, tmp_path_factory):
    """A saved (untrained) tiny model and a BackSelect result over the first 60 test images in which
    every third image reaches tau; indices are dataset rows in shuffled order."""
    directory = tmp_path_factory.mktemp("sis_examples")
    torch.manual_seed(0)
    save_model(directory / "model.pt", build_model("tiny"), "tiny")
    rows = np.random.default_rng(1).permutation(60)
    confidence = np.where(rows % 3 == 0, 0.995, 0.5)
    backselect_result(60, 5, confidence, index=rows).save(directory / "sis.npz")
    return directory


def test_sis_examples_sheet(cifar_npz, sis_example_inputs, tmp_path):
    d = sis_example_inputs
    out = tmp_path / "sheet"
    assert main(["figures", "sis-examples", "--data", str(cifar_npz), "--model", str(d / "model.pt"), "--sis",
                 str(d / "sis.npz"), "--tau", "0.99", "--per-class", "2", "--out", str(out)]) == 0
    assert_figure_files(out)

    # The same sheet drawn directly, to check what it shows against an independent computation.
    result = BackSelectResult.load(d / "sis.npz")
    split = load_split(cifar_npz, "test")
    labels = split.labels[result.index].numpy()
    picks = figures.pick_examples(result, labels, 0.99, 2, 10)
    for c, chosen in enumerate(picks):
        eligible = sorted(result.index[(labels == c) & (result.full_confidence >= 0.99)])
        assert list(result.index[chosen]) == eligible[:2]  # the first of the class in dataset order
    masks = sis_mask(result, 0.99)
    shown = [i for p in picks for i in p]
    normalizer = Normalizer()
    keep = torch.from_numpy(np.stack([masks[i] for i in shown]).reshape(-1, 1, 32, 32))
    images = split.images[result.index]
    probs = predict(load_model(d / "model.pt"), normalizer(images[shown], keep))
    confidence = np.full(len(result), np.nan)
    confidence[shown] = probs[torch.arange(len(shown)), torch.from_numpy(result.target[shown])].numpy()
    fig = figures.sis_examples(images.numpy(), labels, result, masks, confidence, picks, split.classes,
                               normalizer, tmp_path / "direct", 0.99, "title")
    panels = picture_axes(fig)
    assert len(panels) == 3 * len(shown)  # image, SIS, mask per example
    sis_titles = [ax.get_title() for ax in panels if ax.get_title().startswith("f = ")]
    assert sis_titles == [f"f = {confidence[i]:.3f}" for i in shown]
    # The SIS panel shows kept pixels as they are and every other pixel in the mean colour.
    sis_picture = [ax for ax in panels if ax.get_title().startswith("f = ")][0].images[0].get_array()
    first = shown[0]
    mean_colour = normalizer.denormalize(torch.zeros(1, 3, 1, 1))[0, :, 0, 0].numpy()
    masked = ~masks[first].reshape(32, 32)
    assert np.allclose(sis_picture[masked], mean_colour, atol=1e-6)
    original = images[first].permute(1, 2, 0).numpy() / 255
    assert np.allclose(sis_picture[~masked], original[~masked], atol=1e-5)

    # --classes 3: rows for the first three classes with an image at tau; only their images are read.
    few = tmp_path / "few"
    assert main(["figures", "sis-examples", "--data", str(cifar_npz), "--model", str(d / "model.pt"), "--sis",
                 str(d / "sis.npz"), "--tau", "0.99", "--per-class", "2", "--classes", "3", "--out", str(few)]) == 0
    assert_figure_files(few)
    with_examples = [c for c, chosen in enumerate(picks) if chosen][:3]
    from PIL import Image

    with Image.open(few.with_suffix(".png")) as sheet, Image.open(out.with_suffix(".png")) as full_sheet:
        assert len(with_examples) == 3 and sheet.height < 0.5 * full_sheet.height  # 3 rows instead of 10


def test_sis_examples_without_confident_images(cifar_npz, sis_example_inputs, tmp_path):
    d = sis_example_inputs
    assert main(["figures", "sis-examples", "--data", str(cifar_npz), "--model", str(d / "model.pt"), "--sis",
                 str(d / "sis.npz"), "--tau", "0.999", "--out", str(tmp_path / "none")]) == 0
    assert_figure_files(tmp_path / "none")


def test_sis_examples_reject_foreign_results(cifar_npz, sis_example_inputs, tmp_path, capsys):
    backselect_result(2, 0, [1.0, 1.0], index=np.array([0, 10**6])).save(tmp_path / "far.npz")
    code = main(["figures", "sis-examples", "--data", str(cifar_npz), "--model",
                 str(sis_example_inputs / "model.pt"), "--sis", str(tmp_path / "far.npz"), "--tau", "0.9",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "refers to test image 1000000" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The smoke workflow: every figure and table exists, and the report holds them all


def expected_outputs(model="tiny-s0"):
    controls = [f"controls_{name}" for name in ("smoothed", "targeted", "masking", "swap")]
    names = ["training_curves", "table1", "fraction_sweep", "confidence_curves", "sis_sizes", "misclassified_sis",
             f"sis_examples/{model}", f"retrain_curves/{model}", *controls]
    figures_ = [f"results/figures/{name}.{ext}" for name in names for ext in ("png", "pdf")]
    tables = [f"results/tables/{t}.{ext}" for t in ("table1", "fraction_sweep", "sis_sizes", "sis_agreement",
                                                     "misclassified_sis", *controls)
              for ext in ("csv", "md", "html")]
    return figures_, tables + ["results/tables/table1.tex"]


@pytest.mark.slow
def test_smoke_run_draws_every_figure_and_table(smoke_run):
    figures_, tables = expected_outputs()
    for path in figures_:
        assert (smoke_run / path).stat().st_size > 2000, path
        assert (smoke_run / path).read_bytes()[:4] in (PNG_MAGIC[:4], b"%PDF"), path
    for path in tables:
        assert (smoke_run / path).stat().st_size > 0, path
    assert (smoke_run / "logs/figures/sis_examples/tiny-s0.log").exists()


@pytest.mark.slow
def test_smoke_report_contains_every_figure_and_table(smoke_run):
    configs = (REPO / "config/smoke.yaml", smoke_run / "source.yaml")
    snakemake(smoke_run, "--report", "results/report.html", configfiles=configs)
    report = (smoke_run / "results/report.html").read_text()
    assert len(report) > 100_000
    figures_, tables = expected_outputs()
    for path in figures_ + tables:
        if path.endswith((".png", ".html")):
            name = path.rsplit("/", 1)[1]
            assert name in report, f"{path} is not in the report"
    for category in ("1. Training", "2. Backward selection and SIS", "3. Pixel-subset retraining", "4. Mitigation",
                     "7. Controls: what the subsets mean", "8. Out of distribution: CIFAR-10-C"):
        assert category in report
    # Captions are rendered with the configuration's values (smoke: tau 0.1, gradient method, 100 test images).
    assert re.search(r"tau = 0\.1\b", report)
    assert "gradient backward selection" in report and "100 test images" in report


@pytest.mark.slow
def test_the_report_opens_with_the_headline_in_a_browser(smoke_run, browser):
    """The report's front page, as Chromium shows it, is this run's Table 1 and key numbers; screenshots of
    it and of two figures are kept beside the report."""
    from PIL import Image

    # `make run` built the report and said where it is.
    assert "The results: results/report.html" in (smoke_run / "console.txt").read_text()
    table1 = pd.read_csv(smoke_run / "results/tables/table1.csv")
    full = table1[table1["condition"] == "full images"].iloc[0]
    bs = table1[table1["condition"] == "backward selection (trained and tested)"].iloc[0]
    shots = smoke_run / "results/screenshots"
    shots.mkdir(exist_ok=True)
    browser.set_window_size(1400, 1000)
    browser.get((smoke_run / "results/report.html").as_uri())
    text = ""
    for _ in range(100):  # the report is a script-built page: wait until the front page is there
        text = browser.execute_script("return document.body.innerText")
        if "Key numbers" in text:
            break
        time.sleep(0.1)
    browser.save_screenshot(str(shots / "report-front.png"))
    assert "this run's results" in text and "Key numbers" in text and "Table 1: 5% of the pixels kept" in text
    assert f"{100 * full.accuracy_mean:.1f}% ± {100 * full.accuracy_std:.1f} test accuracy on full images" in text
    assert f"backward selection: {100 * bs.accuracy_mean:.1f}% ± {100 * bs.accuracy_std:.1f}" in text
    assert "tiny trained for 2 epochs on 200 training images of CIFAR-10 (seeds 0, 1); tested on 100" in text
    assert "SIS sizes of tiny-s0 at τ = 0.1" in text and "tiny-dropout-s0" not in text.split("Table 1")[0]
    assert "{'" not in text  # no configuration dict on the front page
    for name in ("table1", "sis_sizes"):
        browser.get((smoke_run / f"results/figures/{name}.png").as_uri())
        browser.save_screenshot(str(shots / f"{name}.png"))
    for shot in shots.glob("*.png"):
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
        assert pixels.shape == (1000, 1400) or pixels.shape[1] >= 1000, shot
        assert pixels.std() > 10, f"{shot} is blank"


def test_readable_tables_name_columns_in_words_and_show_shares_in_percent():
    from overinterp.analysis import readable_table

    mitigation = pd.DataFrame({"model": ["m-s0"], "own_bs_accuracy": [0.1234], "images_at_tau": [1200],
                               "p_value": [0.00001], "tau": [0.99], "something_new": [0.123456]})
    table = readable_table(mitigation)
    assert list(table.columns) == ["model", "accuracy on its BS subsets (%)", "images with f ≥ τ", "p (two-sided)",
                                   "τ", "something new"]
    assert table.iloc[0].tolist() == ["m-s0", "12.3", "1,200", "< 0.0001", "0.99", "0.123"]
    page = figures.table_html(mitigation, "Mitigation")
    assert "own_bs_accuracy" not in page and "accuracy on its BS subsets (%)" in page and "12.3" in page
