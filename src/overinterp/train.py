"""Training, in the spirit of the CIFAR speed-run code.

The whole split lives on the device as uint8; each batch is normalised, masked and augmented with tensor
ops there; the loss is accumulated on the device and read once per epoch. A checkpoint is written
atomically after every epoch (model, optimiser, schedule, random state), so a killed run resumes and ends
with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import Normalizer, Split, add_normalization_arguments, load_split, model_inputs, normalizer_from_args
from .evaluate import predict_split
from .models import ARCHITECTURES, DEPRECATED_NAMES, build_model, save_model
from .robust import pgd
from .utils import add_device_argument, load_torch, resolve_device, save_dataframe, save_torch

log = logging.getLogger(__name__)


class FromDict:
    """``from_dict`` for recipe dataclasses: unknown keys are an error that lists the known ones."""

    @classmethod
    def describe(cls) -> str:
        """Every key with its default, for --help."""
        return ", ".join(f"{f.name} ({f.default_factory() if f.default is dataclasses.MISSING else f.default})"
                         for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class Recipe(FromDict):
    """The paper's CIFAR-10 recipe; every field is a config value."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.2
    crop_padding: int = 4
    flip: bool = True
    input_dropout: float = 0.0
    # The ImageNet recipe's random-resized crop instead of the padded crop: a box of min_scale..100% of the
    # image's area (aspect 3/4..4/3) resized back to the input size; null = none (CIFAR-10's recipe).
    min_scale: float | None = None
    # Adversarial training (Madry et al.): each batch replaced by its PGD attack under an L-infinity budget
    # of adversarial_epsilon pixel units (CIFAR-10's standard: 8/255, steps of 2/255, 7 steps); 0 = none.
    adversarial_epsilon: float = 0.0
    adversarial_step_size: float = 2 / 255
    adversarial_steps: int = 7


class Trainer:
    """SGD with a step schedule and an exact checkpoint after every epoch: model, optimiser, schedule, the
    random state (global, CUDA and an optional data-order generator) and the metrics so far. A checkpoint
    of another configuration (``fingerprint``) is ignored, never resumed."""

    def __init__(self, model, recipe, fingerprint: str, checkpoint_path=None, generator=None):
        self.model, self.fingerprint, self.generator = model, fingerprint, generator
        self.optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                         nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
        self.schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, recipe.milestones, recipe.gamma)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.rows, self.start_epoch = [], 0

    def resume(self, device: torch.device) -> None:
        if not (self.checkpoint_path and self.checkpoint_path.exists()):
            return
        state = load_torch(self.checkpoint_path, map_location=device)
        if state["fingerprint"] != self.fingerprint:
            log.warning("ignoring checkpoint %s: it belongs to a different configuration", self.checkpoint_path)
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.generator is not None:
            self.generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.rows, self.start_epoch = state["metrics"], state["epoch"]
        log.info("resuming %s from its checkpoint after epoch %d", self.checkpoint_path, self.start_epoch)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def end_epoch(self, row: dict) -> None:
        """Advance the schedule, record the epoch's metrics and write the checkpoint."""
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        self.rows.append(row)
        if self.checkpoint_path:
            save_torch(self.checkpoint_path, {
                "fingerprint": self.fingerprint, "epoch": row["epoch"], "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "generator": self.generator.get_state() if self.generator is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "metrics": self.rows,
            })


