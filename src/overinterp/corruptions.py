"""CIFAR-10-C (Hendrycks and Dietterich, ICLR 2019): the CIFAR-10 test images under 19 corruptions at 5
severities, as the pipeline reads it.

- ``convert``: the official ``CIFAR-10-C.tar`` (one ``<corruption>.npy`` of shape (5 x 10,000, 32, 32, 3) per
  corruption, severities 1-5 stacked, and ``labels.npy``) into (a) the evaluation grid: the images of the
  dataset's test split, or a class-balanced part of it, under every corruption and severity, and (b) the SIS
  sample: images drawn from all corruptions and severities pooled (as the reference did, numpy seed 1234),
  written as a dataset file whose test split every stage reads like CIFAR-10's.
- ``evaluate``: a model's accuracy on every (corruption, severity) of the grid, and on the same images clean;
  models trained on pixel subsets see the same subset of the corrupted image (the kept positions are where
  the selecting model looked on the clean image; a corruption changes the values there, not the positions).
  With ``--sample``: the SIS sample per (corruption, severity) on subsets chosen on each corrupted image by
  backward selection of the sample, so that the clean image's positions, which alone often tell the class,
  do not flatter models trained on subsets.
- ``table``: accuracy against severity per kind of model, a table and a figure.
- ``make-archive``: an archive of the official layout made here from the CIFAR-10 archive with the
  ``imagecorruptions`` package (the same 19 corruptions, re-implemented), for machines that cannot download
  the release. Its parameters are tuned for larger images than 32x32, so it is not the published data: use it
  to run the pipeline offline, and the release for numbers to compare with the paper.
"""
from __future__ import annotations

import argparse
import io
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from .utils import DataError, atomic_path, load_npz, save_dataframe, save_npz

CIFAR10C_URL = "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"
CIFAR10C_MD5 = "56bf5dcef84df0e2308c6dcbcbbd8499"
ARCHIVE_DIR = "CIFAR-10-C"
CORRUPTIONS = (
    "brightness", "contrast", "defocus_blur", "elastic_transform", "fog", "frost", "gaussian_blur",
    "gaussian_noise", "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "saturate",
    "shot_noise", "snow", "spatter", "speckle_noise", "zoom_blur",
)
SEVERITIES = (1, 2, 3, 4, 5)
GRID_ARRAYS = ("images", "labels", "index", "corruptions", "severities", "classes")


