"""Shared helpers: the user-facing error type, atomic file writes, safe file reading, devices and seeding."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch


class DataError(RuntimeError):
    """A problem with the user's files or settings that they can fix; the message says what and how."""


class CorruptFileError(DataError):
    """A file the pipeline wrote earlier (model, result, keep-mask) that cannot be read back."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}. Delete it and rerun the rule (or command) that makes it.")
        self.path = Path(path)


_UMASK = os.umask(0)
os.umask(_UMASK)


class CodeInFileError(DataError):
    """A torch file that names Python callables: refused unread, since loading it could run code."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` and move it over ``path`` only if the block succeeds.

    A crash or kill inside the block leaves no partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give outputs the usual permissions
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


# What numpy and torch raise on a truncated or garbage file (zip, pickle and stream errors among them).
_UNREADABLE = (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, OSError, RuntimeError, KeyError)


def load_npz(path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (never unpickling objects); a missing, truncated or garbage file,
    or one without the ``required`` arrays, is a one-line error naming the file."""
    if not Path(path).exists():
        raise DataError(f"{path} does not exist. Run the rule (or command) that makes it first.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except _UNREADABLE as err:
        raise CorruptFileError(path, f"not a readable .npz array file ({type(err).__name__}: {err})") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise CorruptFileError(path, f"the arrays {', '.join(missing)} are missing")
    return arrays


def load_torch(path, map_location="cpu"):
    """A file written by ``save_torch``, loaded with ``weights_only=True``: tensors, numbers, strings and
    containers only, so a crafted file cannot run code. Anything else is a one-line error naming the file."""
    import torch

    if not Path(path).exists():
        raise DataError(f"{path} does not exist. Run the rule (or command) that makes it first.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # A crafted file names a callable (a GLOBAL); garbage fails on some other opcode.
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if not found:
            raise CorruptFileError(path, "not a readable torch file, truncated or garbage") from None
        raise CodeInFileError(
            f"{path} holds objects other than tensors and plain values ({found[0]}); it was refused unread "
            "because loading it could run code. Use only files this pipeline wrote (or a torch.save of a plain "
            "state dict); delete it and rerun the rule that makes it.") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - garbage breaks the unpickler in any way (IndexError, TypeError, ...)
        raise CorruptFileError(path, f"not a readable torch file, truncated or garbage ({type(err).__name__})") from None


def save_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load_json(path):
    """A JSON file the pipeline wrote; a missing, truncated or garbage one is a one-line error naming it."""
    if not Path(path).exists():
        raise DataError(f"{path} does not exist. Run the rule (or command) that makes it first.")
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, OSError) as err:
        raise CorruptFileError(path, f"not readable JSON ({err})") from None


def save_torch(path, obj) -> None:
    # Through a file object: given a path, torch.save names the archive inside after the (random)
    # temporary file, and the same model would never give the same bytes twice.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_dataframe(path, frame) -> None:
    """Write a pandas DataFrame as CSV (or Markdown for ``.md``) atomically."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".md"):
            tmp.write_text(frame.to_markdown(index=False) + "\n")
        else:
            frame.to_csv(tmp, index=False)


def add_device_argument(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: CUDA when present (default: auto)")


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU. With several GPUs visible (one machine
    running ``--resources gpu=N`` jobs side by side) each process claims a GPU no other one holds."""
    if name in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if count == 1:
            return torch.device("cuda")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
        return torch.device(f"cuda:{claim_gpu(ids)}")
    return torch.device(name)


_held_gpu_locks: dict[Path, object] = {}  # lock file -> its open handle, held until the process exits


def claim_gpu(ids: list[str], lock_dir: str | os.PathLike | None = None) -> int:
    """Index into ``ids`` (GPU identifiers) of a GPU that no other process holds, locked for this process.

    The locks are flock(2) locks on files in ``lock_dir``, released by the kernel when the process
    ends, so a killed job never leaves a GPU claimed. When every GPU is held, GPUs are shared.
    """
    import fcntl

    lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"overinterp-gpus-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    paths = [lock_dir / f"gpu-{gpu}.lock" for gpu in ids]
    for index, path in enumerate(paths):
        if path in _held_gpu_locks:  # claimed earlier by this process
            return index
    for index, path in enumerate(paths):
        handle = open(path, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_gpu_locks[path] = handle
        return index
    return os.getpid() % len(ids)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
