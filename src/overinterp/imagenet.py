"""ImageNet from the user's own copy: layout validation and indexing, per-model preprocessing, models.

ImageNet cannot be downloaded automatically (its licence), so ``imagenet.root`` points at a copy in the
standard layout, ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (validation images sorted into class
folders). :func:`build_index` checks it up front (both splits present, the expected number of class
folders, the same classes in both, every image decodable) and writes one CSV per split (path relative to
the root, wnid, label). Labels are the canonical ImageNet-1k class indices (position of the wnid in the
sorted list of the 1,000 wnids), so a copy with fewer classes still lines up with pretrained networks.

Every image goes through the evaluation frame of the model: shorter side resized to ``resize``, centre
crop ``crop`` (342 -> 299 for Inception v3, 256 -> 224 for ResNet50). Pixel subsets (keep-masks) live in
that frame; masked pixels take the baseline (0) after ImageNet normalisation, i.e. the mean colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.transforms import RandomResizedCrop

from .data import DataError, Normalizer, model_inputs
from .datasets import check_images, load_frame, wnids
from .efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
from .models import imagenet_architecture
from .subsets import unpack_keep
from .utils import load_torch, save_dataframe

SPLITS = ("train", "val")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
LAYOUT_HINT = ("Expected ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG (the validation images sorted "
               "into their class folders, as torchvision's ImageFolder reads them); set `imagenet.root`.")


def normalizer(baseline: float = 0.0) -> Normalizer:
    return Normalizer(IMAGENET_MEAN, IMAGENET_STD, baseline)


# ---------------------------------------------------------------------------------------------------------
# Layout validation and the index


def _list_split(root: Path, split: str, num_classes: int) -> pd.DataFrame:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"ImageNet root {root} has no {split!r} folder. {LAYOUT_HINT}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    known = set(wnids())
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise DataError(
            f"{folder}: {len(unknown)} class folder(s) are not ImageNet-1k wnids, e.g. {unknown[:5]}. "
            f"{LAYOUT_HINT}")
    if len(classes) != num_classes:
        raise DataError(
            f"{folder} has {len(classes)} class folders, expected {num_classes}. A partial copy? "
            f"Complete it, or set `imagenet.num_classes: {len(classes)}` to use these classes only. {LAYOUT_HINT}")
    label_of = {w: i for i, w in enumerate(wnids())}
    rows = []
    for wnid in classes:
        files = sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder / wnid} holds no .JPEG/.jpg/.png images. {LAYOUT_HINT}")
        rows += [(f.relative_to(root).as_posix(), wnid, label_of[wnid]) for f in files]
    return pd.DataFrame(rows, columns=["path", "wnid", "label"])


def build_index(root: str | Path, out_dir: str | Path, num_classes: int = 1000, workers: int = 8) -> dict:
    """Validate the copy at ``root`` and write ``{out_dir}/{train,val}.csv``; returns images per split."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} does not exist or is not a folder. {LAYOUT_HINT}")
    tables = {split: _list_split(root, split, num_classes) for split in SPLITS}
    if set(tables["train"]["wnid"]) != set(tables["val"]["wnid"]):
        only = sorted(set(tables["train"]["wnid"]) ^ set(tables["val"]["wnid"]))
        raise DataError(f"{root}: train and val hold different classes ({only[:5]} in one only). {LAYOUT_HINT}")
    for split, table in tables.items():
        check_images([root / p for p in table["path"]], root / split, workers, desc=f"check {split} images")
    for split, table in tables.items():
        save_dataframe(Path(out_dir) / f"{split}.csv", table)
    return {split: len(table) for split, table in tables.items()}


