"""Shared fixtures: a small CIFAR-10 archive (real images from ../shared/data when present, else synthetic),
and a check for system components that CI installs."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def require_program(name: str) -> str:
    """Path of a system program; skips the test where it is missing, except in CI where it must exist."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package needed; `make system-deps` installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide it: {message}")
        pytest.skip(message)
    return path


def _synthetic_archive(out: Path, train_per_class: int, test_per_class: int) -> Path:
    """The official layout with random class-coloured images, for clones without ../shared."""
    rng = np.random.default_rng(0)

    def batch(per_class):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
        images[:, labels % 3] = 0  # a little class signal
        return {b"data": images.reshape(len(labels), -1), b"labels": labels.tolist()}

    train = batch(train_per_class)
    parts = np.array_split(np.arange(len(train[b"labels"])), 5)
    members = {f"data_batch_{i + 1}": {b"data": train[b"data"][p], b"labels": [train[b"labels"][j] for j in p]}
               for i, p in enumerate(parts)}
    members["test_batch"] = batch(test_per_class)
    members["batches.meta"] = {b"label_names": [c.encode() for c in (
        "airplane automobile bird cat deer dog frog horse ship truck".split())]}
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in members.items():
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return archive


def build_archive(out: Path, train_per_class: int, test_per_class: int) -> tuple[Path, str]:
    """A class-balanced CIFAR-10 archive in the official layout and its md5."""
    script = SHARED_DATA / "make-cifar10-archive"
    if script.exists():
        subprocess.run([sys.executable, str(script), str(out), "--train", str(train_per_class),
                        "--test", str(test_per_class)], check=True, capture_output=True)
        archive = out / "cifar-10-python.tar.gz"
    else:
        archive = _synthetic_archive(out, train_per_class, test_per_class)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory) -> tuple[Path, str]:
    """(archive path, md5) of 500 training and 200 test images."""
    return build_archive(tmp_path_factory.mktemp("cifar"), 50, 20)


@pytest.fixture(scope="session")
def cifar_npz(cifar_archive, tmp_path_factory) -> Path:
    """The converted dataset file for the small archive."""
    from overinterp.data import convert

    return convert(cifar_archive[0], tmp_path_factory.mktemp("converted") / "cifar10.npz")


@pytest.fixture(scope="session")
def cifar_imagefolder(cifar_npz, tmp_path_factory) -> Path:
    """ROOT/{train,test}/<class>/*.png: 300 training and 100 test images of CIFAR-10 as lossless PNGs
    (`make-cifar10-archive --imagefolder` where ../shared is present, else written from the small dataset)."""
    out = tmp_path_factory.mktemp("imagefolder")
    script = SHARED_DATA / "make-cifar10-archive"
    if script.exists():
        subprocess.run([sys.executable, str(script), str(out), "--train", "30", "--test", "10", "--imagefolder"],
                       check=True, capture_output=True)
        return out / "imagefolder"
    from PIL import Image

    arrays = np.load(cifar_npz)
    for split, per_class in (("train", 30), ("test", 10)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        for c, name in enumerate(arrays["classes"]):
            (out / "imagefolder" / split / str(name)).mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                Image.fromarray(images[i].transpose(1, 2, 0)).save(out / "imagefolder" / split / str(name) / f"{k:04d}.png")
    return out / "imagefolder"


def snakemake(workdir: Path, *args: str, configfiles: tuple[Path, ...] = (), check: bool = True,
              timeout: float = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the project's workflow with ``workdir`` as working directory (``env``: extra environment
    variables); returns the finished process."""
    env = dict(os.environ, **(env or {}), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    command = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if configfiles:
        command += ["--configfile", *map(str, configfiles)]
    result = subprocess.run(command + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def job_counts(snakemake_output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count, "total": count}; empty when there is nothing
    to do."""
    if "Job stats:" not in snakemake_output:
        return {}
    counts = {}
    for line in snakemake_output.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def source_config(workdir: Path, archive: Path, md5: str, corrupted: tuple[Path, str] | None = None) -> Path:
    """A configfile pointing the download at a local archive, as a user behind a firewall would (and the
    CIFAR-10-C download at ``corrupted``, (archive, md5), when given)."""
    path = workdir / "source.yaml"
    text = f"cifar10:\n  url: {archive.resolve().as_uri()}\n  md5: {md5}\n"
    if corrupted:
        text += f"cifar10c:\n  url: {corrupted[0].resolve().as_uri()}\n  md5: {corrupted[1]}\n"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def cifar10c_archive(cifar_archive, tmp_path_factory) -> tuple[Path, str]:
    """(archive, md5) of a CIFAR-10-C-layout archive of the small archive's test images under the smoke
    configuration's corruptions, made with the imagecorruptions package."""
    import yaml

    from overinterp.corruptions import make_archive

    corruptions = yaml.safe_load((REPO / "config/smoke.yaml").read_text())["cifar10c"]["corruptions"]
    archive = make_archive(cifar_archive[0], tmp_path_factory.mktemp("cifar10c") / "CIFAR-10-C.tar", corruptions)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def smoke_run(cifar_archive, cifar10c_archive, tmp_path_factory) -> Path:
    """The whole smoke configuration run once as a user runs it, by `make run` (the workflow with its progress
    lines, then the report); returns its working directory, with the console output in ``console.txt``."""
    workdir = tmp_path_factory.mktemp("smoke")
    configs = (REPO / "config" / "smoke.yaml", source_config(workdir, *cifar_archive, cifar10c_archive))
    args = f"--configfile {' '.join(map(str, configs))} --directory {workdir}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["make", "-o", ".venv/.installed", f"BIN={BIN}", "run", f"ARGS={args}", "CORES=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    (workdir / "console.txt").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return workdir


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, small networks run many times faster than with two
    threads that wait on each other (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A headless Chromium driven through chromedriver: the human-evaluation page and the report are opened in
# it as a reader would.
@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    require_program("chromium")
    driver_path = require_program("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = require_program("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,900", f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()
