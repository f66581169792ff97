"""The dataset file every stage reads: CIFAR-10's download with checksum and conversion, loading a split
(from arrays in the file, or streamed from the image files it lists), normalisation and masking."""
from __future__ import annotations

import argparse
import hashlib
import pickle
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .fills import FILLS, Fill
from .utils import CorruptFileError, DataError, atomic_path, load_npz, save_npz

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# The reference code's statistics (the true per-channel std, not the often-copied 0.2023/0.1994/0.2010).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
ARCHIVE_NAMES = {"cifar10": "cifar-10-python.tar.gz", "cifar10c": "CIFAR-10-C.tar"}


def mirror_hint(key: str = "cifar10") -> str:
    """How to point config entry ``key`` (cifar10, cifar10c) at another copy of its archive."""
    name = ARCHIVE_NAMES.get(key, "the archive")
    return (f"Point `{key}.url` at a reachable copy (an http(s):// mirror or a file:// path to {name}) and, if it "
            f"is a different build, set `{key}.md5` to its verified md5, e.g. "
            f"`--config {key}='{{url: file:///path/{name}, md5: <md5>}}'` or a --configfile.")


MIRROR_HINT = mirror_hint()


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | Path, md5: str, timeout: float = 60.0, config_key: str = "cifar10") -> Path:
    """Fetch ``url`` (http, https or file) to ``dest``, verifying size and md5 before it appears there; errors
    name the config entry ``config_key`` the address and checksum come from."""
    dest = Path(dest)
    hint = mirror_hint(config_key)
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                expected_size = response.headers.get("Content-Length")
                expected_size = int(expected_size) if expected_size else None
                digest = hashlib.md5()
                received = 0
                with tqdm(total=expected_size, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                    while block := response.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise DataError(f"Could not download {url}: {reason}. {hint}") from err
        if expected_size is not None and received != expected_size:
            raise DataError(
                f"Download of {url} is truncated: got {received} of {expected_size} bytes. "
                f"Rerun to try again; nothing was kept. {hint}"
            )
        if digest.hexdigest() != md5.lower():
            raise DataError(
                f"Checksum mismatch for {url}: it is not the archive with md5 {md5} ({received} bytes received); "
                "nothing was kept. The file is corrupt, truncated, or a different archive. Do not simply "
                "configure the checksum of what arrived: verify the source first (the publisher's checksum, or "
                f"`md5sum` of a copy you trust), then set `{config_key}.md5` to that verified value."
            )
    return dest


class ForbiddenPickle(pickle.UnpicklingError):
    """A pickle that names a callable outside the few a CIFAR-10 batch file uses."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles only what the official batch files hold: dicts, lists, str/bytes, numbers and numpy
    arrays. Any other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked up,
    so a crafted archive cannot run code however its checksum was configured."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes when Python 3 wrote the file (a rebuilt archive)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ForbiddenPickle(f"{module}.{name}")
        return super().find_class(module, name)


def _read_batch(tar: tarfile.TarFile, name: str, archive: Path) -> dict:
    member = f"{ARCHIVE_DIR}/{name}"
    try:
        handle = tar.extractfile(member)
    except KeyError:
        raise DataError(
            f"{archive} does not have the CIFAR-10 python layout: member {member!r} is missing. "
            f"Expected the official cifar-10-python.tar.gz. {MIRROR_HINT}"
        ) from None
    try:
        return BatchUnpickler(handle, encoding="bytes").load()
    except ForbiddenPickle as err:
        raise DataError(
            f"{archive}: member {member!r} was refused unread: it asks to run {err}, which no CIFAR-10 batch "
            "does. The archive is not the official one; delete it and get it from a source you trust.") from None
    except Exception as err:  # any other unpickling failure means a damaged member
        raise DataError(f"{archive}: member {member!r} is unreadable ({err}). Delete the archive and download it again.") from err


def convert(archive: str | Path, dest: str | Path) -> Path:
    """Convert the official python archive into one ``.npz`` of uint8 NCHW images, labels and class names."""
    archive, dest = Path(archive), Path(dest)
    if not archive.exists():
        raise DataError(f"Archive {archive} does not exist. Run the download rule first, or `dvc pull data.dvc`.")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            meta = _read_batch(tar, "batches.meta", archive)
            batches = {name: _read_batch(tar, name, archive) for name in TRAIN_BATCHES + ["test_batch"]}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"{archive} is not a readable gzip tar archive ({err}): it is truncated or corrupt. "
            f"Delete it and download again. {MIRROR_HINT}"
        ) from err

    def stack(names):
        try:
            images = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
            labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
        except KeyError as err:
            raise DataError(f"{archive}: a batch lacks the key {err}; the archive is not CIFAR-10.") from None
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
            raise DataError(f"{archive}: unexpected array shape {images.shape}; expected (N, 3072) CIFAR-10 rows.")
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{archive}: labels outside 0..9; the archive is not CIFAR-10.")
        return images.reshape(-1, 3, 32, 32), labels.astype(np.uint8)

    train_images, train_labels = stack(TRAIN_BATCHES)
    test_images, test_labels = stack(["test_batch"])
    classes = np.array([c.decode() for c in meta[b"label_names"]])
    save_npz(dest, train_images=train_images, train_labels=train_labels,
             test_images=test_images, test_labels=test_labels, classes=classes)
    return dest


Frame = tuple[int, int]  # (resize: shorter side, crop: centre square)


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes, else the reason. A draft decode reads the whole file at 1/8 scale: cheap,
    and it still fails on truncated or corrupt JPEGs."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as err:  # PIL raises many types for damaged files
        return f"{type(err).__name__}: {err}"
    return None


def check_images(paths: list[Path], folder: Path, workers: int = 8, desc: str | None = None) -> None:
    """Decode every file of ``paths``; a DataError lists the ones that are not readable images."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(tqdm(pool.map(check_image, paths), total=len(paths), desc=desc, disable=desc is None))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad:
        listing = "\n".join(f"  {p}: {r}" for p, r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} file(s) in {folder} are not readable images; replace or remove them:\n"
                        f"{listing}{more}")