@dataclass
class IndexedSplit:
    """Images of one split: ``index`` = rows of the split's index CSV (keep-mask and SIS files store it)."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def load_index(index_csv: str | Path, root: str | Path, per_class: int | None = None) -> IndexedSplit:
    """The split listed in ``index_csv``; with ``per_class``, only the first ``per_class`` images of each class."""
    index_csv = Path(index_csv)
    if not index_csv.exists():
        raise DataError(f"ImageNet index {index_csv} is missing; run `overinterp imagenet-index` (the workflow "
                        "does) to validate the copy and write it.")
    table = pd.read_csv(index_csv)
    rows = np.arange(len(table))
    if per_class is not None:
        rows = rows[table.groupby("label").cumcount().to_numpy() < per_class]
    return IndexedSplit(Path(root).expanduser(), table["path"].iloc[rows].tolist(),
                        table["label"].to_numpy()[rows].astype(np.int64), rows)


# ---------------------------------------------------------------------------------------------------------
# Images, keep-masks and augmentation


class ImageNetDataset(torch.utils.data.Dataset):
    """Items ``(input, label, position)``: the normalised evaluation frame, masked where the keep-mask is False
    (or the mask alone for the positions-only control) and, for training, augmented after masking.

    Augmentation is the standard recipe's random-resized crop and flip, taken within the evaluation frame of
    the already masked image, so that image and mask move together and a fresh draw is made every epoch.
    Full-image models get the same, so the three arms (full, BS, random) differ only in the pixels kept.
    """

    def __init__(self, split: IndexedSplit, resize: int, crop: int, keep: tuple[np.ndarray, int, int] | None = None,
                 positions_only: bool = False, augment_min_scale: float | None = None, flip: bool = False,
                 baseline: float = 0.0):
        if positions_only and keep is None:
            raise ValueError("the positions-only control needs keep-masks")
        if keep is not None and (keep[1], keep[2]) != (crop, crop):
            raise ValueError(f"keep-masks are {keep[1]}x{keep[2]} but the model's frame is {crop}x{crop}")
        self.split, self.resize, self.crop, self.keep = split, resize, crop, keep
        self.positions_only, self.min_scale, self.flip = positions_only, augment_min_scale, flip
        self.normalizer = normalizer(baseline)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        frame = load_frame(self.split.root / self.split.paths[i], (self.resize, self.crop))
        label = int(self.split.labels[i])
        keep = None
        if self.keep is not None:
            bits, height, width = self.keep
            keep = torch.from_numpy(unpack_keep(bits[i:i + 1], height, width)).unsqueeze(1)
        x = model_inputs(self.normalizer, frame[None], keep, self.positions_only)[0]
        if self.min_scale is not None:
            box = RandomResizedCrop.get_params(x, scale=(self.min_scale, 1.0), ratio=(3 / 4, 4 / 3))
            x = TF.resized_crop(x, *box, [self.crop, self.crop], antialias=True)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label, i


# ---------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    resize: int
    crop: int
    weights_enum: str | None  # torchvision's weights enum, None where torchvision has no such model


MODEL_SPECS = {
    "inception_v3": ModelSpec(342, 299, "Inception_V3_Weights"),
    "resnet50": ModelSpec(256, 224, "ResNet50_Weights"),
    "efficientnet_lite0": ModelSpec(256, 224, None),
}


def pretrained_state_dict(arch: str, weights: str) -> dict:
    """State dict for ``arch`` from ``weights``: a torchvision weights name (e.g. IMAGENET1K_V1, fetched into the
    torch hub cache) or the path of a state-dict file."""
    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"weights file {path} does not exist")
        state = load_torch(path)
        return state.get("state_dict", state)
    spec = MODEL_SPECS[arch]
    if spec.weights_enum is None:
        raise ValueError(f"torchvision has no pretrained {arch}; give the path of a state-dict file as its weights")
    import torchvision.models as tvm

    try:
        entry = tvm.get_weight(f"{spec.weights_enum}.{weights}")
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"{spec.weights_enum} has no weights {weights!r}; see torchvision.models "
                         f"(e.g. IMAGENET1K_V1)") from None
    try:
        return entry.get_state_dict(progress=True, check_hash=True)
    except OSError as err:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
        raise DataError(
            f"Cannot fetch {spec.weights_enum}.{weights} from {entry.url} ({err}). On an offline machine copy "
            f"the file to {cache} (the torch hub cache; TORCH_HOME moves it), fetched on a connected machine "
            f"with `python -c \"import torchvision; torchvision.models.get_weight('{spec.weights_enum}."
            f"{weights}').get_state_dict()\"`, or set the model's weights to a state-dict file.") from err


def pretrained_model(arch: str, weights: str) -> nn.Module:
    model = imagenet_architecture(arch)
    state = {k: v for k, v in pretrained_state_dict(arch, weights).items() if not k.startswith("AuxLogits.")}
    model.load_state_dict(state)
    return model.eval()
