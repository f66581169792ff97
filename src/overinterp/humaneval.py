"""Human evaluation: a browser study of masked test images that leaks no answer, and its scoring.

``build`` writes a self-contained static folder (and a zip of it): ``index.html``, ``study.js``,
``study.css``, ``study-data.js`` (the study id, the class names offered as choices and the opaque image
ids, nothing else) and ``images/<id>.png`` (32x32, no metadata chunks, stored uncompressed so that every
picture has the same file size). It works from ``file://`` and any static host. The answer key (image id
-> condition, class, source image) and a manifest for crowd platforms are written outside the folder.

The image ids come from the operating system's cryptographic random source at build time and exist only
in the answer key: nothing in the configuration, the data or a seed determines them, so knowing all of
those does not map a picture to its condition or class. A rebuild therefore gives new ids, unless the
answer key is passed back in (``--reproduce``) to rebuild that very study. What remains is the honest
limit of any study on a public dataset: a picture's kept pixels are pixels of a public test image, so
matching them against the test set reveals its class (see the README).

``score`` validates response files (the page's CSV), excludes participants who fail the attention checks
(full images), and reports human accuracy per condition with Wilson 95% intervals next to the models'
accuracy on the very same images, as a CSV and a figure.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .data import Normalizer, Split, add_normalization_arguments, load_split
from .utils import atomic_path, load_npz, save_dataframe

log = logging.getLogger(__name__)

ASSETS = Path(__file__).with_name("humaneval_assets")
STATIC_FILES = ("index.html", "study.js", "study.css")
DATA_FILE = "study-data.js"
IMAGE_DIR = "images"
# Condition names as they appear in the answer key and the tables (never in the bundle).
CONDITIONS = ("bs", "random", "full")
CONDITION_LABELS = {"bs": "Backward-selection\nsubset", "random": "Random\nsubset", "full": "Full image\n(attention check)"}
KEY_COLUMNS = ("study", "image_id", "condition", "keep_fraction", "label", "class_name", "source_index", "masks")
REQUIRED_RESPONSE_COLUMNS = ("participant_id", "image_id", "response")
MAX_FIELD_CHARS = 1000  # a participant id, an answer or a time is never longer; a longer field is not a response
# A cell starting with one of these is a formula to spreadsheet programs (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
HUMAN_COLOUR = "#999999"  # grey and hatched; the models take the project's Okabe-Ito cycle


# ----------------------------------------------------------------------------------------------- build
@dataclass
class ConditionSpec:
    """How many images of one condition to show, drawn with ``seed``; ``keep`` None = full images."""

    name: str
    count: int
    seed: int
    keep: torch.Tensor | None = None
    masks: str = ""


def sample_across_classes(labels: np.ndarray, count: int, seed: int, available: np.ndarray) -> np.ndarray:
    """Positions of ``count`` images spread evenly over the classes (the remainder to randomly drawn
    classes), chosen among the ``available`` positions."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = np.full(len(classes), count // len(classes))
    per_class[rng.choice(len(classes), count % len(classes), replace=False)] += 1
    picks = []
    for cls, n in zip(classes, per_class):
        pool = np.flatnonzero((labels == cls) & available)
        if len(pool) < n:
            raise ValueError(
                f"class {cls} has {len(pool)} unused test images but the study needs {n} more; lower the "
                "humaneval counts or use a larger dataset.test_size (conditions never share an image)")
        picks.append(rng.choice(pool, n, replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, dtype=np.int64)


def render(split: Split, positions: np.ndarray, normalizer: Normalizer, keep: torch.Tensor | None) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures as the models see them: masked pixels in the baseline colour."""
    images = split.images[positions]
    x = normalizer(images, None if keep is None else keep[positions])
    rgb = normalizer.denormalize(x).mul(255).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).numpy()


def opaque_ids(count: int) -> list[str]:
    """Distinct 16-hex-digit ids from the cryptographic random source: no seed, config or data
    determines them, so they say nothing of image, class or condition."""
    ids: dict[str, None] = {}
    while len(ids) < count:
        ids[secrets.token_hex(8)] = None
    return list(ids)


def reproduced_ids(key: pd.DataFrame, reproduce: pd.DataFrame, path) -> list[str]:
    """The ids of a previous build's answer key, for a rebuild of exactly that study."""
    columns = ["condition", "source_index"]
    previous = reproduce.set_index(columns)["image_id"]
    wanted = pd.MultiIndex.from_frame(key[columns])
    if len(reproduce) != len(key) or not wanted.isin(previous.index).all():
        raise ValueError(f"--reproduce {path}: that answer key is of another study (other images or conditions "
                         "than these settings draw); rebuild with the settings it was made with")
    return list(previous.loc[wanted])


def write_png(path: Path, rgb: np.ndarray) -> None:
    # Only IHDR, IDAT and IEND (Pillow writes no text/time chunks unless given pnginfo), and stored
    # without compression: a compressed size would tell full images from masked ones.
    Image.fromarray(rgb, "RGB").save(path, format="PNG", compress_level=0)


def build_study(split: Split, normalizer: Normalizer, conditions: list[ConditionSpec],
                reproduce: str | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Sample the images of every condition (no image in two conditions), render them and give each an
    opaque id (fresh, or those of the answer key ``reproduce``). Returns the answer key (without the
    study id) and image id -> picture."""
    if len(split.classes) > 10:
        raise ValueError(f"the page offers number keys 0-9, so at most 10 classes; this dataset has {len(split.classes)}")
    labels = split.labels.numpy()
    available = np.ones(len(labels), dtype=bool)
    rows, pictures = [], []
    for spec in conditions:
        positions = sample_across_classes(labels, spec.count, spec.seed, available)
        available[positions] = False
        pictures.append(render(split, positions, normalizer, spec.keep))
        kept = np.ones(len(positions)) if spec.keep is None else spec.keep[positions].flatten(1).double().mean(1).numpy()
        for pos, fraction in zip(positions, kept):
            rows.append({"condition": spec.name, "keep_fraction": round(float(fraction), 6),
                         "label": int(labels[pos]), "class_name": split.classes[labels[pos]],
                         "source_index": int(split.index[pos]), "masks": spec.masks})
    if not rows:
        raise ValueError("the study has no images: set at least one humaneval count above 0")
    key = pd.DataFrame(rows)
    key.insert(0, "image_id", reproduced_ids(key, read_key(reproduce), reproduce) if reproduce else opaque_ids(len(key)))
    images = dict(zip(key["image_id"], np.concatenate(pictures)))
    key = key.sort_values("image_id", ignore_index=True)  # the id order is random w.r.t. class and condition
    return key, images


def study_id(images: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for image_id in sorted(images):
        digest.update(image_id.encode())
        digest.update(images[image_id].tobytes())
    return digest.hexdigest()[:12]


def write_bundle(folder: Path, key: pd.DataFrame, images: dict[str, np.ndarray], classes: list[str],
                 display_size: int, post_url: str | None) -> None:
    (folder / IMAGE_DIR).mkdir(parents=True)
    for name in STATIC_FILES:
        shutil.copyfile(ASSETS / name, folder / name)
    for image_id in sorted(images):  # in id order: a directory listing may show the order files were made
        write_png(folder / IMAGE_DIR / f"{image_id}.png", images[image_id])
    data = {"study": key["study"].iloc[0], "choices": list(classes), "items": sorted(images),
            "display_size": int(display_size), "post_url": post_url or None}
    (folder / DATA_FILE).write_text(f"window.STUDY_DATA = {json.dumps(data, indent=1)};\n")


def replace_folder(src: Path, dest: Path) -> None:
    """Move a finished folder into place; an older copy is removed only after the new one is complete."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old."))
        os.replace(dest, old / dest.name)
        os.replace(src, dest)
        shutil.rmtree(old)
    else:
        os.replace(src, dest)