def random_resized_crop(x: torch.Tensor, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Per image, a box of ``min_scale``..1 of the area with aspect ratio 3/4..4/3 (log-uniform; clipped to
    the image where it does not fit), resized back to the input size with bilinear sampling: torchvision's
    RandomResizedCrop for a whole batch on the device."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    draw = torch.rand(n, 4, device=x.device, generator=generator, dtype=torch.float32)
    area = (min_scale + (1 - min_scale) * draw[:, 0]) * h * w
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draw[:, 1])
    box_w = torch.sqrt(area * ratio).clamp(max=w)
    box_h = torch.sqrt(area / ratio).clamp(max=h)
    x0, y0 = (w - box_w) * draw[:, 2], (h - box_h) * draw[:, 3]
    boxes = torch.stack([torch.arange(n, device=x.device, dtype=torch.float32), x0, y0, x0 + box_w, y0 + box_h], 1)
    return roi_align(x, boxes.to(x.dtype), (h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def augment(x: torch.Tensor, padding: int, flip: bool, fill: float, generator: torch.Generator,
            min_scale: float | None = None) -> torch.Tensor:
    """Random crop (padding filled with ``fill``), or the random-resized crop with ``min_scale``, and
    horizontal flip, fresh per image."""
    if min_scale is not None:
        x = random_resized_crop(x, min_scale, generator)
    n, _, h, w = x.shape
    if padding:
        padded = F.pad(x, (padding,) * 4, value=fill)
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=generator)
        rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
        cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
        flat = (rows * (w + 2 * padding) + cols).view(n, 1, h * w).expand(-1, x.shape[1], -1)
        x = padded.flatten(2).gather(2, flat).view_as(x)
    if flip:
        mirror = torch.rand(n, 1, 1, 1, device=x.device, generator=generator) < 0.5
        x = torch.where(mirror, x.flip(3), x)
    return x


def _batches(split: Split, keep, order: torch.Tensor, batch_size: int, device: torch.device, imputed=None):
    """(uint8 images, keep-masks or None, imputed fills or None, labels) on ``device`` for each batch of
    ``order``; ``imputed``: the impute fill solved for every image of an in-memory split.

    An in-memory split is moved to the device once and gathered there; a streamed split's images are read
    from their files, the next batch while the current one trains."""
    labels = split.labels.to(device)
    if isinstance(split.images, torch.Tensor):
        images = split.images.to(device)
        keep = keep[:].to(device) if keep is not None else None
        for batch in order.split(batch_size):
            yield (images[batch], keep[batch] if keep is not None else None,
                   imputed[batch] if imputed is not None else None, labels[batch])
        return

    def read(rows):
        return split.images[rows], keep[rows] if keep is not None else None

    batches = order.cpu().split(batch_size)
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            images, masks = pending.result()
            if i + 1 < len(batches):
                pending = reader.submit(read, batches[i + 1])
            yield (images.to(device, non_blocking=True), masks.to(device) if masks is not None else None, None,
                   labels[batch.to(device)])


def _fingerprint(arch, recipe, seed, n_train, masked, positions_only):
    return json.dumps([arch, dataclasses.asdict(recipe), seed, n_train, masked, positions_only], sort_keys=True)


def train_model(
    arch: str,
    train: Split,
    recipe: Recipe,
    seed: int,
    normalizer: Normalizer,
    device: torch.device,
    checkpoint_path: str | Path | None = None,
    keep=None,
    test: Split | None = None,
    test_keep=None,
    positions_only: bool = False,
    progress: bool = True,
):
    """Train a fresh ``arch`` on ``train`` (masked by ``keep``, a bool tensor or
    :class:`~overinterp.subsets.KeepMasks`, if given); returns (model, metrics frame). A streamed split is
    read from its files batch by batch, with the same batches and augmentation as in memory."""
    if positions_only and keep is None:
        raise ValueError("positions_only training needs keep-masks")
    if recipe.adversarial_epsilon > 0 and keep is not None:
        raise ValueError("adversarial training is for full images; pixel subsets are retrained with the plain recipe")
    torch.manual_seed(seed)
    model = build_model(arch, recipe.input_dropout, normalizer.baseline, len(train.classes)).to(
        device, memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(seed)
    fingerprint = _fingerprint(arch, recipe, seed, len(train), keep is not None, positions_only)
    trainer = Trainer(model, recipe, fingerprint, checkpoint_path, generator)
    trainer.resume(device)

    if test is not None:
        test_labels, test_images = test.labels.to(device), test.images
        test_imputed = None
        if isinstance(test.images, torch.Tensor):  # in memory: kept on the device between epochs
            test_images = test.images.to(device)
            test_keep = test_keep[:].to(device) if test_keep is not None else None
            if test_keep is not None and not positions_only:
                test_imputed = normalizer.imputations(test_images, test_keep)
    # The impute fill's solutions depend on the image and its mask alone: solved once, not every epoch.
    train_imputed = None
    if keep is not None and not positions_only and isinstance(train.images, torch.Tensor):
        train_imputed = normalizer.imputations(train.images.to(device), keep[:].to(device))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n = len(train)
    bar = tqdm(range(trainer.start_epoch, recipe.epochs), initial=trainer.start_epoch, total=recipe.epochs,
               desc=f"train {arch} seed {seed}", disable=not progress)
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        order = torch.randperm(n, device=device, generator=generator)
        for images, masks, imputed, y in _batches(train, keep, order, recipe.batch_size, device, train_imputed):
            x = model_inputs(normalizer, images, masks, positions_only, imputed)
            x = augment(x, recipe.crop_padding, recipe.flip, normalizer.baseline, generator, recipe.min_scale)
            x = x.contiguous(memory_format=torch.channels_last)
            if recipe.adversarial_epsilon > 0:  # attacked in training mode, as Madry et al.'s reference does
                x = pgd(model, x, y, normalizer, recipe.adversarial_epsilon, recipe.adversarial_step_size,
                        recipe.adversarial_steps, generator)
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            trainer.step(loss)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / n, "train_accuracy": correct.item() / n,
               "seconds": seconds, "images_per_second": n / seconds}
        if test is not None:
            probs = predict_split(model, normalizer, test_images, test_keep, positions_only, imputed=test_imputed)
            row["test_accuracy"] = (probs.argmax(1) == test_labels).float().mean().item()
        trainer.end_epoch(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_accuracy']:.3f}",
                        test=f"{row.get('test_accuracy', float('nan')):.3f}")
    model.eval()
    return model, pd.DataFrame(trainer.rows)


def architecture(name: str) -> str:
    """An architecture name --arch accepts: the project's (old names too) or torchvision:NAME."""
    if name in ARCHITECTURES or name in DEPRECATED_NAMES or name.startswith("torchvision:"):
        return name
    raise argparse.ArgumentTypeError(f"unknown architecture {name!r}; choose one of {', '.join(sorted(ARCHITECTURES))} "
                                     "or torchvision:NAME")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on full images or on pixel subsets")
    p.add_argument("--data", required=True, help="the dataset file (.npz) that `overinterp convert` writes")
    p.add_argument("--arch", required=True, type=architecture, metavar="ARCH",
                   help=f"the network: {', '.join(sorted(ARCHITECTURES))}, or torchvision:NAME (old names: "
                        f"{', '.join(DEPRECATED_NAMES)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default: 0)")
    p.add_argument("--recipe", default="{}",
                   help=f"JSON object of training settings, any of (default): {Recipe.describe()}. "
                        "Example: '{\"epochs\": 30, \"milestones\": [15, 25]}'")
    p.add_argument("--train-size", type=int, default=None, help="class-balanced subset of the training split")
    p.add_argument("--test-size", type=int, default=None, help="class-balanced subset of the test split")
    p.add_argument("--keep-masks", default=None, help="pixel-subset keep-masks (.npz) to train and test on")
    p.add_argument("--positions-only", action="store_true", help="train on the keep-masks alone (control)")
    add_normalization_arguments(p)
    add_device_argument(p)
    p.add_argument("--checkpoint", default=None, help="resume state, written after every epoch")
    p.add_argument("--out", required=True, help="model file (.pt)")
    p.add_argument("--metrics", required=True, help="per-epoch metrics (.csv)")
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    recipe = Recipe.from_dict(json.loads(args.recipe))
    normalizer = normalizer_from_args(args)
    train = load_split(args.data, "train", args.train_size)
    test = load_split(args.data, "test", args.test_size)
    keep = test_keep = None
    if args.keep_masks:
        from .subsets import load_packed_keep_masks

        keep = load_packed_keep_masks(args.keep_masks, "train", train.index)
        test_keep = load_packed_keep_masks(args.keep_masks, "test", test.index)
    model, metrics = train_model(args.arch, train, recipe, args.seed, normalizer, device, args.checkpoint,
                                 keep, test, test_keep, args.positions_only)
    save_model(args.out, model, args.arch, seed=args.seed, input_dropout=recipe.input_dropout,
               baseline=args.baseline, normalize={"mean": normalizer.mean.flatten().tolist(),
                                                  "std": normalizer.std.flatten().tolist()}, positions_only=args.positions_only, recipe=dataclasses.asdict(recipe),
               train_images=len(train), test_images=len(test), num_classes=len(train.classes),
               classes=list(train.classes), resize=train.frame[0], crop=train.frame[1])
    save_dataframe(args.metrics, metrics)
    if args.checkpoint:
        Path(args.checkpoint).unlink(missing_ok=True)
    return 0
