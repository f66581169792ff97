"""``overinterp download`` and ``overinterp convert``."""
from __future__ import annotations

from . import data


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("download", help="download an archive, verifying its md5 before keeping it")
    p.add_argument("--url", default=data.CIFAR10_URL, help="http(s):// or file:// URL")
    p.add_argument("--md5", default=data.CIFAR10_MD5, help="the archive's verified md5 (default: the official one)")
    p.add_argument("--out", required=True, help="where the verified archive is kept")
    p.set_defaults(handler=lambda a: data.download(a.url, a.out, a.md5) and 0)

    p = subparsers.add_parser("convert", help="convert the CIFAR-10 python archive into the pipeline's .npz")
    p.add_argument("--archive", required=True, help="cifar-10-python.tar.gz")
    p.add_argument("--out", required=True, help="the pipeline's dataset file (.npz)")
    p.set_defaults(handler=lambda a: data.convert(a.archive, a.out) and 0)