def write_zip(folder: Path, path: Path) -> None:
    """A reproducible zip (fixed timestamps, sorted entries) with the folder as its top-level directory.
    Stored, not deflated: compressed sizes in the listing would tell full images from masked ones."""
    with open(path, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{folder.name}/{file.relative_to(folder).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, file.read_bytes(), zipfile.ZIP_STORED)


def manifest(key: pd.DataFrame) -> pd.DataFrame:
    """One row per picture for crowd platforms, in the order of the random ids; URLs relative to the
    bundle's root."""
    ids = sorted(key["image_id"])
    return pd.DataFrame({"task": np.arange(1, len(ids) + 1), "study": key["study"].iloc[0], "image_id": ids,
                         "image_url": [f"{IMAGE_DIR}/{i}.png" for i in ids]})


def build(split: Split, bundle: str, zip_path: str, key_path: str, manifest_path: str,
          conditions: list[ConditionSpec], normalizer: Normalizer, display_size: int = 256,
          post_url: str | None = None, reproduce: str | None = None) -> pd.DataFrame:
    """Build the whole study from ``split`` (the test images the keep-masks belong to); returns the key.
    Bundle, zip, answer key and manifest replace an earlier study together or not at all."""
    bundle = Path(bundle)
    if Path(key_path).resolve().is_relative_to(bundle.resolve()) or Path(manifest_path).resolve().is_relative_to(bundle.resolve()):
        raise ValueError(f"the answer key and manifest must be written outside the study folder {bundle}")
    key, images = build_study(split, normalizer, conditions, reproduce)
    key.insert(0, "study", study_id(images))
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bundle.parent, prefix=f".{bundle.name}.") as tmp:
        staged = Path(tmp) / bundle.name
        write_bundle(staged, key, images, split.classes, display_size, post_url)
        # Each file goes to a temporary name first and all are moved into place only once every one is
        # written: a failure (a full disk, a kill) leaves the old study whole and nothing new beside it.
        with contextlib.ExitStack() as outputs:
            zip_tmp, key_tmp, manifest_tmp = (outputs.enter_context(atomic_path(p)) for p in (zip_path, key_path, manifest_path))
            write_zip(staged, zip_tmp)
            key[list(KEY_COLUMNS)].to_csv(key_tmp, index=False)
            manifest(key).to_csv(manifest_tmp, index=False)
            replace_folder(staged, bundle)  # renames only: nothing left that a full disk can fail
    counts = Counter(key["condition"])
    log.info("study %s: %s images (%s) in %s", key["study"].iloc[0], len(key),
             ", ".join(f"{c} {counts[c]}" for c in CONDITIONS if c in counts), bundle)
    return key


