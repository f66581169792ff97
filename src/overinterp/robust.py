"""Adversarial robustness: PGD under an L-infinity budget, for adversarial training and robust accuracy.

The budget is in pixel space (CIFAR-10's standard: epsilon 8/255, step 2/255), applied to the normalised
input the models take: per channel, epsilon / std, and the image stays within the valid pixel range
[(0 - mean) / std, (1 - mean) / std]. A short own implementation rather than an attack library: the
pipeline's models take normalised inputs and torch tensors end to end, and ~30 lines need no adapter.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from .data import add_normalization_arguments, load_split, normalizer_from_args
from .utils import add_device_argument, resolve_device, save_json


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, normalizer, epsilon: float, step_size: float,
        steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy of ``y``, from a uniform random start in the
    epsilon-ball of the normalised images ``x``; returns the adversarial inputs (detached). The model's
    train/eval mode is left as it is."""
    std = normalizer.std.to(x)
    mean = normalizer.mean.to(x)
    radius, step = epsilon / std, step_size / std
    lower, upper = (0 - mean) / std, (1 - mean) / std
    start = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype) * 2 - 1
    adversarial = torch.clamp(x + start * radius, lower, upper).detach()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adversarial), y)
            (grad,) = torch.autograd.grad(loss, adversarial)
        adversarial = adversarial.detach() + step * grad.sign()
        adversarial = torch.clamp(torch.minimum(torch.maximum(adversarial, x - radius), x + radius), lower, upper)
    return adversarial.detach()


def robust_predictions(model, normalizer, images, labels, epsilon: float, step_size: float, steps: int, seed: int,
                       batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(clean, adversarial) predictions of ``model`` (in eval mode) on uint8 ``images``, PGD-``steps``."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    clean, attacked = [], []
    for start in range(0, len(images), batch_size):
        x = normalizer(images[start : start + batch_size].to(device))
        y = labels[start : start + batch_size].to(device)
        with torch.no_grad():
            clean.append(model(x).argmax(1).cpu())
        adversarial = pgd(model, x, y, normalizer, epsilon, step_size, steps, generator)
        with torch.no_grad():
            attacked.append(model(adversarial).argmax(1).cpu())
    return torch.cat(clean).numpy(), torch.cat(attacked).numpy()


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("robustness", help="clean and PGD (L-infinity) robust accuracy of a model")
    p.add_argument("--data", required=True, help="converted dataset (.npz)")
    p.add_argument("--model", required=True, help="model file (.pt)")
    p.add_argument("--size", type=int, default=None, help="class-balanced subset size of the test split")
    p.add_argument("--epsilon", type=float, default=8 / 255, help="L-infinity budget in pixel units (default: 8/255)")
    p.add_argument("--step-size", type=float, default=2 / 255, help="PGD step in pixel units (default: 2/255)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts (default: 0)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="metadata stored in the summary")
    add_normalization_arguments(p)
    add_device_argument(p)
    p.add_argument("--out", required=True, help="summary (.json)")
    p.set_defaults(handler=run_robustness)


def run_robustness(args: argparse.Namespace) -> int:
    from .evaluate import parse_tags
    from .models import load_model

    split = load_split(args.data, "test", args.size)
    model = load_model(args.model, resolve_device(args.device))
    clean, attacked = robust_predictions(model, normalizer_from_args(args), split.images, split.labels,
                                         args.epsilon, args.step_size, args.steps, args.seed)
    labels = split.labels.numpy()
    save_json(args.out, {**parse_tags(args.tag), "n": int(len(labels)),
                         "clean_accuracy": float((clean == labels).mean()),
                         "robust_accuracy": float((attacked == labels).mean()),
                         "epsilon": args.epsilon, "step_size": args.step_size, "steps": args.steps})
    return 0
