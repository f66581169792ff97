"""No file the pipeline reads runs code, and no damaged or mismatched input gives a silent wrong result:
each case is a real file built here (malicious pickles, truncated archives, garbage results), read
through the command line a rule would use."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from overinterp.cli import main
from overinterp.data import convert, load_split
from overinterp.models import build_model, load_model, save_model
from overinterp.sis import BackSelectResult
from overinterp.subsets import load_keep_masks, random_keep, save_keep_masks
from overinterp.utils import CorruptFileError, DataError, load_torch


class Payload:
    """Unpickling this runs ``os.system``: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_error(capsys) -> str:
    """The command's error: one line, no traceback (a download's progress bar may stand before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("overinterp "), err
    return lines[0]


# ----------------------------------------------------------------------------------- code execution
def test_a_crafted_training_checkpoint_runs_nothing(cifar_npz, tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"fingerprint": Payload(marker), "epoch": 1}, checkpoint)
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload is real: plain pickle runs it
    assert (tmp_path / "control").exists()
    code = main(["train", "--data", str(cifar_npz), "--arch", "tiny", "--recipe", '{"epochs": 1, "batch_size": 50}',
                 "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.pt"),
                 "--metrics", str(tmp_path / "m.csv")])
    err = one_line_error(capsys)
    assert code == 2 and not marker.exists() and not (tmp_path / "m.pt").exists()
    assert str(checkpoint) in err and "could run code" in err and "posix.system" in err


def test_a_crafted_model_file_runs_nothing(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save({"arch": "tiny", "state_dict": {}, "meta": Payload(marker)}, path)
    with pytest.raises(DataError, match=f"{path}.*could run code"):
        load_model(path)
    assert not marker.exists()


def archive_with(tmp_path: Path, member: str, blob: bytes, base: Path) -> Path:
    """A copy of the real archive ``base`` with one member replaced by ``blob``."""
    out = tmp_path / "crafted.tar.gz"
    with tarfile.open(base, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name.endswith(member):
                data, info.size = blob, len(blob)
            dst.addfile(info, io.BytesIO(data))
    return out


def test_a_crafted_archive_runs_nothing_even_with_its_checksum_configured(cifar_archive, tmp_path, capsys):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2)
    crafted = archive_with(tmp_path, "data_batch_1", blob, cifar_archive[0])
    md5 = hashlib.md5(crafted.read_bytes()).hexdigest()
    # The user did what a mismatch once told them: configured the checksum of what arrived.
    assert main(["download", "--url", crafted.as_uri(), "--md5", md5, "--out", str(tmp_path / "a.tar.gz")]) == 0
    capsys.readouterr()
    code = main(["convert", "--archive", str(tmp_path / "a.tar.gz"), "--out", str(tmp_path / "c.npz")])
    err = one_line_error(capsys)
    assert code == 2 and not marker.exists() and not (tmp_path / "c.npz").exists()
    assert "a.tar.gz" in err and "data_batch_1" in err and "posix.system" in err and "source you trust" in err


def test_a_checksum_mismatch_does_not_hand_out_the_checksum(cifar_archive, tmp_path, capsys):
    archive, md5 = cifar_archive
    assert main(["download", "--url", archive.as_uri(), "--md5", "0" * 32, "--out", str(tmp_path / "a.tar.gz")]) == 2
    err = one_line_error(capsys)
    assert md5 not in err and "verify the source" in err and not (tmp_path / "a.tar.gz").exists()


def test_the_restricted_unpickler_reads_the_real_archive(cifar_archive, tmp_path):
    arrays = np.load(convert(cifar_archive[0], tmp_path / "c.npz"))
    assert arrays["train_images"].shape == (500, 3, 32, 32) and arrays["test_labels"].max() == 9


# ------------------------------------------------------------------------------ damaged result files
@pytest.fixture
def result_files(cifar_npz, tmp_path):
    """A model, a keep-mask file and a BackSelect result, each truncated and each replaced by garbage."""
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_model(model, build_model("tiny"), "tiny")
    masks = tmp_path / "masks.npz"
    test = load_split(cifar_npz, "test")
    save_keep_masks(masks, 32, 32, test=(test.index, random_keep(len(test), 1024, 52, 0)))
    files = {}
    for name, path in (("model", model), ("masks", masks)):
        data = path.read_bytes()
        files[f"truncated {name}"] = tmp_path / f"truncated-{path.name}"
        files[f"truncated {name}"].write_bytes(data[: len(data) // 2])
        files[f"garbage {name}"] = tmp_path / f"garbage-{path.name}"
        files[f"garbage {name}"].write_bytes(os.urandom(len(data)))
    return files


@pytest.mark.parametrize("which", ["truncated model", "garbage model", "truncated masks", "garbage masks"])
def test_damaged_files_give_one_line_naming_file_and_fix(which, result_files, cifar_npz, tmp_path, capsys):
    path = result_files[which]
    model = result_files["truncated model"].with_name("model.pt")
    args = ["evaluate", "--data", str(cifar_npz), "--split", "test", "--device", "cpu",
            "--predictions", str(tmp_path / "p.csv"), "--summary", str(tmp_path / "s.json")]
    args += ["--model", str(path)] if "model" in which else ["--model", str(model), "--keep-masks", str(path)]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert str(path) in err and "Delete it and rerun" in err and not (tmp_path / "s.json").exists()


def test_damaged_sis_results_name_the_file(tmp_path):
    path = tmp_path / "test.npz"
    path.write_bytes(b"PK\x03\x04" + os.urandom(300))
    with pytest.raises(DataError, match=f"{path}: not a readable .npz.*Delete it and rerun"):
        BackSelectResult.load(path)
    np.savez(path, order=np.zeros((1, 4)))
    with pytest.raises(DataError, match="the arrays index, target, full_confidence, height, width are missing"):
        BackSelectResult.load(path)
    np.savez(path, index=np.zeros(1), target=np.zeros(1), full_confidence=np.zeros(1), height=2, width=2,
             order=np.zeros((1, 4)))
    with pytest.raises(DataError, match="neither order and values nor removal_step and step_values"):
        BackSelectResult.load(path)


def test_a_corrupt_sis_checkpoint_is_discarded_and_recomputed(cifar_npz, tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_model(model, build_model("tiny"), "tiny")
    out = tmp_path / "shard0.npz"
    command = [sys.executable, "-m", "overinterp", "--threads", "1", "sis", "--data", str(cifar_npz), "--model",
               str(model), "--split", "test", "--method", "gradient", "--pixels-per-step", "256",
               "--limit", "3", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    reference = BackSelectResult.load(out)
    out.unlink()
    partial = tmp_path / "shard0.partial.npz"
    partial.write_bytes(b"PK\x03\x04 half a checkpoint")
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "discarding the unreadable checkpoint" in again.stderr and str(partial) in again.stderr
    assert not partial.exists()
    np.testing.assert_array_equal(BackSelectResult.load(out).order, reference.order)


# ------------------------------------------------------------------------------- wrong dataset files
def test_a_dataset_smaller_than_configured_is_refused(cifar_npz, tmp_path, capsys):
    # The archive has 200 test images (20 per class); the configuration asks for 1,000.
    code = main(["evaluate", "--data", str(cifar_npz), "--split", "test", "--size", "1000",
                 "--model", str(tmp_path / "none.pt"), "--predictions", str(tmp_path / "p.csv"),
                 "--summary", str(tmp_path / "s.json")])
    err = one_line_error(capsys)
    assert code == 2 and "has 200 images" in err and "subset of 1000" in err and "test_size" in err


def test_the_real_image_count_is_recorded_where_all_are_used(cifar_npz, tmp_path):
    assert main(["train", "--data", str(cifar_npz), "--arch", "tiny", "--recipe", '{"epochs": 1, "batch_size": 50}',
                 "--device", "cpu", "--out", str(tmp_path / "m.pt"), "--metrics", str(tmp_path / "m.csv")]) == 0
    meta = torch.load(tmp_path / "m.pt", weights_only=True)["meta"]
    assert (meta["train_images"], meta["test_images"]) == (500, 200)


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.update(test_images=a["test_images"][:, :, :16, :16]), r"'test_images' has shape \(200, 3, 16, 16\)"),
    (lambda a: a.update(test_images=a["test_images"].astype(np.float32) / 255), r"'test_images' has dtype float32"),
    (lambda a: a.update(test_labels=a["test_labels"][:-5]), r"'test_labels' has 195 labels for 200 images"),
    (lambda a: a.update(test_labels=a["test_labels"] + 5), r"'test_labels' has labels 5\.\.14 outside 0\.\.9"),
    (lambda a: a.pop("train_labels"), r"the arrays train_labels are missing"),
])
def test_a_malformed_dataset_file_names_the_array(damage, message, cifar_npz, tmp_path, capsys):
    arrays = dict(np.load(cifar_npz))
    damage(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    torch.manual_seed(0)
    save_model(tmp_path / "m.pt", build_model("tiny"), "tiny")
    code = main(["evaluate", "--data", str(path), "--split", "test", "--model", str(tmp_path / "m.pt"),
                 "--predictions", str(tmp_path / "p.csv"), "--summary", str(tmp_path / "s.json")])
    err = one_line_error(capsys)
    assert code == 2 and str(path) in err and __import__("re").search(message, err), err
    assert not (tmp_path / "s.json").exists()


def test_keep_masks_of_other_images_are_refused(cifar_npz, tmp_path):
    test = load_split(cifar_npz, "test")
    save_keep_masks(tmp_path / "k.npz", 32, 32, test=(test.index[:10], random_keep(10, 1024, 52, 0)))
    with pytest.raises(ValueError, match="made for other images"):
        load_keep_masks(tmp_path / "k.npz", "test", test.index)


def test_any_garbage_torch_file_is_a_corrupt_file_error(tmp_path):
    """Random bytes break torch's weights-only unpickler in many ways (an empty stack, a bad opcode, a wrong
    type); every one must be the same one-line error. Half the inputs start like a pickle, to get past the
    first opcode."""
    rng = np.random.default_rng(0)
    path = tmp_path / "garbage.pt"
    for i in range(300):
        data = rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
        path.write_bytes((b"\x80\x02" if i % 2 else b"") + data)
        with pytest.raises(CorruptFileError, match="not a readable torch file"):
            load_torch(path)