# ----------------------------------------------------------------------------------------------- score
class ResponseError(ValueError):
    """A response file that cannot be scored as it is; names the file and line."""


def read_key(path) -> pd.DataFrame:
    key = pd.read_csv(path, dtype={"image_id": str, "study": str, "masks": str}, keep_default_na=False)
    missing = set(KEY_COLUMNS) - set(key.columns)
    if missing:
        raise ValueError(f"{path} is not an answer key of this study builder: columns {sorted(missing)} are missing")
    if key["image_id"].duplicated().any() or key["study"].nunique() != 1:
        raise ValueError(f"{path}: duplicated image ids or several study ids; it is not one study's answer key")
    return key


def read_responses(paths: list[str], key: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Every row of every response file, validated; any problem raises ``ResponseError`` naming file:line."""
    known = set(key["image_id"])
    study = key["study"].iloc[0]
    valid = set(classes)
    seen: dict[tuple[str, str], str] = {}
    rows = []
    for path in paths:
        with io.StringIO(decode_responses(path), newline="") as handle:
            reader = csv.reader(handle)
            header = next_row(reader, path)
            if header is None:
                raise ResponseError(f"{path}: the file is empty; expected a header with {', '.join(REQUIRED_RESPONSE_COLUMNS)}")
            header = [h.strip() for h in header]
            absent = [c for c in REQUIRED_RESPONSE_COLUMNS if c not in header]
            if absent:
                raise ResponseError(f"{path}:1: header lacks the column(s) {', '.join(absent)} (it has {', '.join(header)})")
            col = {name: header.index(name) for name in header}
            while (row := next_row(reader, path)) is not None:
                where = f"{path}:{reader.line_num}"
                if not row:
                    continue  # a blank line carries no answer
                longest = max(range(len(row)), key=lambda i: len(row[i]))
                if len(row[longest]) > MAX_FIELD_CHARS:
                    raise ResponseError(f"{where}: field {longest + 1} is {len(row[longest])} characters long (at most "
                                        f"{MAX_FIELD_CHARS}); this is not a response file of the study page")
                if len(row) != len(header):
                    raise ResponseError(f"{where}: malformed row with {len(row)} fields, the header has {len(header)}")
                pid, image_id, response = (row[col[c]].strip() for c in REQUIRED_RESPONSE_COLUMNS)
                if not pid:
                    raise ResponseError(f"{where}: empty participant_id")
                if "study" in col and row[col["study"]].strip() != study:
                    raise ResponseError(f"{where}: answers study {row[col['study']]!r}, but the answer key is for "
                                        f"study {study!r}; score it with the key built with that study")
                if image_id not in known:
                    raise ResponseError(f"{where}: unknown image id {image_id!r} (not in the answer key)")
                if response not in valid:
                    raise ResponseError(f"{where}: unknown class name {response!r}; expected one of {', '.join(classes)}")
                for numeric in ("trial", "response_time_ms"):
                    if numeric in col:
                        try:
                            float(row[col[numeric]])
                        except ValueError:
                            raise ResponseError(f"{where}: {numeric} {row[col[numeric]]!r} is not a number") from None
                if (pid, image_id) in seen:
                    raise ResponseError(f"{where}: participant {pid!r} answered image {image_id} a second time "
                                        f"(first at {seen[pid, image_id]})")
                seen[pid, image_id] = where
                rows.append({"file": str(path), "line": reader.line_num, "participant_id": pid,
                             "image_id": image_id, "response": response})
    if not rows:
        raise ResponseError(f"no answers in {', '.join(map(str, paths))}")
    answers = pd.DataFrame(rows).merge(key, on="image_id", how="left", validate="many_to_one")
    answers["correct"] = answers["response"] == answers["class_name"]
    return answers


def decode_responses(path) -> str:
    """The text of a response file; bytes that are not UTF-8 are an error naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ResponseError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
                            "save the file as UTF-8 CSV, as the study page downloads it") from None


