"""``overinterp imagenet-*``: the ImageNet stage's commands (see overinterp.imagenet for the data layout)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


from . import imagenet, imagenet_report, imagenet_sis
from .imagenet_train import (ImageNetRecipe, imagenet_prediction_table, predict_dataset, summarize_imagenet,
                             train_imagenet)
from .efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
from .models import load_model, save_model
from .sis import last_steps_kept
from .subsets import load_packed_keep_masks, random_keep_packed, save_packed_keep_masks
from .utils import add_device_argument, load_torch, resolve_device, save_dataframe, save_json

IMAGENET_NORMALIZE = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
# Keep-mask files name the held-out split "test", whatever the dataset calls it (see overinterp.subsets).
KEEP_SPLIT = {"train": "train", "val": "test"}


def _frame_args(p) -> None:
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before the centre crop (default: the architecture's standard, e.g. 342)")
    p.add_argument("--crop", type=int, default=None,
                   help="centre crop = the model's input size (default: the architecture's standard, e.g. 299)")


def _frame(arch: str, args) -> tuple[int, int]:
    spec = imagenet.MODEL_SPECS[arch]
    return args.resize or spec.resize, args.crop or spec.crop


def _model_frame(path) -> tuple[int, int]:
    """The evaluation frame a model file was made for (its images and keep-masks must use the same)."""
    meta = load_torch(path).get("meta", {})
    if "crop" not in meta:
        raise ValueError(f"{path} records no image frame; make it with `overinterp imagenet-model` or imagenet-train")
    return meta["resize"], meta["crop"]


def _split_args(p, split_choices=("train", "val")) -> None:
    p.add_argument("--index-dir", required=True, help="folder of the train.csv / val.csv written by imagenet-index")
    p.add_argument("--root", required=True, help="the ImageNet copy (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)")
    if split_choices:
        p.add_argument("--split", default="val", choices=split_choices, help="which split (default: val)")
    p.add_argument("--per-class", type=int, default=None, help="first N images of each class (default: all)")


def _load_split(args):
    return imagenet.load_index(Path(args.index_dir) / f"{args.split}.csv", args.root, args.per_class)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("imagenet-index", help="validate an ImageNet copy and index its train and val images")
    p.add_argument("--root", required=True, help="the ImageNet copy (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)")
    p.add_argument("--num-classes", type=int, default=1000, help="class folders expected in each split")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images for the readability check")
    p.add_argument("--out-dir", required=True, help="folder for train.csv and val.csv")
    p.set_defaults(handler=lambda a: print(json.dumps(imagenet.build_index(a.root, a.out_dir, a.num_classes,
                                                                           a.workers))))

    p = subparsers.add_parser("imagenet-model", help="a pretrained ImageNet model as a pipeline model file")
    p.add_argument("--arch", required=True, choices=sorted(imagenet.MODEL_SPECS), help="the network")
    p.add_argument("--weights", required=True, help="torchvision weights name (e.g. IMAGENET1K_V1) or a state-dict file")
    _frame_args(p)
    p.add_argument("--out", required=True, help="model file (.pt)")
    p.set_defaults(handler=run_model)

    p = subparsers.add_parser("imagenet-train", help="train an ImageNet model on full images or pixel subsets")
    _split_args(p, split_choices=None)
    _frame_args(p)
    p.add_argument("--val-per-class", type=int, default=None, help="first N val images of each class (default: all)")
    p.add_argument("--arch", required=True, choices=sorted(imagenet.MODEL_SPECS), help="the network")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default: 0)")
    p.add_argument("--recipe", default="{}",
                   help=f"JSON object of training settings, any of (default): {ImageNetRecipe.describe()}")
    p.add_argument("--keep-masks", default=None, help="pixel-subset keep-masks (.npz) to train and test on")
    p.add_argument("--positions-only", action="store_true", help="train on the keep-masks alone (control)")
    p.add_argument("--workers", type=int, default=8, help="data-loading worker processes (default: 8)")
    add_device_argument(p)
    p.add_argument("--checkpoint", default=None, help="resume state, written after every epoch")
    p.add_argument("--out", required=True, help="model file (.pt)")
    p.add_argument("--metrics", required=True, help="per-epoch metrics (.csv)")
    p.set_defaults(handler=run_train)

    p = subparsers.add_parser("imagenet-evaluate", help="top-1/top-5 and per-image predictions of a model")
    _split_args(p)
    p.add_argument("--model", required=True, help="model file (.pt)")
    p.add_argument("--keep-masks", default=None, help="evaluate on these pixel subsets of the split (.npz)")
    p.add_argument("--positions-only", action="store_true", help="feed the keep-masks alone (for models trained so)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward (default: 128)")
    p.add_argument("--workers", type=int, default=8, help="data-loading worker processes (default: 8)")
    add_device_argument(p)
    p.add_argument("--predictions", required=True, help="per-image predictions (.csv)")
    p.add_argument("--summary", required=True, help="top-1, top-5 and mean confidence (.json)")
    p.set_defaults(handler=run_evaluate)

    p = subparsers.add_parser("imagenet-sis", help="Batched Gradient BackSelect of one shard of a split")
    _split_args(p)
    p.add_argument("--model", required=True, help="model file (.pt)")
    p.add_argument("--shard", type=int, default=0, help="which part of the split, 0..SHARDS-1 (default: 0)")
    p.add_argument("--shards", type=int, default=1, help="parts the split is cut into (default: 1)")
    p.add_argument("--pixels-per-step", type=int, default=100, help="pixels removed per forward+backward (default: 100)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward+backward")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA (faster, approximate)")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes (default: 4)")
    add_device_argument(p)
    p.add_argument("--out", required=True, help="shard result (.npz)")
    p.set_defaults(handler=run_sis)

    p = subparsers.add_parser("imagenet-random-subsets", help="random keep-masks as large as the BS subsets")
    p.add_argument("--index-dir", required=True, help="folder of the train.csv / val.csv written by imagenet-index")
    p.add_argument("--train-per-class", type=int, default=None, help="first N training images of each class (default: all)")
    p.add_argument("--val-per-class", type=int, default=None, help="first N val images of each class (default: all)")
    p.add_argument("--model", required=True, help="the selecting model (its frame sets the mask size)")
    p.add_argument("--pixels-per-step", type=int, default=100, help="the SIS runs' pixels per step (default: 100)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the steps the BS subsets keep (default: 0.1)")
    p.add_argument("--train-seed", type=int, default=1234, help="seed of the training masks (default: 1234)")
    p.add_argument("--val-seed", type=int, default=5678, help="seed of the val masks (default: 5678)")
    p.add_argument("--out", required=True, help="keep-mask file (.npz)")
    p.set_defaults(handler=run_random_subsets)

    p = subparsers.add_parser("imagenet-report", help="the ImageNet table and figures")
    p.add_argument("--eval-dir", required=True, help="folder of the evaluations, <arch>/<name>.csv")
    p.add_argument("--val-shards", nargs="+", required=True, help="SIS shards of val, as .../<arch>/val/<shard>.npz")
    p.add_argument("--index-dir", required=True, help="folder of the train.csv / val.csv written by imagenet-index")
    p.add_argument("--root", required=True, help="the ImageNet copy (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)")
    p.add_argument("--archs", nargs="+", required=True, help="the selecting models' architectures")
    p.add_argument("--val-per-class", type=int, default=None, help="first N val images of each class (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the retrained models (default: 0)")
    p.add_argument("--fraction", type=float, default=0.1, help="the subsets' kept share of the steps (default: 0.1)")
    p.add_argument("--tau", type=float, default=0.9, help="SIS threshold on the predicted class (default: 0.9)")
    p.add_argument("--no-positions-only", dest="positions_only", action="store_false",
                   help="the run has no positions-only models")
    p.add_argument("--examples", type=int, default=6, help="val images in the example figure (default: 6)")
    p.add_argument("--table", required=True, help="CSV; the Markdown version is written beside it")
    p.add_argument("--figures", required=True, help="folder of the figures")
    p.set_defaults(handler=run_report)


def run_model(args: argparse.Namespace) -> int:
    model = imagenet.pretrained_model(args.arch, args.weights)
    resize, crop = _frame(args.arch, args)
    save_model(args.out, model, args.arch, weights=args.weights, resize=resize, crop=crop, normalize=IMAGENET_NORMALIZE)
    return 0


def _keep(args, split, name):
    return load_packed_keep_masks(args.keep_masks, KEEP_SPLIT[name], split.index) if args.keep_masks else None


def run_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    recipe = ImageNetRecipe.from_dict(json.loads(args.recipe))
    train = imagenet.load_index(Path(args.index_dir) / "train.csv", args.root, args.per_class)
    val = imagenet.load_index(Path(args.index_dir) / "val.csv", args.root, args.val_per_class)
    resize, crop = _frame(args.arch, args)
    train_set = imagenet.ImageNetDataset(train, resize, crop, _keep(args, train, "train"), args.positions_only,
                                         recipe.min_scale, recipe.flip)
    val_set = imagenet.ImageNetDataset(val, resize, crop, _keep(args, val, "val"), args.positions_only)
    model, metrics = train_imagenet(args.arch, train_set, recipe, args.seed, device, args.workers,
                                    args.checkpoint, val_set)
    save_model(args.out, model, args.arch, seed=args.seed, positions_only=args.positions_only,
               recipe=dataclasses.asdict(recipe), resize=resize, crop=crop, normalize=IMAGENET_NORMALIZE)
    save_dataframe(args.metrics, metrics)
    if args.checkpoint:
        Path(args.checkpoint).unlink(missing_ok=True)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    split = _load_split(args)
    dataset = imagenet.ImageNetDataset(split, *_model_frame(args.model), _keep(args, split, args.split),
                                       args.positions_only)
    probs = predict_dataset(load_model(args.model, device), dataset, args.batch_size, args.workers)
    table = imagenet_prediction_table(probs, split.labels, split.index)
    save_dataframe(args.predictions, table)
    save_json(args.summary, summarize_imagenet(table))
    return 0


def run_sis(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    imagenet_sis.run_sis_shard(
        load_model(args.model, device), _load_split(args), *_model_frame(args.model), args.out, args.shard,
        args.shards, args.pixels_per_step, args.batch_size, args.workers, args.bf16,
        meta={"model": str(args.model), "split": args.split, "per_class": args.per_class})
    return 0


def run_random_subsets(args: argparse.Namespace) -> int:
    _, crop = _model_frame(args.model)
    _, count = last_steps_kept(crop * crop, args.pixels_per_step, args.fraction)
    splits = {}
    for split, per_class, seed in (("train", args.train_per_class, args.train_seed),
                                   ("val", args.val_per_class, args.val_seed)):
        index = imagenet.load_index(Path(args.index_dir) / f"{split}.csv", ".", per_class).index
        splits[KEEP_SPLIT[split]] = (index, random_keep_packed(len(index), crop * crop, count, seed))
    save_packed_keep_masks(args.out, crop, crop, **splits)
    return 0


def run_report(args: argparse.Namespace) -> int:
    table = imagenet_report.imagenet_table(args.eval_dir, args.archs, args.seeds, args.fraction, args.positions_only)
    imagenet_report.save_table(table, args.table, Path(args.table).with_suffix(".md"))
    figures = Path(args.figures)
    imagenet_report.accuracy_figure(table, figures / "imagenet-accuracy")
    shards = {arch: [p for p in args.val_shards if Path(p).parent.parent.name == arch] for arch in args.archs}
    missing = [arch for arch, paths in shards.items() if not paths]
    if missing:
        raise ValueError(f"no val SIS shards given for {missing} (expected paths .../<arch>/val/<shard>.npz)")
    imagenet_report.confidence_figure(shards, figures / "imagenet-confidence")
    val = imagenet.load_index(Path(args.index_dir) / "val.csv", args.root, args.val_per_class)
    for arch in args.archs:
        imagenet_report.examples_figure(shards[arch][:1], val, args.fraction, args.tau, args.examples,
                                        figures / f"imagenet-examples-{arch}")
    return 0
