"""``overinterp audit``: does a trained classifier overinterpret? Its accuracy, its SIS, its own subsets.

No retraining: on one split of a dataset (any adapter of :mod:`overinterp.datasets`) and a classifier in any
form :mod:`overinterp.classifiers` accepts, the audit

1. predicts every image (accuracy, confidence);
2. runs backward selection on every image towards its predicted class (exact, or the batched gradient
   variant for large images), checkpointed so that a killed audit resumes where it stopped;
3. derives each image's SIS at several thresholds tau and compares SIS sizes of correctly classified and
   misclassified images (medians, a Mann-Whitney test, a bootstrap interval of the difference);
4. shows the model its own backward-selection subsets and random subsets of the same size at a sweep of
   kept fractions, and measures accuracy, agreement with its full-image prediction and confidence;
5. writes CSV/JSON of every number, the raw orderings (``backselect.npz``, a :class:`BackSelectResult`),
   figures, and a self-contained ``report.html`` that opens with the headline.

The one-number summary, the *overinterpretation share*, is the share of audited images that the model
classifies with confidence >= tau (0.99 by default) from at most 5% of their pixels, i.e. whose SIS at tau
holds at most 5% of the image.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .classifiers import OUTPUTS, Classifier, load_classifier, parse_normalize, probe_output
from .datasets import Dataset, ImageSet, open_dataset
from .sis import BackSelect, BackSelectResult, GradientBackSelect, keep_last, kept_count, sis_mask, sis_size
from .sis_commands import merge_shards, run_shard
from .subsets import random_keep
from .utils import DataError, atomic_path, resolve_device, save_dataframe, save_json

log = logging.getLogger(__name__)

SMALL_SUBSET = 0.05  # the overinterpretation share counts SIS of at most this fraction of the pixels


@dataclass
class AuditSettings:
    tau: float = 0.99
    taus: tuple[float, ...] = (0.7, 0.9, 0.99)
    fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    method: str = "exact"
    pixels_per_step: int | None = None  # gradient method; None: 0.5% of the pixels
    batch_size: int | None = None
    dtype: str = "float32"
    random_seed: int = 0
    bootstrap: int = 2000
    examples: int = 4
    checkpoint_seconds: float = 30.0

    def __post_init__(self):
        self.taus = tuple(sorted(set(self.taus) | {self.tau}))
        for tau in self.taus:
            if not 0 < tau < 1:
                raise DataError(f"tau must lie strictly between 0 and 1, not {tau}")
        for fraction in self.fractions:
            if not 0 < fraction <= 1:
                raise DataError(f"kept fractions must lie in (0, 1], not {fraction}")
        if self.method not in ("exact", "gradient"):
            raise DataError(f"method must be exact or gradient, not {self.method!r}")


@dataclass
class Audit:
    """Everything an audit measured; ``summary`` holds the headline numbers."""

    images: ImageSet
    result: BackSelectResult
    predictions: pd.DataFrame
    sis_summary: pd.DataFrame
    subsets: pd.DataFrame
    summary: dict = field(default_factory=dict)


def _images_digest(images: ImageSet) -> str:
    digest = hashlib.sha1(images.images.numpy().tobytes())
    digest.update("\n".join(images.ids).encode())
    return digest.hexdigest()


def _probabilities(model: torch.nn.Module, x: torch.Tensor, device, dtype, batch_size: int = 256) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for chunk in x.split(batch_size):
            out.append(model(chunk.to(device, dtype)).double().softmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def _masked(x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """``x`` (engine inputs, masked = 0) with the pixels where ``keep`` (N, H*W) is False masked."""
    n, _, height, width = x.shape
    return x * torch.from_numpy(keep).view(n, 1, height, width).to(x.dtype)


def median_difference(wrong: np.ndarray, right: np.ndarray, repeats: int, seed: int) -> tuple[float, float, float]:
    """Median SIS size of misclassified minus correct images, and its percentile-bootstrap 95% interval."""
    if not len(wrong) or not len(right):
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(wrong, (repeats, len(wrong))), 1) - np.median(rng.choice(right, (repeats, len(right))), 1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return float(np.median(wrong) - np.median(right)), float(low), float(high)


def sis_size_summary(predictions: pd.DataFrame, taus, repeats: int, seed: int) -> pd.DataFrame:
    """Per tau: how many images reach it, and SIS sizes (percent of pixels) of correct vs misclassified ones,
    with the median difference, its bootstrap interval, a two-sided Mann-Whitney U test and the rank-biserial
    effect size (positive: misclassified images have larger SIS)."""
    rows = []
    for tau in taus:
        size = predictions[f"sis_percent_tau{tau:g}"]
        confident = size.notna()
        right = size[confident & predictions["correct"]].to_numpy()
        wrong = size[confident & ~predictions["correct"]].to_numpy()
        diff, low, high = median_difference(wrong, right, repeats, seed)
        p = effect = np.nan
        if len(right) and len(wrong):
            test = stats.mannwhitneyu(wrong, right, alternative="two-sided")
            p, effect = float(test.pvalue), float(2 * test.statistic / (len(wrong) * len(right)) - 1)
        rows.append({
            "tau": tau, "images": len(predictions), "confident": int(confident.sum()),
            "correct": len(right), "misclassified": len(wrong),
            "median_sis_percent_correct": float(np.median(right)) if len(right) else np.nan,
            "median_sis_percent_misclassified": float(np.median(wrong)) if len(wrong) else np.nan,
            "median_difference": diff, "difference_ci_low": low, "difference_ci_high": high,
            "mann_whitney_p": p, "rank_biserial": effect,
        })
    return pd.DataFrame(rows)


def subset_sweep(model, x: torch.Tensor, result: BackSelectResult, labels: np.ndarray, settings: AuditSettings,
                 device, dtype) -> pd.DataFrame:
    """The model on its own backward-selection subsets and on random subsets of the same size, per fraction."""
    predicted = result.target
    rows = []
    for fraction in settings.fractions:
        count = kept_count(result.num_pixels, fraction)
        keeps = {"backselect": keep_last(result, n=count),
                 "random": random_keep(len(result), result.num_pixels, count, settings.random_seed)}
        for subset, keep in keeps.items():
            probs = _probabilities(model, _masked(x, keep), device, dtype).numpy()
            on_predicted = probs[np.arange(len(probs)), predicted]
            rows.append({
                "fraction": fraction, "pixels": count, "subset": subset,
                "accuracy": float((probs.argmax(1) == labels).mean()),
                "agreement": float((probs.argmax(1) == predicted).mean()),
                "confidence": float(on_predicted.mean()),
                "share_above_tau": float((on_predicted >= settings.tau).mean()),
            })
    return pd.DataFrame(rows)


def baseline_colour(dataset: Dataset, classifier: Classifier, images: ImageSet, given=None) -> tuple[float, ...]:
    """The dataset-mean colour masked pixels take: ``given``, else the dataset's own (CIFAR-10, ImageNet),
    else the mean of the model's normalisation (the mean of the data it was trained on), else, for a model of
    raw [0, 1] inputs, the mean colour of the audited images."""
    if given is not None:
        return tuple(float(v) for v in given)
    if dataset.mean_colour() is not None:
        return tuple(dataset.mean_colour())
    if classifier.normalize is not None:
        return tuple(classifier.normalize[0])
    return tuple((images.images.double().mean(dim=(0, 2, 3)) / 255).tolist())


def run_audit(classifier: Classifier, dataset: Dataset, split: str, out_dir, settings: AuditSettings,
              limit: int | None = None, device: str = "auto", normalize="unknown", mean_colour=None,
              shard: tuple[int, int] | None = None, orderings: list | None = None) -> Audit | None:
    """Audit ``classifier`` on ``split`` of ``dataset``; writes everything under ``out_dir`` (see the module).

    For audits spread over several jobs (the workflow's audit rules): ``shard=(i, n)`` computes only the
    orderings of the i-th of n parts of the images into the file ``out_dir`` and returns None;
    ``orderings`` (the n shard files) then stand in for the orderings in the audit itself.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    device = resolve_device(device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[settings.dtype]
    images = dataset.load(split, limit)
    if not len(images):
        raise DataError(f"{split} of {dataset.name} holds no images")
    log.info("auditing %s on %d %s images of %s (%dx%d)", classifier.source, len(images), split, dataset.name,
             *images.images.shape[2:])
    if normalize != "unknown":
        classifier.normalize = normalize
    elif classifier.normalize == "unknown":
        classifier.normalize = dataset.normalize
    colour = baseline_colour(dataset, classifier, images, mean_colour)
    if settings.method == "exact":
        settings.pixels_per_step = 1
    elif settings.pixels_per_step is None:
        settings.pixels_per_step = max(1, round(0.005 * images.images.shape[2] * images.images.shape[3]))
    probe_output(classifier, classifier.model_inputs(images.images[:8]), len(images.classes))
    model = classifier.engine_model(colour).to(device, dtype)
    x = classifier.engine_inputs(images.images, colour, dtype)

    meta = {
        "model": classifier.source, "output": classifier.output,
        "normalize": None if classifier.normalize is None else [list(v) for v in classifier.normalize],
        "mean_colour": list(colour), "dataset": dataset.name, "split": split, "images": len(images),
        "images_sha1": _images_digest(images), "method": settings.method,
        "pixels_per_step": settings.pixels_per_step, "dtype": settings.dtype, "evaluator": "full-forward",
    }
    if shard is not None:
        part, parts = shard
        if not 0 <= part < parts:
            raise DataError(f"shard {part} of {parts} does not exist: shards are numbered 0..{parts - 1}")
        rows = np.array_split(np.arange(len(images)), parts)[part]
        run_shard(_engine(model, settings, dtype), x[torch.from_numpy(rows)], rows, out_dir,
                  {**meta, "shard": part, "shards": parts}, settings.checkpoint_seconds)
        return None
    reused = False
    if orderings:
        result = _merged(orderings, meta)
        result.save(out_dir / "backselect.npz")
    else:
        result = _reuse(out_dir / "backselect.npz", meta)
        reused = result is not None
        if result is None:
            result = run_shard(_engine(model, settings, dtype), x, np.arange(len(images)), out_dir / "backselect.npz",
                               meta, settings.checkpoint_seconds)
    sis_seconds = time.monotonic() - started

    labels = images.labels
    predictions = pd.DataFrame({
        "id": images.ids, "label": labels, "label_name": [images.classes[i] for i in labels],
        "prediction": result.target, "prediction_name": [images.classes[i] for i in result.target],
        "correct": result.target == labels, "confidence": result.full_confidence,
    })
    for tau in settings.taus:
        predictions[f"sis_percent_tau{tau:g}"] = 100 * sis_size(result, tau) / result.num_pixels
    sis_summary = sis_size_summary(predictions, settings.taus, settings.bootstrap, settings.random_seed)
    subsets = subset_sweep(model, x, result, labels, settings, device, dtype)

    headline = predictions[f"sis_percent_tau{settings.tau:g}"]
    small = subsets[subsets["fraction"] == SMALL_SUBSET] if SMALL_SUBSET in settings.fractions else None
    summary = {
        "model": classifier.source, "dataset": dataset.name, "split": split, "images": len(images),
        "image_size": list(images.images.shape[2:]), "classes": len(images.classes),
        "output": classifier.output, "normalize": meta["normalize"], "mean_colour": list(colour),
        "method": settings.method, "tau": settings.tau,
        "accuracy": float(predictions["correct"].mean()),
        "mean_confidence": float(predictions["confidence"].mean()),
        "confident_share": float(headline.notna().mean()),
        "median_sis_percent": float(headline.median()) if headline.notna().any() else None,
        "overinterpretation_share": float((headline <= 100 * SMALL_SUBSET).mean()),
        "seconds": round(time.monotonic() - started, 1), "sis_seconds": round(sis_seconds, 1),
        "orderings": "reused" if reused else "sharded" if orderings else "computed",
        "settings": asdict(settings),
    }
    if small is not None:
        for subset in ("backselect", "random"):
            summary[f"{subset}_5pct_accuracy"] = float(small.loc[small["subset"] == subset, "accuracy"].iloc[0])
    audit = Audit(images, result, predictions, sis_summary, subsets, summary)
    write_outputs(audit, model, x, out_dir, settings, device, dtype)
    return audit


def _engine(model, settings: AuditSettings, dtype) -> BackSelect | GradientBackSelect:
    if settings.method == "exact":
        return BackSelect(model, baseline=0.0, batch_size=settings.batch_size, dtype=dtype)
    return GradientBackSelect(model, settings.pixels_per_step, baseline=0.0, batch_size=settings.batch_size,
                              dtype=dtype)


def _merged(paths, meta: dict) -> BackSelectResult:
    """The orderings of all images from the shard files of this very audit, saved as ``backselect.npz``."""
    result = merge_shards(paths)
    differ = sorted(k for k in meta if k != "images_sha1" and result.meta.get(k) != meta[k])
    if differ or not np.array_equal(result.index, np.arange(meta["images"])):
        raise DataError(f"the shard files {paths[0]}, ... were made with another {', '.join(differ) or 'image set'} "
                        "than this audit; delete them and rerun their jobs")
    result.meta = meta
    return result


def _reuse(path: Path, meta: dict) -> BackSelectResult | None:
    """A finished ``backselect.npz`` of the same audit (model, images, settings): nothing to recompute."""
    if not path.exists():
        return None
    try:
        result = BackSelectResult.load(path)
    except DataError as err:
        log.warning("recomputing the orderings: %s", err)
        return None
    if result.meta != meta:
        log.warning("%s was made with another model, other images or settings; recomputing it", path)
        return None
    log.info("reusing the orderings in %s", path)
    return result


# ----------------------------------------------------------------------------------------------------------
# Outputs: tables, figures, report


def write_outputs(audit: Audit, model, x, out_dir: Path, settings: AuditSettings, device, dtype) -> None:
    from . import figures

    save_dataframe(out_dir / "predictions.csv", audit.predictions)
    save_dataframe(out_dir / "sis_sizes.csv", audit.sis_summary)
    save_dataframe(out_dir / "subsets.csv", audit.subsets)
    figures.audit_sis_sizes(audit.predictions, settings.taus, out_dir / "sis-sizes")
    figures.audit_subsets(audit.subsets, out_dir / "subsets", chance=1 / len(audit.images.classes),
                          tau=settings.tau)
    masks = sis_mask(audit.result, settings.tau)
    sis_only = np.array([np.nan] * len(masks))
    rows = [i for i, m in enumerate(masks) if m is not None]
    if rows:
        keep = np.stack([masks[i] for i in rows])
        probs = _probabilities(model, _masked(x[rows], keep), device, dtype).numpy()
        sis_only[rows] = probs[np.arange(len(rows)), audit.result.target[rows]]
    figures.audit_examples(audit, masks, sis_only, settings, out_dir / "examples")
    save_json(out_dir / "summary.json", audit.summary)
    with atomic_path(out_dir / "report.html") as tmp:
        Path(tmp).write_text(report_html(audit, out_dir), encoding="utf-8")


def _percent(value) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}%"


def _points(value) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.1f}%"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