def load_frame(path: Path, frame: Frame | None) -> torch.Tensor:
    """uint8 (3, crop, crop): shorter side resized to ``resize``, centre crop ``crop`` (the image as it is
    when ``frame`` is None)."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = TF.pil_to_tensor(image.convert("RGB"))
    except Exception as err:
        raise DataError(f"Cannot read image {path} ({type(err).__name__}: {err}); replace or remove it.") from err
    if frame is None:
        return pixels
    resize, crop = frame
    return TF.center_crop(TF.resize(pixels, resize, antialias=True), crop)


class FolderImages:
    """A split's images read from their files when indexed, at the dataset's frame: (N, 3, crop, crop) uint8
    like an in-memory split, for datasets too large for memory (ImageNet's 1.28M training images)."""

    def __init__(self, root: Path, files: np.ndarray, frame: Frame, workers: int = 8):
        self.root, self.files, self.frame = Path(root), np.asarray(files), frame
        self.pool = ThreadPoolExecutor(max(1, workers))  # one for every batch of a run, not one a batch

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.frame[1], self.frame[1])

    def load(self, position: int) -> torch.Tensor:
        return load_frame(self.root / str(self.files[position]), self.frame)

    def __getitem__(self, rows) -> torch.Tensor:
        """The images at ``rows`` (positions: an int array or tensor, or a slice), decoded in threads."""
        positions = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows).reshape(-1)
        if not len(positions):
            return torch.zeros(0, *self.shape[1:], dtype=torch.uint8)
        return torch.stack(list(self.pool.map(self.load, positions.tolist())))


@dataclass
class Split:
    """One split of the dataset as uint8 NCHW images; ``index`` maps rows back to the converted file."""

    images: torch.Tensor | FolderImages
    labels: torch.Tensor
    index: np.ndarray
    classes: list[str]
    frame: tuple[int, int] = (32, 32)  # (shorter side resized to, centre crop) the images were brought to

    def __len__(self) -> int:
        return len(self.labels)


