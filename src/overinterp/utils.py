"""Shared helpers: atomic file writes, devices and seeding."""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` and move it over ``path`` only if the block succeeds.

    A crash or kill inside the block leaves no partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_npz(path, compressed: bool = False, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_dataframe(path, frame) -> None:
    """Write a pandas DataFrame as CSV (or Markdown for ``.md``) atomically."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".md"):
            tmp.write_text(frame.to_markdown(index=False) + "\n")
        else:
            frame.to_csv(tmp, index=False)


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