def next_row(reader, path) -> list[str] | None:
    """The next CSV row, None at the end; a malformed row names the file and line."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as err:
        raise ResponseError(f"{path}:{reader.line_num}: unreadable CSV ({err})") from None


def neutralize_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula get a leading apostrophe (shown, not run)."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v)
    return frame


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def participant_table(answers: pd.DataFrame, key: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Attention-check accuracy of each participant and whether they are included."""
    checks_in_study = int((key["condition"] == "full").sum())
    rows = []
    for pid, group in answers.groupby("participant_id", sort=True):
        checks = group[group["condition"] == "full"]
        accuracy = checks["correct"].mean() if len(checks) else float("nan")
        if checks_in_study == 0:
            included, reason = True, "the study has no attention checks"
        elif len(checks) == 0:
            included, reason = False, "answered no attention check"
        elif accuracy < threshold:
            included, reason = False, f"attention-check accuracy {accuracy:.3f} below {threshold}"
        else:
            included, reason = True, ""
        rows.append({"participant_id": pid, "files": ";".join(sorted(set(group["file"]))),
                     "answers": len(group), "study_images": len(key), "attention_checks": len(checks),
                     "attention_correct": int(checks["correct"].sum()), "attention_accuracy": accuracy,
                     "included": included, "reason": reason})
    return pd.DataFrame(rows)


def parse_model_predictions(spec: str) -> tuple[str, str, str]:
    """``NAME:CONDITION=CSV`` -> (name, condition, path)."""
    left, sep, path = spec.partition("=")
    name, colon, condition = left.rpartition(":")
    if not sep or not colon or not name or not path or condition not in CONDITIONS:
        raise ValueError(f"--model-predictions {spec!r}: expected NAME:CONDITION=CSV with CONDITION one of "
                         f"{', '.join(CONDITIONS)}, e.g. cifar_resnet20-s0:bs=results/eval/cifar_resnet20-s0/exact-bs-0.05.csv")
    return name, condition, path


def model_accuracy(name: str, condition: str, path: str, key: pd.DataFrame) -> dict:
    """Accuracy of one model's per-image predictions on the study's images of ``condition``."""
    items = key[key["condition"] == condition]
    predictions = pd.read_csv(path)
    missing = {"index", "label", "prediction"} - set(predictions.columns)
    if missing:
        raise ValueError(f"{path}: not a predictions table (columns {sorted(missing)} missing)")
    predictions = predictions.set_index("index")
    absent = sorted(set(items["source_index"]) - set(predictions.index))
    if absent:
        raise ValueError(f"{path} has no predictions for {len(absent)} of the study's {condition} images "
                         f"(e.g. test index {absent[0]}): it was made on other test images than the study")
    rows = predictions.loc[items["source_index"]]
    if not np.array_equal(rows["label"].to_numpy(), items["label"].to_numpy()):
        raise ValueError(f"{path}: its labels differ from the answer key's for the same test images; "
                         "the predictions and the study come from different datasets")
    correct = int((rows["prediction"].to_numpy() == items["label"].to_numpy()).sum())
    low, high = wilson_interval(correct, len(items))
    return {"rater": name, "kind": "model", "condition": condition, "images": len(items), "participants": np.nan,
            "answers": len(items), "correct": correct, "accuracy": correct / len(items) if len(items) else np.nan,
            "ci_low": low, "ci_high": high, "predictions": str(path)}


