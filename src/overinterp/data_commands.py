"""``overinterp download`` and ``overinterp convert``: the dataset file every later stage reads."""
from __future__ import annotations

import json

from . import data


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("download", help="download an archive, verifying its md5 before keeping it")
    p.add_argument("--url", default=data.CIFAR10_URL, help="http(s):// or file:// URL")
    p.add_argument("--md5", default=data.CIFAR10_MD5, help="the archive's verified md5 (default: the official one)")
    p.add_argument("--config-key", default="cifar10",
                   help="the workflow config entry with the url and md5, named in errors (default: cifar10)")
    p.add_argument("--out", required=True, help="where the verified archive is kept")
    p.set_defaults(handler=lambda a: data.download(a.url, a.out, a.md5, config_key=a.config_key) and 0)

    p = subparsers.add_parser("convert", help="the dataset file (.npz) from the CIFAR-10 archive or an image folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--archive", help="cifar-10-python.tar.gz")
    source.add_argument("--folder", help="an image folder ROOT/<split>/<class>/<images> (any format Pillow reads)")
    p.add_argument("--imagenet", action="store_true",
                   help="--folder: an ImageNet copy: class folders must be ImageNet-1k wnids, labels are the canonical "
                        "1k indices (so pretrained networks line up), whatever classes the copy holds")
    p.add_argument("--test-split", default="test", help="--folder: the split folder to test on (e.g. val)")
    p.add_argument("--resize", type=int, default=None,
                   help="--folder: shorter side before the centre crop (default: the crop)")
    p.add_argument("--crop", type=int, default=None,
                   help="--folder: centre crop = the models' input size (default: the images as they are, which "
                        "must then share one size)")
    p.add_argument("--classes", default=None,
                   help="--folder: comma-separated class order (default: sorted folder names)")
    p.add_argument("--stream", action="store_true",
                   help="--folder: list the image files instead of storing the images; every stage reads them "
                        "from the folder when it needs them (for datasets too large for memory; needs --crop)")
    p.add_argument("--workers", type=int, default=8, help="--folder: threads decoding images")
    p.add_argument("--out", required=True, help="the pipeline's dataset file (.npz)")
    p.set_defaults(handler=run_convert)


def run_convert(args) -> int:
    if args.archive:
        data.convert(args.archive, args.out)
        return 0
    from .datasets import ImageFolder, ImageNet, write_dataset_file

    if args.resize and not args.crop:
        raise data.DataError("--resize needs --crop: the centre crop is the models' input size")
    frame = (args.resize or args.crop, args.crop) if args.crop else None
    classes = args.classes.split(",") if args.classes else None
    if args.imagenet and classes:
        raise data.DataError("--imagenet fixes the classes (the 1k wnids in canonical order); drop --classes")
    folder = (ImageNet(args.folder, frame, workers=args.workers) if args.imagenet
              else ImageFolder(args.folder, frame, classes, workers=args.workers))
    print(json.dumps(write_dataset_file(folder, args.out, args.test_split, args.stream)))
    return 0