def balanced_subset(labels: np.ndarray, size: int | None, what: str = "the split") -> np.ndarray:
    """Indices of the first ``size // classes`` images of each class present (all when size is None), sorted.
    A split too small for ``size`` is refused rather than used as it is."""
    if size is None:
        return np.arange(len(labels))
    present = np.unique(labels)  # ImageNet's labels are the 1k indices, a partial copy holds some of them
    num_classes = len(present)
    if size % num_classes:
        raise DataError(f"subset size {size} of {what} must be a multiple of the number of classes ({num_classes})")
    per_class = size // num_classes
    counts = np.bincount(labels)[present]
    if size > len(labels) or counts.min() < per_class:
        raise DataError(
            f"{what} has {len(labels)} images ({counts.min()} in its smallest class) but a class-balanced subset "
            f"of {size} ({per_class} per class) was asked for. Lower dataset.train_size/test_size to at most "
            f"{counts.min() * num_classes}, or set it to null to use every image.")
    picks = [np.flatnonzero(labels == c)[:per_class] for c in present]
    return np.sort(np.concatenate(picks))


# What `convert` writes: uint8 NCHW images of one size for both splits, labels, class names; and, for an image
# folder, ``frame`` (resize, crop) the images were brought to (CIFAR-10's are 32x32 as published). A streamed
# dataset file (`convert --stream`) lists the image files instead: ``{split}_files`` (paths relative to
# ``root``) with their labels, ``classes``, ``root`` and ``frame``; its images are read when a stage needs them.
DATASET_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")
STREAMED_ARRAYS = ("train_files", "train_labels", "test_files", "test_labels", "classes", "root", "frame")


def validate_dataset(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The converted dataset file as `convert` writes it; anything else names the array and the problem."""
    def bad(name, problem):
        return DataError(f"{path}: array {name!r} {problem}. It is not a dataset file that `overinterp convert` "
                         "wrote; delete it and rerun the data rules (or `overinterp convert`).")

    classes = arrays["classes"]
    if classes.ndim != 1 or classes.dtype.kind not in "US" or len(classes) < 2:
        raise bad("classes", f"should be a 1-D array of class names, has shape {classes.shape} and dtype {classes.dtype}")
    if "train_files" in arrays:
        for split in ("train", "test"):
            files, labels = arrays[f"{split}_files"], arrays[f"{split}_labels"]
            if files.ndim != 1 or files.dtype.kind not in "US" or len(files) != len(labels):
                raise bad(f"{split}_files", f"should list one file per label ({len(labels)}), has shape {files.shape}")
        if arrays["frame"].shape != (2,):
            raise bad("frame", f"should be (resize, crop), has shape {arrays['frame'].shape}")
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise bad(f"{split}_labels", f"should be 1-D integer labels, has shape {labels.shape} and dtype {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise bad(f"{split}_labels", f"has labels {labels.min()}..{labels.max()} outside 0..{len(classes) - 1}, "
                                         f"the {len(classes)} classes")
        if "train_files" in arrays:
            continue
        images = arrays[f"{split}_images"]
        if images.dtype != np.uint8:
            raise bad(f"{split}_images", f"has dtype {images.dtype}, expected uint8 pixel values 0..255")
        shape = (3, *arrays["train_images"].shape[2:])
        if images.ndim != 4 or images.shape[1:] != shape or shape[1] < 1 or shape[2] < 1:
            raise bad(f"{split}_images", f"has shape {images.shape}, expected (N, 3, H, W) with the training "
                                         f"images' H and W")
        if len(labels) != len(images):
            raise bad(f"{split}_labels", f"has {len(labels)} labels for {len(images)} images in {split}_images")


def load_split(path: str | Path, split: str, size: int | None = None) -> Split:
    """Load ``train`` or ``test`` from the converted file, optionally a class-balanced subset of ``size``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"Dataset file {path} is missing. Run the workflow's data rules (or `dvc pull`).")
    arrays = load_npz(path)
    missing = [name for name in (STREAMED_ARRAYS if "train_files" in arrays else DATASET_ARRAYS) if name not in arrays]
    if missing:
        raise CorruptFileError(path, f"the arrays {', '.join(missing)} are missing")
    validate_dataset(path, arrays)
    labels = arrays[f"{split}_labels"].astype(np.int64)
    index = balanced_subset(labels, size, f"the {split} split of {path}")
    if "train_files" in arrays:
        frame = tuple(int(v) for v in arrays["frame"])
        return Split(FolderImages(Path(str(arrays["root"])), arrays[f"{split}_files"][index], frame),
                     torch.from_numpy(labels[index]), index, [str(c) for c in arrays["classes"]], frame)
    return Split(
        images=torch.from_numpy(arrays[f"{split}_images"][index]),
        labels=torch.from_numpy(labels[index]),
        index=index,
        classes=[str(c) for c in arrays["classes"]],
        frame=tuple(int(v) for v in arrays["frame"]) if "frame" in arrays else tuple(arrays["train_images"].shape[2:]),
    )


