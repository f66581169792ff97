"""ImageNet training (full images or pixel subsets) and evaluation with top-1 / top-5.

Images stream from disk through DataLoader workers (ImageNet does not fit in memory); each worker builds the
evaluation frame, masks it, normalises and augments it. A checkpoint is written atomically after every epoch
(model, optimiser, schedule, random state) and the data order of epoch ``e`` depends only on the seed and
``e``, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .evaluate import prediction_table
from .imagenet import ImageNetDataset
from .models import build_model
from .train import FromDict, Trainer

log = logging.getLogger(__name__)


@dataclass
class ImageNetRecipe(FromDict):
    """The standard ImageNet recipe (torchvision's reference / the PyTorch ImageNet example the paper used)."""

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=lambda: [30, 60])
    gamma: float = 0.1
    min_scale: float = 0.08  # random-resized crop keeps 8%..100% of the frame's area
    flip: bool = True


def _loader(dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0, device=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
        pin_memory=device is not None and device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None)


@torch.inference_mode()
def predict_dataset(model: nn.Module, dataset, batch_size: int = 128, workers: int = 0,
                    progress: bool = True, desc: str = "predict") -> torch.Tensor:
    """Softmax probabilities (N, classes) of ``model`` on every item of ``dataset``, in dataset order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for x, _, _ in tqdm(_loader(dataset, batch_size, workers, device=device), desc=desc, disable=not progress):
        with autocast:
            logits = model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
        out.append(logits.float().softmax(1).cpu())
    model.train(was_training)
    return torch.cat(out)


def imagenet_prediction_table(probs: torch.Tensor, labels: np.ndarray, index: np.ndarray) -> pd.DataFrame:
    """Per image: index, label, prediction, confidence, label_probability and whether the label is in the top 5."""
    labels_t = torch.as_tensor(labels)
    table = prediction_table(probs, labels_t, index)
    table["top5"] = (probs.topk(min(5, probs.shape[1]), 1).indices == labels_t.view(-1, 1)).any(1).numpy()
    return table


def summarize_imagenet(table: pd.DataFrame) -> dict:
    return {
        "n": int(len(table)),
        "top1": float((table["prediction"] == table["label"]).mean()),
        "top5": float(table["top5"].mean()),
        "mean_confidence": float(table["confidence"].mean()),
    }


def train_imagenet(arch: str, train: ImageNetDataset, recipe: ImageNetRecipe, seed: int, device: torch.device,
                   workers: int = 8, checkpoint_path: str | Path | None = None, val: ImageNetDataset | None = None,
                   progress: bool = True):
    """Train a fresh ``arch`` on ``train`` (which carries the masking and augmentation); returns (model, metrics)."""
    torch.manual_seed(seed)
    model = build_model(arch).to(device, memory_format=torch.channels_last)
    fingerprint = json.dumps([arch, dataclasses.asdict(recipe), seed, len(train), train.keep is not None,
                              train.positions_only, train.crop], sort_keys=True)
    trainer = Trainer(model, recipe, fingerprint, checkpoint_path)
    trainer.resume(device)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(trainer.start_epoch, recipe.epochs), initial=trainer.start_epoch, total=recipe.epochs,
               desc=f"train {arch} seed {seed}", disable=not progress)
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        # The shuffle and the workers' augmentation draws of epoch e depend on (seed, e) only: exact resumption.
        for x, y, _ in _loader(train, recipe.batch_size, workers, shuffle=True, seed=seed * 100_003 + epoch,
                               device=device):
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            trainer.step(loss)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / len(train),
               "train_top1": correct.item() / len(train), "seconds": seconds,
               "images_per_second": len(train) / seconds}
        if val is not None:
            table = imagenet_prediction_table(predict_dataset(model, val, recipe.batch_size, workers, progress=False),
                                              val.split.labels, val.split.index)
            row.update({f"val_{k}": v for k, v in summarize_imagenet(table).items() if k in ("top1", "top5")})
        trainer.end_epoch(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_top1=f"{row.get('val_top1', float('nan')):.3f}")
    model.eval()
    return model, pd.DataFrame(trainer.rows)