REPORT_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 60em; margin: 1em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
.headline { display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }
.number { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; min-width: 10em; }
.number b { display: block; font-size: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { padding: 3px 8px; text-align: right; border-bottom: 1px solid #ddd; }
td { white-space: nowrap; }
th { border-bottom: 2px solid #333; background: #f6f6f6; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
.wide { overflow-x: auto; }
"""


def _table(frame: pd.DataFrame) -> str:
    return '<div class="wide">' + frame.to_html(index=False, na_rep="–", border=0, escape=True) + "</div>"


def report_html(audit: Audit, out_dir: Path) -> str:
    s = audit.summary
    tau = s["tau"]
    numbers = [
        ("accuracy", _percent(s["accuracy"]), f"on {s['images']} {s['split']} images"),
        ("overinterpretation share", _percent(s["overinterpretation_share"]),
         f"of images classified with confidence ≥ {tau:g} from ≤ 5% of their pixels"),
        ("median SIS", "–" if s["median_sis_percent"] is None else f"{s['median_sis_percent']:.1f}%",
         f"of the pixels, over the {_percent(s['confident_share'])} of images with confidence ≥ {tau:g}"),
    ]
    if "backselect_5pct_accuracy" in s:
        numbers.append(("5% subsets", f"{_percent(s['backselect_5pct_accuracy'])} vs {_percent(s['random_5pct_accuracy'])}",
                        "accuracy on its own backward-selection 5% vs random 5% of the pixels"))
    cards = "".join(f'<div class="number">{html.escape(title)}<b>{html.escape(value)}</b>{html.escape(note)}</div>'
                    for title, value, note in numbers)
    table = audit.sis_summary
    sizes = pd.DataFrame({
        "τ": table["tau"].map("{:g}".format), "confidence ≥ τ": table["confident"],
        "correct": table["correct"], "misclassified": table["misclassified"],
        "median SIS (correct)": table["median_sis_percent_correct"].map(_points),
        "median SIS (misclassified)": table["median_sis_percent_misclassified"].map(_points),
        "difference [95% CI]": [f"{_points(d)} [{_points(lo)}, {_points(hi)}]" if not np.isnan(d) else "–"
                                for d, lo, hi in zip(table["median_difference"], table["difference_ci_low"],
                                                     table["difference_ci_high"])],
        "Mann-Whitney p": table["mann_whitney_p"].map(lambda v: "–" if np.isnan(v) else f"{v:.2g}"),
        "rank-biserial r": table["rank_biserial"].map(lambda v: "–" if np.isnan(v) else f"{v:+.2f}"),
    })
    sweep = audit.subsets.copy()
    sweep["kept"] = [f"{100 * f:g}% ({p} px)" for f, p in zip(sweep["fraction"], sweep["pixels"])]
    sweep = sweep[["kept", "subset", "accuracy", "agreement", "confidence", "share_above_tau"]]
    sweep.columns = ["kept pixels", "subset", "accuracy", "agrees with full image",
                     "mean confidence (predicted class)", f"share ≥ τ = {tau:g}"]
    for column in sweep.columns[2:]:
        sweep[column] = sweep[column].map(_percent)
    normalize = "raw [0, 1] RGB" if s["normalize"] is None else (
        f"inputs normalised with mean {', '.join(f'{v:.3f}' for v in s['normalize'][0])}, "
        f"std {', '.join(f'{v:.3f}' for v in s['normalize'][1])}")
    step = s["settings"]["pixels_per_step"]
    method = ("exact backward selection" if s["method"] == "exact" else
              f"batched gradient backward selection ({step} pixels per step, so SIS sizes come in steps of "
              f"{step} pixels, {100 * step / (s['image_size'][0] * s['image_size'][1]):.2g}% of the image)")
    settings = (f"{html.escape(s['model'])} on {s['images']} images of the {html.escape(s['split'])} split of "
                f"{html.escape(s['dataset'])} ({s['image_size'][0]}×{s['image_size'][1]} pixels, {s['classes']} "
                f"classes). The model takes {normalize} and returns {s['output']}. Masked pixels take the "
                f"dataset-mean colour ({', '.join(f'{v:.3f}' for v in s['mean_colour'])}). Orderings by {method} "
                f"towards the predicted class; {s['seconds']:.0f} s in all"
                + {"reused": " (the orderings of an earlier run were reused).",
                   "sharded": " (the orderings came from shard jobs)."}.get(s["orderings"], "."))
    files = ", ".join(f"<code>{name}</code>" for name in (
        "summary.json", "predictions.csv", "sis_sizes.csv", "subsets.csv", "backselect.npz"))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Overinterpretation audit: {html.escape(s['model'])}</title>
<style>{REPORT_CSS}</style></head><body>
<h1>Overinterpretation audit</h1>
<p>{settings}</p>
<div class="headline">{cards}</div>
<p>The <b>overinterpretation share</b> counts images whose sufficient input subset (SIS) at τ = {tau:g} holds
at most 5% of the pixels: the model is that confident from a few scattered pixels, with every other pixel in
the mean colour, which no human can classify. High values mean the model relies on signals humans do not see.</p>
<h2>Its own subsets against random subsets</h2>
<p>The model sees only the last-removed pixels of its own backward selection, or as many random pixels. A large
gap at small fractions means a few specific pixels carry its decision.</p>
{_image(out_dir / 'subsets.png', 'accuracy on backward-selection and random subsets')}
{_table(sweep)}
<h2>SIS sizes, correct against misclassified images</h2>
<p>Per threshold τ: SIS sizes in percent of the pixels, for images whose full-image confidence reaches τ.
The difference is misclassified minus correct (medians, percentage points), with a bootstrap 95% interval;
the Mann-Whitney test is two-sided; r &gt; 0 means misclassified images tend to have larger SIS.</p>
{_image(out_dir / 'sis-sizes.png', 'SIS size distributions')}
{_table(sizes)}
<h2>Examples</h2>
{_image(out_dir / 'examples.png', 'example images with their SIS')}
<h2>Files</h2>
<p>Every number is in {files} beside this page; <code>backselect.npz</code> holds the raw orderings
(<code>overinterp.sis.BackSelectResult.load</code>), so other thresholds need no recomputation.</p>
</body></html>
"""


# ----------------------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


def _normalize(text: str):
    try:
        return parse_normalize(text)
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="audit a trained classifier on a dataset for overinterpretation (no retraining)",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a model file of this pipeline, a TorchScript file, an architecture (cifar_resnet20, "
                        "torchvision:resnet18, ...) with --weights, or package.module:factory")
    p.add_argument("--weights", default=None,
                   help="a state-dict file, or a torchvision weights name (IMAGENET1K_V1) for torchvision:NAME")
    p.add_argument("--data", required=True,
                   help="an image folder ROOT (ROOT/<split>/<class>/*), imagenet:ROOT, or cifar10:FILE.npz")
    p.add_argument("--split", default="test", help="the split to audit (default: test)")
    p.add_argument("--limit", type=int, default=None,
                   help="audit at most this many images, class-balanced (default: all)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names in the model's label order (default: sorted folder names)")
    p.add_argument("--crop", type=int, default=None,
                   help="the model's input size: centre crop of this many pixels (default: the model's record)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before the centre crop (default: the crop size)")
    p.add_argument("--normalize", default="auto", type=_normalize,
                   help="what the model takes: auto (the model file's record, else the dataset's convention: "
                        "CIFAR-10's or ImageNet's mean/std), none (raw [0, 1] RGB it normalises itself), "
                        "imagenet, cifar10, or MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B")
    p.add_argument("--mean-colour", type=_floats, default=None,
                   help="R,G,B in [0, 1]: the colour of masked pixels (default: the dataset's mean colour, i.e. "
                        "the mean of the model's normalisation, or of the audited images for a raw-input model)")
    p.add_argument("--output", choices=OUTPUTS, default="auto",
                   help="whether the model returns logits or probabilities (default: detected; "
                        "probabilities are never put through a second softmax)")
    p.add_argument("--tau", type=float, default=0.99, help="SIS confidence threshold of the headline (default 0.99)")
    p.add_argument("--taus", type=_floats, default=(0.7, 0.9, 0.99),
                   help="thresholds of the SIS-size tables (default 0.7,0.9,0.99)")
    p.add_argument("--fractions", type=_floats, default=(0.01, 0.02, 0.05, 0.1, 0.2),
                   help="kept fractions of the subset sweep (default 0.01,0.02,0.05,0.1,0.2)")
    p.add_argument("--method", choices=("exact", "gradient"), default="exact",
                   help="exact backward selection (H*W*(H*W+1)/2 forwards per image), or the batched gradient "
                        "variant for large images (default: exact)")
    p.add_argument("--pixels-per-step", type=int, default=None,
                   help="pixels removed per gradient step (default: 0.5%% of the pixels)")
    p.add_argument("--batch-size", type=int, default=None, help="candidates (exact) or images (gradient) per forward")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute precision (float64: exact comparisons, slower)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets and the bootstrap")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--workers", type=int, default=8, help="threads that decode images")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="save finished orderings at most this often; a rerun after a kill resumes (default 30)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="compute only the orderings of part I of N (0-based) into the file --out (for a job of "
                        "a sharded audit; see config/audit.yaml)")
    p.add_argument("--orderings", nargs="+", default=None, metavar="SHARD",
                   help="the shard files of this audit, instead of computing the orderings")
    p.add_argument("--out", required=True, help="output folder (report.html, CSV/JSON, backselect.npz)")
    p.set_defaults(handler=run_audit_command)


def run_audit_command(args: argparse.Namespace) -> int:
    if args.resize and not args.crop:
        raise DataError("--resize needs --crop (the model's input size)")
    frame = (args.resize or args.crop, args.crop) if args.crop else None
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    dataset = open_dataset(args.data, frame, classes, workers=args.workers)
    classifier = load_classifier(args.model, args.weights, num_classes=len(dataset.class_names(args.split)))
    if frame is None and classifier.frame is not None:
        dataset.use_frame(classifier.frame)  # the model file records its input frame
    if args.output != "auto":
        classifier.output = args.output
    settings = AuditSettings(tau=args.tau, taus=args.taus, fractions=args.fractions, method=args.method,
                             pixels_per_step=args.pixels_per_step, batch_size=args.batch_size, dtype=args.dtype,
                             random_seed=args.seed, checkpoint_seconds=args.checkpoint_seconds)
    shard = None
    if args.shard:
        try:
            shard = tuple(int(v) for v in args.shard.split("/"))
            assert len(shard) == 2 and shard[1] > 0
        except (ValueError, AssertionError):
            raise DataError(f"--shard {args.shard!r}: write I/N, e.g. 0/4 for the first of four parts") from None
    audit = run_audit(classifier, dataset, args.split, args.out, settings, args.limit, args.device, args.normalize,
                      args.mean_colour, shard, args.orderings)
    if audit is None:
        return 0
    s = audit.summary
    print(f"accuracy {100 * s['accuracy']:.1f}% on {s['images']} images; overinterpretation share "
          f"{100 * s['overinterpretation_share']:.1f}% (confidence >= {s['tau']:g} from <= 5% of the pixels); "
          f"report: {Path(args.out) / 'report.html'}")
    return 0
