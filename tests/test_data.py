"""Download and conversion: checksums, corrupt and truncated archives, unreachable URLs, atomic outputs."""
import http.server
import threading

import numpy as np
import pytest

from overinterp import cli
from overinterp.data import DataError, balanced_subset, convert, download, load_split


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path; yields its base URL."""
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_over_file_and_http(cifar_archive, tmp_path, http_server):
    archive, md5 = cifar_archive
    via_file = download(archive.as_uri(), tmp_path / "a/file.tar.gz", md5)
    (tmp_path / "served.tar.gz").write_bytes(archive.read_bytes())
    via_http = download(f"{http_server}/served.tar.gz", tmp_path / "b/http.tar.gz", md5)
    assert via_file.read_bytes() == via_http.read_bytes() == archive.read_bytes()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_wrong_checksum_keeps_nothing(cifar_archive, tmp_path):
    archive, _ = cifar_archive
    with pytest.raises(DataError, match=r"Checksum mismatch.*cifar10.md5"):
        download(archive.as_uri(), tmp_path / "out/cifar.tar.gz", "0" * 32)
    assert leftovers(tmp_path / "out") == []


def test_truncated_http_download_is_reported(cifar_archive, tmp_path, http_server):
    archive, md5 = cifar_archive
    (tmp_path / "short.tar.gz").write_bytes(archive.read_bytes()[:1000])
    with pytest.raises(DataError, match="Checksum mismatch"):
        download(f"{http_server}/short.tar.gz", tmp_path / "out/cifar.tar.gz", md5)
    assert leftovers(tmp_path / "out") == []


def test_unreachable_url_names_url_and_fix(tmp_path):
    url = (tmp_path / "missing.tar.gz").as_uri()
    with pytest.raises(DataError, match=r"Could not download .*missing\.tar\.gz.*cifar10\.url"):
        download(url, tmp_path / "out/cifar.tar.gz", "0" * 32)
    assert leftovers(tmp_path / "out") == []


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    code = cli.main(["download", "--url", "http://127.0.0.1:9/none.tar.gz", "--md5", "0" * 32,
                     "--out", str(tmp_path / "x.tar.gz")])
    assert code == 2
    assert "Could not download http://127.0.0.1:9/none.tar.gz" in capsys.readouterr().err


def test_convert(cifar_npz):
    train, test = load_split(cifar_npz, "train"), load_split(cifar_npz, "test")
    assert train.images.shape == (500, 3, 32, 32) and test.images.shape == (200, 3, 32, 32)
    assert train.images.dtype.is_floating_point is False
    assert np.bincount(train.labels.numpy()).tolist() == [50] * 10
    assert train.classes[:3] == ["airplane", "automobile", "bird"]
    sub = load_split(cifar_npz, "train", 100)
    assert np.bincount(sub.labels.numpy()).tolist() == [10] * 10
    assert np.array_equal(sub.images.numpy(), train.images.numpy()[sub.index])


def test_corrupt_and_truncated_archives(cifar_archive, tmp_path):
    data = cifar_archive[0].read_bytes()
    (tmp_path / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        convert(tmp_path / "truncated.tar.gz", tmp_path / "out.npz")
    (tmp_path / "garbage.tar.gz").write_bytes(b"not an archive" * 100)
    with pytest.raises(DataError, match="truncated or corrupt"):
        convert(tmp_path / "garbage.tar.gz", tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_unexpected_layout(tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("something/else.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(DataError, match="does not have the CIFAR-10 python layout.*batches.meta"):
        convert(tmp_path / "other.tar.gz", tmp_path / "out.npz")
    assert leftovers(tmp_path) == ["other.tar.gz"]


def test_balanced_subset_rejects_uneven_sizes():
    with pytest.raises(DataError, match="multiple of the number of classes"):
        balanced_subset(np.repeat(np.arange(10), 5), 15)


def test_the_committed_data_pointer_names_the_official_archive():
    """data.dvc is in every clone: `dvc pull data.dvc` fetches the archive that the download rule checks."""
    import yaml

    from conftest import REPO
    from overinterp.data import CIFAR10_MD5

    (out,) = yaml.safe_load((REPO / "data.dvc").read_text())["outs"]
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert out == {"md5": CIFAR10_MD5, "size": 170498071, "hash": "md5", "path": "data/cifar10/cifar-10-python.tar.gz"}
    assert config["cifar10"]["md5"] == CIFAR10_MD5
    rule = (REPO / "workflow/rules/data.smk").read_text()
    assert f'"{out["path"]}"' in rule  # the download rule's output is the file the pointer tracks
