"""Datasets as adapters: every stage gets the same thing from each, whatever the dataset.

An adapter gives, per split, an :class:`ImageSet`: uint8 RGB images (N, 3, H, W) at the model's input frame,
integer labels and stable ids (they name the same image in every run), plus its class names, the
normalisation its models conventionally take, and the masking baseline: the dataset's mean colour, so that a
masked pixel means the same thing for every model (the paper's baseline).

* :class:`Cifar10`: the converted array file the workflow's data rules make (``data/cifar10.npz``).
* :class:`ImageFolder`: a user's ``ROOT/<split>/<class>/*`` tree of any image format Pillow reads, any size,
  brought to a declared frame (shorter side resized, centre crop). Classes are the sorted folder names unless
  a class list is given.
* :class:`ImageNet`: an image folder whose class folders are ImageNet-1k wnids, labelled in the canonical
  1k order so that a partial copy still lines up with pretrained networks.

:func:`open_dataset` turns a command-line spec (``cifar10:PATH``, ``imagenet:ROOT``, ``imagefolder:ROOT``
or a bare path) into an adapter.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from .data import CIFAR10_MEAN, CIFAR10_STD, Frame, check_images, load_frame, load_split
from .efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
from .utils import DataError

@dataclass
class ImageSet:
    """One split of a dataset: uint8 (N, 3, H, W) images at the model's frame, labels and stable ids."""

    images: torch.Tensor
    labels: np.ndarray
    ids: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in canonical (sorted) order: position = class index."""
    text = resources.files("overinterp").joinpath("imagenet_wnids.txt").read_text()
    return tuple(text.split())


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """Human-readable names of the 1,000 classes, in class-index order (from torchvision's metadata)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_balanced(labels: np.ndarray, limit: int | None, num_classes: int) -> np.ndarray:
    """Rows of at most ``limit`` images, taken round-robin over the classes in file order (all when None):
    a prefix of the same ordering for every limit, so a larger audit contains a smaller one."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    queues = [list(np.flatnonzero(labels == c)) for c in range(num_classes)]
    picks: list[int] = []
    while len(picks) < limit:
        for queue in queues:
            if queue and len(picks) < limit:
                picks.append(queue.pop(0))
    return np.sort(np.array(picks, dtype=np.int64))


class Dataset:
    """An adapter: ``load(split, limit)`` plus what every stage needs to know about the dataset."""

    name = "dataset"
    splits: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    normalize: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)

    def load(self, split: str, limit: int | None = None) -> ImageSet:
        raise NotImplementedError

    def class_names(self, split: str) -> tuple[str, ...]:
        """The classes of ``split`` in label order, without decoding images."""
        raise NotImplementedError

    def use_frame(self, frame: Frame) -> None:
        """Bring images to ``frame`` (resize, crop); a dataset of one fixed size ignores it."""

    def mean_colour(self) -> tuple[float, ...] | None:
        """The masking baseline in [0, 1] RGB, the dataset-mean colour, where the dataset fixes it."""
        return self.normalize[0]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DataError(f"{self.name} has no split {split!r}; it has {', '.join(self.splits)}")


class Cifar10(Dataset):
    """The converted CIFAR-10 array file (``overinterp convert``); ids are ``<split>/<row>``."""

    name = "cifar10"
    splits = ("train", "test")
    normalize = (CIFAR10_MEAN, CIFAR10_STD)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @functools.cache
    def _split(self, split: str):
        self.check_split(split)
        return load_split(self.path, split)

    def class_names(self, split: str) -> tuple[str, ...]:
        return tuple(self._split(split).classes)

    def load(self, split: str, limit: int | None = None) -> ImageSet:
        full = self._split(split)
        self.classes = tuple(full.classes)
        rows = class_balanced(full.labels.numpy(), limit, len(self.classes))
        return ImageSet(full.images[rows], full.labels.numpy()[rows], np.array([f"{split}/{r}" for r in rows]),
                        self.classes)


LAYOUT_HINT = "An image folder is ROOT/<split>/<class>/<image files> (as torchvision's ImageFolder reads it)."


class ImageFolder(Dataset):
    """``ROOT/<split>/<class>/*``: any image Pillow reads, any size, brought to ``frame``.

    ``classes`` fixes the class order (and so the label numbers a model was trained with); by default it is
    the sorted folder names. ``mean_colour`` is the masking baseline if given (else see
    :func:`overinterp.audit.baseline_colour`); ``normalize`` is what models of this data take by default
    (ImageNet's).
    Ids are file paths relative to the root.
    """

    name = "imagefolder"

    def __init__(self, root: str | Path, frame: Frame | None = None, classes: list[str] | None = None,
                 normalize=None, mean_colour=None, workers: int = 8):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder. {LAYOUT_HINT}")
        self.splits = tuple(sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not self.splits:
            raise DataError(f"{self.root} holds no split folders (train/, test/, ...). {LAYOUT_HINT}")
        self.frame, self.workers = frame, workers
        self.given_classes = tuple(classes) if classes else None
        if normalize is not None:
            self.normalize = normalize
        self.fixed_colour = tuple(mean_colour) if mean_colour is not None else None

    def class_folders(self, folder: Path) -> tuple[str, ...]:
        found = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not found:
            raise DataError(f"{folder} holds no class folders. {LAYOUT_HINT}")
        if self.given_classes is None:
            return found
        unknown = sorted(set(found) - set(self.given_classes))
        if unknown:
            raise DataError(f"{folder}: class folder(s) {unknown[:5]} are not in the given class list "
                            f"({len(self.given_classes)} classes); add them to it or remove the folders")
        return self.given_classes

    def class_names(self, split: str) -> tuple[str, ...]:
        self.check_split(split)
        return self.class_folders(self.root / split)

    def use_frame(self, frame: Frame) -> None:
        self.frame = frame

    def label_of(self, classes: tuple[str, ...]) -> dict[str, int]:
        return {c: i for i, c in enumerate(classes)}

    def list_files(self, split: str) -> tuple[list[Path], np.ndarray]:
        self.check_split(split)
        folder = self.root / split
        self.classes = self.class_folders(folder)
        label_of = self.label_of(self.classes)
        files, labels, empty = [], [], []
        for name in sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                empty.append(str(folder / name))
            files += found
            labels += [label_of[name]] * len(found)
        if empty:
            raise DataError(f"{len(empty)} class folder(s) hold no images: {', '.join(empty[:10])}; "
                            "add images or remove the folders")
        return files, np.array(labels, dtype=np.int64)

    def load(self, split: str, limit: int | None = None) -> ImageSet:
        files, labels = self.list_files(split)
        rows = class_balanced(labels, limit, len(self.classes))
        paths = [files[r] for r in rows]
        check_images(paths, self.root / split, self.workers)
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            frames = list(pool.map(lambda p: load_frame(p, self.frame), paths))
        sizes = sorted({tuple(f.shape[1:]) for f in frames})
        if len(sizes) > 1:
            raise DataError(f"the images of {self.root / split} have {len(sizes)} different sizes (e.g. "
                            f"{sizes[0]} and {sizes[-1]}); give the model's input frame (--crop, and --resize "
                            "for the shorter side before the centre crop)")
        ids = np.array([p.relative_to(self.root).as_posix() for p in paths])
        images = torch.stack(frames) if frames else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        return ImageSet(images, labels[rows], ids, self.classes)

    def mean_colour(self) -> tuple[float, ...] | None:
        return self.fixed_colour


class ImageNet(ImageFolder):
    """An image folder of ImageNet-1k: class folders must be wnids; labels are canonical 1k indices."""

    name = "imagenet"

    def __init__(self, root: str | Path, frame: Frame | None = None, workers: int = 8):
        super().__init__(root, frame or (256, 224), normalize=(IMAGENET_MEAN, IMAGENET_STD), mean_colour=IMAGENET_MEAN,
                         workers=workers)

    def class_folders(self, folder: Path) -> tuple[str, ...]:
        found = super().class_folders(folder)
        unknown = [c for c in found if c not in set(wnids())]
        if unknown:
            raise DataError(f"{folder}: {len(unknown)} class folder(s) are not ImageNet-1k wnids, e.g. "
                            f"{unknown[:5]}; for classes of your own use the imagefolder adapter")
        return wnids()

    def label_of(self, classes):
        return {w: i for i, w in enumerate(wnids())}


def check_same_classes(dataset: Dataset, test_split: str, in_one_only: set) -> None:
    """Class folders (or, for ImageNet's fixed class list, classes with images) in one split only are refused."""
    if in_one_only:
        raise DataError(f"the train and {test_split} folders of {dataset.root} hold different classes "
                        f"({sorted(in_one_only)[:5]} in one only); give both the same class folders, or fix the "
                        "order with dataset.classes")


def write_dataset_file(dataset: Dataset, out: str | Path, test_split: str = "test", stream: bool = False) -> dict:
    """The workflow's dataset file (see :mod:`overinterp.data`) from an image-folder adapter: its ``train`` and
    ``test_split`` splits at its frame; returns the images per split. Every later stage reads it.

    ``stream`` lists the files instead of holding the images (every file is decoded once here, so that a
    damaged one is named now, not days into a run): for datasets too large for memory."""
    from .data import validate_dataset
    from .utils import save_npz

    if "train" not in dataset.splits or test_split not in dataset.splits:
        raise DataError(f"{dataset.name} at {getattr(dataset, 'root', '?')} has the splits {', '.join(dataset.splits)}; "
                        f"the workflow needs 'train' and {test_split!r} (set dataset.test_split to the one to test on)")
    if stream:
        if dataset.frame is None:
            raise DataError("a streamed dataset needs its frame: set dataset.crop (and dataset.resize), the models' "
                            "input size")
        listed, classes = {}, {}
        for name, split in (("train", "train"), ("test", test_split)):
            files, labels = dataset.list_files(split)
            classes[name] = dataset.classes
            check_images(files, dataset.root / split, dataset.workers, desc=f"check {split} images")
            listed[name] = (np.array([f.relative_to(dataset.root).as_posix() for f in files]), labels)
        present = {name: {classes[name][label] for label in np.unique(labels)} for name, (_, labels) in listed.items()}
        check_same_classes(dataset, test_split, (set(classes["train"]) ^ set(classes["test"]))
                           | (present["train"] ^ present["test"]))
        arrays = {"train_files": listed["train"][0], "train_labels": listed["train"][1],
                  "test_files": listed["test"][0], "test_labels": listed["test"][1],
                  "classes": np.array(dataset.classes), "root": np.array(str(dataset.root.resolve())),
                  "frame": np.array(dataset.frame, dtype=np.int64)}
        validate_dataset(Path(out), arrays)
        save_npz(out, **arrays)
        return {"train": len(listed["train"][1]), test_split: len(listed["test"][1]),
                "classes": len(dataset.classes), "size": [dataset.frame[1]] * 2, "streamed": True}
    train, test = dataset.load("train"), dataset.load(test_split)
    check_same_classes(dataset, test_split, set(train.classes) ^ set(test.classes))
    if train.images.shape[2:] != test.images.shape[2:]:
        raise DataError(f"the train and {test_split} images have different sizes ({tuple(train.images.shape[2:])} "
                        f"and {tuple(test.images.shape[2:])}); set dataset.crop (and dataset.resize)")
    arrays = {"train_images": train.images.numpy(), "train_labels": train.labels,
              "test_images": test.images.numpy(), "test_labels": test.labels, "classes": np.array(train.classes)}
    frame = dataset.frame or tuple(train.images.shape[2:])
    validate_dataset(Path(out), arrays)
    save_npz(out, frame=np.array(frame, dtype=np.int64), **arrays)
    return {"train": len(train), test_split: len(test), "classes": len(train.classes),
            "size": list(train.images.shape[2:])}


ADAPTERS = {"cifar10": Cifar10, "imagefolder": ImageFolder, "imagenet": ImageNet}


def open_dataset(spec: str, frame: Frame | None = None, classes: list[str] | None = None,
                 normalize=None, workers: int = 8) -> Dataset:
    """The adapter for ``KIND:PATH`` (KIND one of cifar10, imagefolder, imagenet); a bare path is an image
    folder, or the CIFAR-10 array file when it ends in .npz."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ADAPTERS:
        kind, path = ("cifar10" if spec.endswith(".npz") else "imagefolder"), spec
    if kind == "cifar10":
        return Cifar10(path)
    if kind == "imagenet":
        return ImageNet(path, frame, workers)
    return ImageFolder(path, frame, classes, normalize, workers=workers)