def human_accuracy(answers: pd.DataFrame, key: pd.DataFrame) -> list[dict]:
    rows = []
    for condition in CONDITIONS:
        n_images = int((key["condition"] == condition).sum())
        if n_images == 0:
            continue
        subset = answers[answers["condition"] == condition]
        correct, n = int(subset["correct"].sum()), len(subset)
        low, high = wilson_interval(correct, n)
        rows.append({"rater": "humans", "kind": "human", "condition": condition, "images": n_images,
                     "participants": subset["participant_id"].nunique(), "answers": n, "correct": correct,
                     "accuracy": correct / n if n else np.nan, "ci_low": low, "ci_high": high, "predictions": ""})
    return rows


def plot(table: pd.DataFrame, num_classes: int, prefix: str) -> None:
    """Grouped bars: accuracy per condition for the people and each model, Wilson 95% intervals."""
    from .figures import CYCLE, STYLE, WIDTH, _percent_axis, plt, save_figure

    conditions = [c for c in CONDITIONS if c in set(table["condition"])]
    raters = list(dict.fromkeys(table["rater"]))  # humans first, then models in the given order
    colours = {r: HUMAN_COLOUR if r == "humans" else CYCLE[(i - 1) % len(CYCLE)] for i, r in enumerate(raters)}
    width = 0.8 / len(raters)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 2.8), layout="constrained")
        for i, rater in enumerate(raters):
            rows = table[table["rater"] == rater].set_index("condition")
            present = [c for c in conditions if c in rows.index]
            x = np.array([conditions.index(c) for c in present]) - 0.4 + width * (i + 0.5)
            acc = rows.loc[present, "accuracy"].to_numpy(float)
            err = np.vstack([acc - rows.loc[present, "ci_low"].to_numpy(float),
                             rows.loc[present, "ci_high"].to_numpy(float) - acc])
            ax.bar(x, acc, width, color=colours[rater], edgecolor="black", linewidth=0.4,
                   hatch="///" if rater == "humans" else None, label=rater)
            ax.errorbar(x, acc, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.axhline(1 / num_classes, color="black", linestyle=":", linewidth=0.8, label="chance")
        fractions = table.groupby("condition")["keep_fraction"].first()
        ax.set_xticks(range(len(conditions)), [
            CONDITION_LABELS[c] + ("" if c == "full" else f"\n({fractions[c]:.1%} of pixels)") for c in conditions])
        ax.set(ylim=(0, 1.05), ylabel="accuracy (95% Wilson CI)")
        _percent_axis(ax)
        humans = table[table["rater"] == "humans"]["participants"]
        ax.set_title(f"Humans (n = {int(humans.max())} after attention checks) and models on the same study images")
        fig.legend(loc="outside right center", frameon=False)
        save_figure(fig, prefix)


def score(key_path: str, response_paths: list[str], classes: list[str], threshold: float,
          model_predictions: list[str], table_path: str, participants_path: str, figure_prefix: str) -> pd.DataFrame:
    key = read_key(key_path)
    answers = read_responses(response_paths, key, classes)
    people = participant_table(answers, key, threshold)
    excluded = people[~people["included"]]
    for _, p in excluded.iterrows():
        log.warning("excluded participant %s: %s", p["participant_id"], p["reason"])
    log.info("%d of %d participants pass the attention checks (threshold %s)", len(people) - len(excluded),
             len(people), threshold)
    save_dataframe(participants_path, neutralize_formulas(people))
    if len(excluded) == len(people):
        # The reasons go into the message itself: Snakemake deletes a failed job's outputs.
        reasons = "; ".join(f"{p.participant_id}: {p.reason}" for p in excluded.head(5).itertuples())
        raise ValueError(f"all {len(people)} participants fail the attention checks (threshold {threshold}); "
                         f"nothing to score ({reasons}{'; ...' if len(excluded) > 5 else ''})")
    included = answers[answers["participant_id"].isin(people.loc[people["included"], "participant_id"])]
    rows = human_accuracy(included, key)
    rows += [model_accuracy(*parse_model_predictions(spec), key) for spec in model_predictions]
    table = pd.DataFrame(rows).astype({"participants": "Int64"})
    table.insert(3, "keep_fraction", table["condition"].map(key.groupby("condition")["keep_fraction"].mean()))
    save_dataframe(table_path, neutralize_formulas(table))
    plot(table, len(classes), figure_prefix)
    for _, r in table.iterrows():
        log.info("%-24s %-7s accuracy %.3f [%.3f, %.3f] (%d answers)", r["rater"], r["condition"], r["accuracy"],
                 r["ci_low"], r["ci_high"], r["answers"])
    return table


# ------------------------------------------------------------------------------------------------- CLI
def add_commands(subparsers) -> None:
    p = subparsers.add_parser("humaneval", help="the human-evaluation study: build the web page, score responses")
    sub = p.add_subparsers(dest="humaneval_command", required=True)

    b = sub.add_parser("build", help="a self-contained study folder + zip, its answer key and a crowd manifest")
    b.add_argument("--data", required=True, help="converted dataset (.npz)")
    b.add_argument("--size", type=int, default=None, help="class-balanced test subset size the masks were made for")
    b.add_argument("--bs-masks", help="backward-selection keep-masks (.npz) of the test split")
    b.add_argument("--random-masks", help="random keep-masks (.npz) of the test split")
    for name, label in (("bs", "backward-selection"), ("random", "random-subset"), ("full", "full-image attention-check")):
        b.add_argument(f"--{name}-count", type=int, default=0, help=f"number of {label} images")
        b.add_argument(f"--{name}-seed", type=int, default=0, help=f"seed drawing the {label} images")
    b.add_argument("--reproduce", metavar="ANSWER_KEY", default=None,
                   help="rebuild the study of this answer key, with its image ids (default: fresh random ids)")
    b.add_argument("--display-size", type=int, default=256, help="on-screen size of the pictures in CSS pixels")
    b.add_argument("--post-url", default=None, help="optional URL the page POSTs the responses CSV to")
    add_normalization_arguments(b)
    b.add_argument("--bundle", required=True, help="study folder to create")
    b.add_argument("--zip", required=True, help="zip of the study folder")
    b.add_argument("--key", required=True, help="answer key (.csv), outside the study folder")
    b.add_argument("--manifest", required=True, help="crowd-platform manifest (.csv), outside the study folder")
    b.set_defaults(handler=run_build)

    s = sub.add_parser("score", help="validate responses, apply attention checks, compare with models")
    s.add_argument("--key", required=True, help="the study's answer key (.csv)")
    s.add_argument("--data", required=True, help="converted dataset (.npz), for the class names")
    s.add_argument("--responses", nargs="+", required=True, help="response CSV files downloaded from the page")
    s.add_argument("--attention-threshold", type=float, required=True,
                   help="minimum accuracy on the full-image attention checks for a participant to count")
    s.add_argument("--model-predictions", nargs="*", default=[], metavar="NAME:CONDITION=CSV",
                   help="per-image predictions of a model on the condition's images (condition: bs, random, full)")
    s.add_argument("--table", required=True, help="accuracy per rater and condition (.csv)")
    s.add_argument("--participants", required=True, help="attention checks and inclusion per participant (.csv)")
    s.add_argument("--figure", required=True, help="figure path without extension; PREFIX.png and PREFIX.pdf are written")
    s.set_defaults(handler=run_score)


def run_build(args: argparse.Namespace) -> int:
    from .data import CIFAR10_MEAN, CIFAR10_STD
    from .subsets import load_keep_masks

    split = load_split(args.data, "test", args.size)
    conditions = []
    for name, masks in (("bs", args.bs_masks), ("random", args.random_masks), ("full", None)):
        count, seed = getattr(args, f"{name}_count"), getattr(args, f"{name}_seed")
        if count < 0:
            raise ValueError(f"--{name}-count must be >= 0, got {count}")
        if count and name != "full" and not masks:
            raise ValueError(f"--{name}-count {count} needs --{name}-masks")
        keep = load_keep_masks(masks, "test", split.index) if count and masks else None
        conditions.append(ConditionSpec(name, count, seed, keep, str(masks or "")))
    normalizer = Normalizer(args.mean or CIFAR10_MEAN, args.std or CIFAR10_STD, args.baseline)
    build(split, args.bundle, args.zip, args.key, args.manifest, conditions, normalizer, args.display_size,
          args.post_url, args.reproduce)
    return 0


def run_score(args: argparse.Namespace) -> int:
    if not 0 <= args.attention_threshold <= 1:
        raise ValueError(f"--attention-threshold must be within [0, 1], got {args.attention_threshold}")
    classes = [str(c) for c in load_npz(args.data, required=("classes",))["classes"]]
    score(args.key, args.responses, classes, args.attention_threshold, args.model_predictions, args.table,
          args.participants, args.figure)
    return 0