# ------------------------------------------------------------------------------------------- reading
def _read_member(tar: tarfile.TarFile, name: str, archive: Path) -> np.ndarray:
    """One ``.npy`` member, read as plain numbers (``allow_pickle=False``: an object array is refused)."""
    member = f"{ARCHIVE_DIR}/{name}.npy"
    try:
        handle = tar.extractfile(member)
    except KeyError:
        raise DataError(f"{archive} does not have the CIFAR-10-C layout: member {member!r} is missing. Expected "
                        "the official CIFAR-10-C.tar (or one made by `overinterp corruptions make-archive`); to "
                        "evaluate fewer corruptions, list them in cifar10c.corruptions.") from None
    try:
        # from bytes: numpy would ask a tar member for a file descriptor it does not have
        return np.lib.format.read_array(io.BytesIO(handle.read()), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise DataError(f"{archive}: member {member!r} is not a readable array file ({err}). Delete the archive "
                        "and download it again.") from None


def _archive_rows(labels: np.ndarray, test_labels: np.ndarray, split_rows: np.ndarray, archive: Path) -> np.ndarray:
    """For each test image of the dataset file, its row within a severity block of the archive (-1: not in
    it). The release holds every test image in order; an archive made for a run (`make-archive --test-size`)
    holds exactly the run's class-balanced test subset, in order. The labels must say so."""
    per_severity, extra = divmod(len(labels), len(SEVERITIES))
    held = {len(test_labels): np.arange(len(test_labels)), len(split_rows): split_rows}.get(per_severity)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or extra or held is None:
        raise DataError(f"{archive}: labels.npy has shape {labels.shape} and dtype {labels.dtype}; expected "
                        f"{len(SEVERITIES)} blocks (one per severity) of integer labels for the {len(test_labels)} "
                        f"test images of the dataset file (or for its {len(split_rows)} of dataset.test_size).")
    for s in range(len(SEVERITIES)):
        if not np.array_equal(labels[s * per_severity:(s + 1) * per_severity], test_labels[held]):
            raise DataError(f"{archive}: the labels of severity {SEVERITIES[s]} are not those of the dataset's test "
                            "images in order, so the archive was made from another test set. Use the CIFAR-10-C "
                            "of this CIFAR-10 (the official release for the official archive).")
    rows = np.full(len(test_labels), -1)
    rows[held] = np.arange(per_severity)
    return rows


def convert(archive: str | Path, dataset: str | Path, grid_out: str | Path, sample_out: str | Path,
            corruptions=CORRUPTIONS, test_size: int | None = None, per_cell: int | None = None,
            sample_size: int = 2000, sample_seed: int = 1234) -> dict:
    """The evaluation grid and the SIS sample from ``archive``, for the test split of ``dataset`` (its
    class-balanced subset of ``test_size``; ``per_cell`` of those in every corruption and severity).

    The sample is drawn from the pool (corruption, severity, test image) in that order, corruptions as
    listed, with ``np.random.RandomState(sample_seed).choice(pool, sample_size, replace=False)``."""
    from .data import balanced_subset

    archive = Path(archive)
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise DataError(f"unknown corruptions {', '.join(unknown)}; CIFAR-10-C has {', '.join(CORRUPTIONS)}")
    if not archive.exists():
        raise DataError(f"{archive} does not exist. Run the download rule first (cifar10c.url), or make one "
                        "with `overinterp corruptions make-archive`.")
    arrays = load_npz(dataset, required=("test_images", "test_labels", "classes"))
    test_labels = arrays["test_labels"].astype(np.int64)
    split_rows = balanced_subset(test_labels, test_size, f"the test split of {dataset}")
    grid_rows = split_rows[balanced_subset(test_labels[split_rows], per_cell, "the test split's images")]
    pool = len(corruptions) * len(SEVERITIES) * len(split_rows)
    if sample_size > pool:
        raise DataError(f"a SIS sample of {sample_size} images was asked for, but the pool holds {pool} "
                        f"({len(corruptions)} corruptions x {len(SEVERITIES)} severities x {len(split_rows)} "
                        "test images). Lower cifar10c.sample.size.")
    picks = np.sort(np.random.RandomState(sample_seed).choice(pool, sample_size, replace=False))
    pick_corruption, rest = np.divmod(picks, len(SEVERITIES) * len(split_rows))
    pick_severity, pick_row = np.divmod(rest, len(split_rows))
    grid = np.empty((len(corruptions), len(SEVERITIES), len(grid_rows), 3, 32, 32), np.uint8)
    sample = np.empty((sample_size, 3, 32, 32), np.uint8)
    try:
        with tarfile.open(archive, "r:*") as tar:
            labels = _read_member(tar, "labels", archive)
            rows = _archive_rows(labels, test_labels, split_rows, archive)
            per_severity = len(labels) // len(SEVERITIES)
            for c, name in enumerate(corruptions):
                images = _read_member(tar, name, archive)
                if images.shape != (len(labels), 32, 32, 3) or images.dtype != np.uint8:
                    raise DataError(f"{archive}: {name}.npy has shape {images.shape} and dtype {images.dtype}; "
                                    f"expected ({len(labels)}, 32, 32, 3) uint8, one image per label.")
                by_severity = images.reshape(len(SEVERITIES), per_severity, 32, 32, 3).transpose(0, 1, 4, 2, 3)
                grid[c] = by_severity[:, rows[grid_rows]]
                mine = pick_corruption == c
                sample[mine] = by_severity[pick_severity[mine], rows[split_rows[pick_row[mine]]]]
                print(f"read {name}", flush=True)
    except tarfile.TarError as err:
        raise DataError(f"{archive} is not a readable tar archive ({err}): it is truncated or corrupt. Delete it "
                        "and download it again.") from None
    classes = arrays["classes"]
    save_npz(grid_out, images=grid, labels=test_labels[grid_rows], index=grid_rows,
             corruptions=np.array(corruptions), severities=np.array(SEVERITIES), classes=classes)
    # A dataset file as `convert` writes it, with the sample as its test split (and no training images).
    save_npz(sample_out, train_images=np.zeros((0, 3, 32, 32), np.uint8), train_labels=np.zeros(0, np.uint8),
             test_images=sample, test_labels=test_labels[split_rows[pick_row]].astype(np.uint8), classes=classes,
             test_corruption=np.array(corruptions)[pick_corruption],
             test_severity=np.array(SEVERITIES)[pick_severity], test_source=split_rows[pick_row])
    return {"grid_images_per_cell": len(grid_rows), "corruptions": len(corruptions), "sample": sample_size}


def load_grid(path) -> dict[str, np.ndarray]:
    arrays = load_npz(path, required=GRID_ARRAYS)
    images = arrays["images"]
    shape = (len(arrays["corruptions"]), len(arrays["severities"]), len(arrays["labels"]), 3)
    if images.dtype != np.uint8 or images.shape[:4] != shape or len(arrays["index"]) != shape[2]:
        raise DataError(f"{path}: images of shape {images.shape} do not match its corruptions, severities and "
                        "labels; it is not a file `overinterp corruptions convert` wrote. Delete it and rerun.")
    return arrays


# ---------------------------------------------------------------------------------------- evaluating
def _cell(model, normalizer, images, labels, keep, positions_only, corruption, severity) -> dict:
    from .evaluate import predict_split

    confidence, prediction = predict_split(model, normalizer, images, keep, positions_only).max(1)
    return {"corruption": corruption, "severity": severity, "images": len(labels),
            "accuracy": float((prediction == labels).float().mean()),
            "mean_confidence": float(confidence.mean())}


def evaluate(model, normalizer, grid: dict, clean_images, keep=None, positions_only: bool = False) -> pd.DataFrame:
    """Accuracy and mean confidence of the predicted class on every (corruption, severity) of ``grid``, and
    on ``clean_images`` (the same test images uncorrupted: corruption "none", severity 0)."""
    import torch
    from tqdm import tqdm

    labels = torch.from_numpy(grid["labels"].astype(np.int64))
    rows = [_cell(model, normalizer, clean_images, labels, keep, positions_only, "none", 0)]
    cells = [(c, s) for c in range(len(grid["corruptions"])) for s in range(len(grid["severities"]))]
    for c, s in tqdm(cells, desc="corruptions x severities", unit="cell"):
        rows.append(_cell(model, normalizer, torch.from_numpy(grid["images"][c, s]), labels, keep, positions_only,
                          str(grid["corruptions"][c]), int(grid["severities"][s])))
    return pd.DataFrame(rows)


def evaluate_sample(model, normalizer, sample, corruption: np.ndarray, severity: np.ndarray, keep, clean,
                    clean_keep, positions_only: bool = False) -> pd.DataFrame:
    """As :func:`evaluate`, on the SIS sample (``sample``, a test split, with each image's ``corruption`` and
    ``severity``) with keep-masks chosen on each corrupted image itself; the clean row is ``clean`` (the
    test split) with its own keep-masks ``clean_keep``. Cells the sample does not reach have no row."""
    import torch

    rows = [_cell(model, normalizer, clean.images, clean.labels, clean_keep, positions_only, "none", 0)]
    for (name, level), members in pd.DataFrame({"c": corruption, "s": severity}).groupby(["c", "s"]):
        picks = torch.tensor(members.index.to_numpy())
        rows.append(_cell(model, normalizer, sample.images[picks], sample.labels[picks],
                          keep[picks] if keep is not None else None, positions_only, str(name), int(level)))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- tables
# How each evaluated model is named in the table and figure: (kind, subset) of its tags.
CONDITIONS = {
    ("single", "full"): "full image",
    ("input_dropout", "full"): "input dropout",
    ("ensemble", "full"): "ensemble",
    ("adversarial", "full"): "adversarial",
    ("pretrained", "full"): "pretrained",
}
SUBSET_CONDITIONS = {"bs": "retrained on BS {}", "random": "retrained on random {}", "positions": "positions-only {}"}
# Subsets chosen by backward selection of each corrupted image (tag chosen_on=corrupted; `evaluate --sample`)
# rather than the clean image's subsets carried over to its corrupted versions.
CHOSEN_ON_CORRUPTED = " (corrupted image's subsets)"


def condition_of(tags: pd.Series) -> str:
    if tags["subset"] == "full":
        return CONDITIONS.get((tags["kind"], "full"), str(tags["kind"]))
    fraction = f"{100 * float(tags['fraction']):g}%"
    if tags.get("evaluated") == "original":
        name = f"selecting model on BS {fraction}"
    else:
        name = SUBSET_CONDITIONS[tags["subset"]].format(fraction)
    return name + (CHOSEN_ON_CORRUPTED if tags.get("chosen_on") == "corrupted" else "")


def severity_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per architecture and condition (mean over the models of that condition: seeds, retrain seeds):
    clean accuracy, accuracy at each severity averaged over corruptions, their mean, and how much of the
    clean accuracy is kept (mean corrupted / clean)."""
    frame = results.assign(condition=results.apply(condition_of, axis=1))
    per_model = (frame.groupby(["architecture", "condition", "model_id", "severity"], sort=False)["accuracy"]
                 .mean().reset_index())
    wide = per_model.pivot_table(index=["architecture", "condition", "model_id"], columns="severity",
                                 values="accuracy", sort=False)
    table = wide.groupby(level=["architecture", "condition"], sort=False).agg("mean")
    table.insert(0, "models", wide.groupby(level=["architecture", "condition"], sort=False).size())
    severities = [s for s in table.columns if s != "models" and s != 0]
    table = table.rename(columns={0: "clean", **{s: f"severity {s}" for s in severities}})
    table["corrupted mean"] = table[[f"severity {s}" for s in severities]].mean(axis=1)
    table["kept of clean"] = table["corrupted mean"] / table["clean"]
    return table.reset_index()


def severity_figure(table: pd.DataFrame, prefix):
    """Per architecture: (a) accuracy against severity (0 = clean), mean over corruptions; (b) the same
    relative to the clean accuracy. Full-image models in solid lines, models trained on subsets dashed, in
    the colours the other figures give those conditions."""
    import matplotlib.pyplot as plt

    from .figures import OKABE_ITO, STYLE, WIDTH, _percent_axis, save_figure

    colors = {"full image": "#555555", "input dropout": OKABE_ITO["purple"], "ensemble": OKABE_ITO["black"],
              "adversarial": OKABE_ITO["vermillion"], "pretrained": "#999999",
              "retrained on BS": OKABE_ITO["blue"], "retrained on random": OKABE_ITO["orange"],
              "positions-only": OKABE_ITO["green"], "selecting model": OKABE_ITO["sky"]}
    severities = [c for c in table.columns if c.startswith("severity ")]
    x = [0] + [int(c.split()[1]) for c in severities]
    architectures = list(dict.fromkeys(table["architecture"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(architectures), 2, figsize=(WIDTH, 2.7 * len(architectures) + 0.9),
                                 layout="constrained", squeeze=False)
        top = 1.05
        for (absolute, relative), arch in zip(axes, architectures):
            for _, row in table[table["architecture"] == arch].iterrows():
                values = np.array([row["clean"]] + [row[c] for c in severities], dtype=float)
                name = row["condition"]
                color = next((c for key, c in colors.items() if name.startswith(key)), "#999999")
                style = {"color": color, "marker": "s" if name == "ensemble" else "o", "ms": 3, "lw": 1.3,
                         "ls": ":" if name.endswith(CHOSEN_ON_CORRUPTED)
                         else "--" if " on " in name or name.startswith("positions") else "-"}
                absolute.plot(x, values, label=f"{name} ({row['models']:g})", **style)
                relative.plot(x, values / values[0], **style)
                top = max(top, float(np.nanmax(values / values[0])) * 1.05)
            absolute.set(title=f"{arch}: accuracy", ylabel="accuracy (mean over corruptions)", ylim=(0, 1))
            relative.set(title=f"{arch}: share of the clean accuracy kept", ylabel="accuracy / clean accuracy")
            for ax in (absolute, relative):
                ax.set_xticks(x, ["clean"] + [str(v) for v in x[1:]])
                ax.set_xlabel("corruption severity")
        for ax in axes[:, 1]:
            ax.set_ylim(0, top)
        for ax in axes.flat:
            _percent_axis(ax)
        legend = {}  # every architecture's conditions (an adversarial model has a row of its own)
        for ax in axes[:, 0]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncol=3, frameon=False, fontsize=7,
                   title="condition (models averaged); dashed: on pixel subsets of the clean image, dotted: chosen on each "
                         "corrupted image (the SIS sample)",
                   title_fontsize=6.5)
        fig.suptitle("CIFAR-10-C: accuracy against corruption severity", fontsize=9)
        return save_figure(fig, prefix)


# ------------------------------------------------------------------------------------ local archive
# A worker's copy of the test images (HWC uint8) and their indices in the test split, set once per process.
_IMAGES: np.ndarray | None = None
_INDEX: np.ndarray | None = None


def _share_images(images: np.ndarray, index: np.ndarray) -> None:
    global _IMAGES, _INDEX
    _IMAGES, _INDEX = images, index


def _corrupt_chunk(task) -> np.ndarray:
    """One corruption at one severity of rows ``start:stop`` of the images, each image seeded from
    (seed, corruption, severity, its index in the test split), so an image is corrupted the same way however
    the work was split and whichever test images the archive holds."""
    import warnings

    from imagecorruptions import corrupt

    name, severity, start, stop, seed = task
    out = np.empty_like(_IMAGES[start:stop])
    code = CORRUPTIONS.index(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package's own deprecation warnings, once per image
        for i, row in enumerate(range(start, stop)):
            state = int(np.random.SeedSequence([seed, code, severity, int(_INDEX[row])]).generate_state(1)[0])
            np.random.seed(state)  # the package draws its noise from numpy's global generator
            extra = {"seed": state} if name == "glass_blur" else {}
            out[i] = corrupt(_IMAGES[row], severity=severity, corruption_name=name, **extra)
    return out


def make_archive(cifar10_archive: str | Path, out: str | Path, corruptions=CORRUPTIONS, seed: int = 0,
                 workers: int = 1, chunk: int = 500, test_size: int | None = None) -> Path:
    """A CIFAR-10-C-layout tar (``CIFAR-10-C/<corruption>.npy``, ``labels.npy``) of the test images of
    ``cifar10_archive`` (only the class-balanced ``test_size`` of them a run with that dataset.test_size
    uses, when given), corrupted with the ``imagecorruptions`` package."""
    import tempfile

    try:
        import imagecorruptions  # noqa: F401
    except ImportError:
        raise DataError("making a CIFAR-10-C archive needs the imagecorruptions package: "
                        "pip install 'overinterp[cifar10c]'") from None
    from tqdm import tqdm

    from .data import convert as convert_cifar10

    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise DataError(f"unknown corruptions {', '.join(unknown)}; CIFAR-10-C has {', '.join(CORRUPTIONS)}")
    with tempfile.TemporaryDirectory() as folder:
        arrays = load_npz(convert_cifar10(cifar10_archive, Path(folder) / "cifar10.npz"))
    from .data import balanced_subset

    held = balanced_subset(arrays["test_labels"], test_size, f"the test split of {cifar10_archive}")
    images = np.ascontiguousarray(arrays["test_images"][held].transpose(0, 2, 3, 1))
    labels = np.tile(arrays["test_labels"][held].astype(np.int64), len(SEVERITIES))
    starts = range(0, len(images), chunk)
    tasks = [(name, severity, i, min(i + chunk, len(images)), seed)
             for name in corruptions for severity in SEVERITIES for i in starts]

    def add(tar, name, array):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        info = tarfile.TarInfo(f"{ARCHIVE_DIR}/{name}.npy")
        info.size = buffer.tell()
        buffer.seek(0)
        tar.addfile(info, buffer)

    with (atomic_path(out) as tmp, tarfile.open(tmp, "w") as tar,
          ProcessPoolExecutor(workers, initializer=_share_images, initargs=(images, held)) as pool,
          tqdm(total=len(corruptions) * len(labels), unit="img", desc="corrupting") as bar):
        add(tar, "labels", labels)
        results = pool.map(_corrupt_chunk, tasks)
        for name in corruptions:
            parts = []
            for _ in range(len(SEVERITIES) * len(starts)):
                parts.append(next(results))
                bar.update(len(parts[-1]))
            add(tar, name, np.concatenate(parts))
    return Path(out)


# -------------------------------------------------------------------------------------- command line
def add_commands(subparsers) -> None:
    from .data import add_normalization_arguments
    from .utils import add_device_argument

    p = subparsers.add_parser("corruptions", help="CIFAR-10-C: convert the release, evaluate models on it, tables")
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("convert", help="the evaluation grid and the SIS sample from CIFAR-10-C.tar")
    c.add_argument("--archive", required=True, help="CIFAR-10-C.tar (official layout)")
    c.add_argument("--data", required=True, help="the CIFAR-10 dataset file the archive belongs to (.npz)")
    c.add_argument("--test-size", type=int, default=None, help="class-balanced subset of the test split "
                                                              "(as dataset.test_size; default: all)")
    c.add_argument("--per-cell", type=int, default=None,
                   help="class-balanced images of that subset in every corruption and severity (default: all)")
    c.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated (default: all 19)")
    c.add_argument("--sample-size", type=int, default=2000, help="images of the SIS sample (default: 2000)")
    c.add_argument("--sample-seed", type=int, default=1234, help="numpy seed of the sample (default: 1234)")
    c.add_argument("--grid", required=True, help="evaluation grid (.npz)")
    c.add_argument("--sample", required=True, help="SIS sample, a dataset file (.npz)")
    c.set_defaults(handler=run_convert)
    e = sub.add_parser("evaluate", help="a model's accuracy on every corruption and severity")
    images = e.add_mutually_exclusive_group(required=True)
    images.add_argument("--grid", help="evaluation grid (.npz) of `corruptions convert`")
    images.add_argument("--sample", help="the SIS sample (.npz) of `corruptions convert`, on subsets chosen on each "
                                         "corrupted image (--sample-keep-masks)")
    e.add_argument("--data", required=True, help="the dataset file (.npz), for the same images clean")
    e.add_argument("--model", required=True, help="model file (.pt)")
    e.add_argument("--keep-masks", default=None, help="evaluate on these pixel subsets (of the clean test images)")
    e.add_argument("--sample-keep-masks", default=None,
                   help="with --sample: pixel subsets of the sample's images (backward selection of the sample)")
    e.add_argument("--positions-only", action="store_true", help="feed the keep-masks alone (models trained so)")
    add_normalization_arguments(e)
    add_device_argument(e)
    e.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="metadata stored in every row")
    e.add_argument("--out", required=True, help="one row per corruption and severity (.csv)")
    e.set_defaults(handler=run_evaluate)
    t = sub.add_parser("table", help="accuracy against severity per kind of model: table and figure")
    t.add_argument("--out", required=True, help="output prefix: PREFIX.csv, PREFIX.md, PREFIX-cells.csv")
    t.add_argument("--figure", required=True, help="figure prefix: PREFIX.png and PREFIX.pdf")
    t.add_argument("results", nargs="+", help="results (.csv) of `corruptions evaluate`")
    t.set_defaults(handler=run_table)
    m = sub.add_parser("make-archive", help="a CIFAR-10-C-layout archive made here with the imagecorruptions "
                                            "package (for machines that cannot download the release)")
    m.add_argument("--cifar10", required=True, help="cifar-10-python.tar.gz whose test images are corrupted")
    m.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated (default: all 19)")
    m.add_argument("--test-size", type=int, default=None,
                   help="only the class-balanced subset of this many test images a run with the same "
                        "dataset.test_size uses (default: all, as the release)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random corruptions (default: 0)")
    m.add_argument("--workers", type=int, default=1, help="processes (default: 1)")
    m.add_argument("--out", required=True, help="the archive (.tar)")
    m.set_defaults(handler=run_make_archive)


def run_convert(args) -> int:
    import json

    print(json.dumps(convert(args.archive, args.data, args.grid, args.sample, args.corruptions.split(","),
                             args.test_size, args.per_cell, args.sample_size, args.sample_seed)))
    return 0


def _test_images(data, index, source):
    """The test images of dataset file ``data`` at ``index`` (the rows ``source`` was made for)."""
    import dataclasses

    import torch

    from .data import load_split

    clean = load_split(data, "test")
    position = {int(row): i for i, row in enumerate(clean.index)}
    missing = [int(row) for row in index if int(row) not in position]
    if missing:
        raise DataError(f"{source} holds test images ({len(missing)}) that {data} does not: it was made from "
                        "another dataset file. Rebuild it from this one.")
    rows = torch.as_tensor([position[int(row)] for row in index])
    return dataclasses.replace(clean, images=clean.images[rows], labels=clean.labels[rows],
                               index=clean.index[rows.numpy()])


def run_evaluate(args) -> int:
    from .data import load_split, normalizer_from_args
    from .evaluate import parse_tags
    from .models import load_model
    from .subsets import load_packed_keep_masks
    from .utils import resolve_device

    if args.sample and not (args.keep_masks and args.sample_keep_masks):
        raise DataError("--sample needs --sample-keep-masks (subsets of the sample's images) and --keep-masks "
                        "(subsets of the clean test images, for the clean row)")
    model = load_model(args.model, resolve_device(args.device))
    if args.grid:
        grid = load_grid(args.grid)
        clean = _test_images(args.data, grid["index"], args.grid)
        keep = load_packed_keep_masks(args.keep_masks, "test", grid["index"]) if args.keep_masks else None
        results = evaluate(model, normalizer_from_args(args), grid, clean.images, keep, args.positions_only)
    else:
        sample = load_split(args.sample, "test")
        shift = load_npz(args.sample, required=("test_corruption", "test_severity"))
        clean_index = load_npz(args.keep_masks, required=("test_index",))["test_index"]
        clean = _test_images(args.data, clean_index, args.keep_masks)
        results = evaluate_sample(
            model, normalizer_from_args(args), sample, shift["test_corruption"], shift["test_severity"],
            load_packed_keep_masks(args.sample_keep_masks, "test", sample.index), clean,
            load_packed_keep_masks(args.keep_masks, "test", clean.index), args.positions_only)
    for key, value in parse_tags(args.tag).items():
        results[key] = value
    save_dataframe(args.out, results)
    return 0


def run_table(args) -> int:
    from .analysis import readable_table

    results = pd.concat([pd.read_csv(path).assign(model_id=path) for path in args.results], ignore_index=True)
    for column, default in (("architecture", "model"), ("kind", "single"), ("subset", "full"), ("fraction", np.nan),
                            ("evaluated", "trained"), ("chosen_on", "clean")):
        results[column] = results[column].fillna(default) if column in results else default
    table = severity_table(results)
    save_dataframe(f"{args.out}.csv", table)
    save_dataframe(f"{args.out}.md", readable_table(table))
    save_dataframe(f"{args.out}-cells.csv", results.drop(columns="model_id"))
    severity_figure(table, args.figure)
    return 0


def run_make_archive(args) -> int:
    make_archive(args.cifar10, args.out, args.corruptions.split(","), args.seed, args.workers,
                 test_size=args.test_size)
    return 0