class Normalizer:
    """uint8 NCHW -> float normalised NCHW on the given device; masked pixels take ``baseline``, or what
    ``fill`` (a :class:`~overinterp.fills.Fill`) puts there."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD, baseline: float = 0.0, fill: Fill | None = None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.baseline = float(baseline)
        self.fill = fill or Fill("mean", self.baseline)

    def __call__(self, images: torch.Tensor, keep: torch.Tensor | None = None,
                 imputed: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        x = (images.float() / 255.0 - mean) / std
        if keep is not None:  # keep: (N,1,H,W) bool/0-1, True = pixel kept
            x = self.fill(x, keep, imputed)
        return x

    def imputations(self, images: torch.Tensor, keep, chunk: int = 1024) -> torch.Tensor | None:
        """The ``impute`` fill's solutions for ``images`` (uint8, on the device they are used on) under
        ``keep``, solved once for reuse across epochs; None for the other fills."""
        if self.fill.kind != "impute":
            return None
        from .fills import impute

        return torch.cat([impute(self(images[i:i + chunk]), keep[i:i + chunk].to(images.device).bool())
                          for i in range(0, len(images), chunk)])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] RGB for display."""
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)


def model_inputs(normalizer: Normalizer, images: torch.Tensor, keep: torch.Tensor | None, positions_only: bool,
                 imputed: torch.Tensor | None = None):
    """The network's input: the normalised image, masked where ``keep`` is False (``imputed``: see
    :meth:`Normalizer.imputations`), or the mask alone.

    ``positions_only`` is the control that shows how much the *shape* of a pixel subset tells: the model
    sees +1 where a pixel is kept and -1 elsewhere, no pixel values.
    """
    if positions_only:
        return (keep.float() * 2 - 1).expand(-1, images.shape[1], -1, -1)
    return normalizer(images, keep, imputed)


def add_normalization_arguments(p) -> None:
    """--mean/--std/--baseline: the input convention of the pipeline's models (``normalizer_from_args``)."""
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel mean, fractions of 255 (default: CIFAR-10's, 125.3/255 123.0/255 113.9/255)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel std, fractions of 255 (default: CIFAR-10's, 63.0/255 62.1/255 66.7/255)")
    p.add_argument("--baseline", type=float, default=0.0,
                   help="value of masked pixels after normalisation; 0 = the mean colour (default: 0.0)")
    p.add_argument("--fill", default="mean", choices=FILLS,
                   help="what masked pixels become: mean (--baseline, the paper's), noise (N(0,1) after "
                        "normalisation) or impute (ROAD's noisy linear imputation from the kept pixels) (default: mean)")
    p.add_argument("--fill-seed", type=int, default=0, help="seed of the noise of --fill noise/impute (default: 0)")
    p.add_argument("--impute-noise", type=float, default=0.01,
                   help="sigma of the noise added to imputed pixels, normalised units (default: 0.01, ROAD's)")


def normalizer_from_args(args: argparse.Namespace) -> Normalizer:
    fill = Fill(args.fill, args.baseline, args.fill_seed, args.impute_noise)
    return Normalizer(args.mean or CIFAR10_MEAN, args.std or CIFAR10_STD, args.baseline, fill)
