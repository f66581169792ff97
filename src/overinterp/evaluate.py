"""Prediction and evaluation: per-image predictions and a summary that later stages read."""
from __future__ import annotations

import argparse

import pandas as pd
import torch

from .data import add_normalization_arguments, load_split
from .models import load_model
from .utils import add_device_argument, resolve_device, save_dataframe, save_json


@torch.inference_mode()
def predict(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 1000,
            keep_mode: bool = False) -> torch.Tensor:
    """Softmax probabilities (N, classes) of ``model`` on normalised NCHW ``inputs``, in eval mode
    (``keep_mode`` leaves the modules' train/eval modes as they are)."""
    was_training = model.training
    if not keep_mode:
        model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for chunk in inputs.split(batch_size):
        with autocast:
            logits = model(chunk.to(device).contiguous(memory_format=torch.channels_last))
        out.append(logits.float().softmax(1))
    if not keep_mode:
        model.train(was_training)
    return torch.cat(out)


@torch.inference_mode()
def predict_monte_carlo(model: torch.nn.Module, inputs: torch.Tensor, samples: int, seed: int,
                        batch_size: int = 1000) -> torch.Tensor:
    """Mean softmax over ``samples`` passes with input dropout active (the reference code's test-time
    dropout, made reproducible by ``seed``); batch norm stays in eval mode."""
    from .models import InputDropout

    droppers = [m for m in model.modules() if isinstance(m, InputDropout)]
    if not droppers:
        raise ValueError("Monte-Carlo evaluation needs a model trained with input dropout")
    torch.manual_seed(seed)
    total = 0
    try:
        for m in droppers:
            m.train()
        for _ in range(samples):
            total = total + predict(model, inputs, batch_size, keep_mode=True)
    finally:
        for m in droppers:
            m.eval()
    return total / samples


def predict_split(model: torch.nn.Module, normalizer, images, keep=None, positions_only: bool = False,
                  chunk: int = 4096, mc_samples: int = 0, mc_seed: int = 0, imputed=None) -> torch.Tensor:
    """Softmax probabilities (N, classes) of ``model`` on uint8 ``images`` (a tensor, or a streamed split's
    :class:`~overinterp.data.FolderImages`) masked by ``keep`` (a bool tensor or
    :class:`~overinterp.subsets.KeepMasks`), ``chunk`` images at a time, so no split needs to fit in memory
    as model inputs. ``mc_samples`` averages that many passes with input dropout active; ``imputed``: the
    impute fill's solutions, when already solved (:meth:`~overinterp.data.Normalizer.imputations`)."""
    from .data import model_inputs

    out = []
    for start in range(0, len(images), chunk):
        rows = slice(start, start + chunk)
        inputs = model_inputs(normalizer, images[rows], keep[rows] if keep is not None else None, positions_only,
                              imputed[rows] if imputed is not None else None)
        if mc_samples:
            out.append(predict_monte_carlo(model, inputs, mc_samples, mc_seed + start // chunk))
        else:
            out.append(predict(model, inputs))
    return torch.cat(out) if out else torch.zeros(0)


def prediction_table(probs: torch.Tensor, labels: torch.Tensor, index) -> pd.DataFrame:
    """Per image: prediction, confidence, the label's probability and, with more than 5 classes, whether
    the label is among the 5 most probable (ImageNet's top-5)."""
    probs, labels = probs.cpu(), torch.as_tensor(labels).cpu()
    confidence, prediction = probs.max(1)
    table = pd.DataFrame({
        "index": index,
        "label": labels.numpy(),
        "prediction": prediction.numpy(),
        "confidence": confidence.numpy(),
        "label_probability": probs.gather(1, labels.view(-1, 1)).squeeze(1).numpy(),
    })
    if probs.shape[1] > 5:
        table["top5"] = (probs.topk(5, 1).indices == labels.view(-1, 1)).any(1).numpy()
    return table


def summarize(table: pd.DataFrame, reference: pd.DataFrame | None = None) -> dict:
    """Accuracy and mean confidence; with ``reference`` (another model's predictions on the same images),
    how often the two agree, overall and on the images the reference model gets wrong."""
    summary = {
        "n": int(len(table)),
        "accuracy": float((table["prediction"] == table["label"]).mean()),
        "mean_confidence": float(table["confidence"].mean()),
    }
    if "top5" in table:
        summary["top5_accuracy"] = float(table["top5"].mean())
    if reference is not None:
        merged = table.merge(reference, on="index", suffixes=("", "_reference"), validate="one_to_one")
        if len(merged) != len(table):
            raise ValueError("reference predictions do not cover the same images")
        agree = merged["prediction"] == merged["prediction_reference"]
        errors = merged["prediction_reference"] != merged["label"]
        summary.update({
            "agreement": float(agree.mean()),
            "agreement_on_reference_errors": float(agree[errors].mean()) if errors.any() else float("nan"),
            "reference_errors": int(errors.sum()),
        })
    return summary


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="per-image predictions and accuracy of a model on the test split")
    p.add_argument("--data", required=True, help="converted dataset (.npz)")
    p.add_argument("--model", required=True, help="model file (.pt)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split (default: test)")
    p.add_argument("--size", type=int, default=None, help="class-balanced subset size of the split")
    p.add_argument("--keep-masks", default=None, help="evaluate on these pixel subsets of the split")
    p.add_argument("--positions-only", action="store_true",
                   help="feed the keep-masks alone, no pixel values (for models trained so)")
    add_normalization_arguments(p)
    add_device_argument(p)
    p.add_argument("--mc-samples", type=int, default=0,
                   help="average N passes with input dropout active (default 0: deterministic, no dropout)")
    p.add_argument("--mc-seed", type=int, default=0, help="seed of the Monte-Carlo passes (default: 0)")
    p.add_argument("--reference-predictions", default=None,
                   help="another model's predictions on the same images (.csv), to measure agreement")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata stored in the summary (architecture, condition, seed, ...)")
    p.add_argument("--predictions", required=True, help="per-image predictions (.csv)")
    p.add_argument("--summary", required=True, help="accuracy and mean confidence (.json)")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from .data import normalizer_from_args
    from .subsets import load_packed_keep_masks

    device = resolve_device(args.device)
    split = load_split(args.data, args.split, args.size)
    keep = load_packed_keep_masks(args.keep_masks, args.split, split.index) if args.keep_masks else None
    probs = predict_split(load_model(args.model, device), normalizer_from_args(args), split.images, keep,
                          args.positions_only, mc_samples=args.mc_samples, mc_seed=args.mc_seed)
    table = prediction_table(probs, split.labels, split.index)
    save_dataframe(args.predictions, table)
    reference = pd.read_csv(args.reference_predictions) if args.reference_predictions else None
    save_json(args.summary, {**parse_tags(args.tag), **summarize(table, reference)})
    return 0


def parse_tags(tags: list[str]) -> dict:
    """``key=value`` strings to a dict; values that parse as JSON numbers stay numbers."""
    import json

    out = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep:
            raise ValueError(f"--tag needs KEY=VALUE, got {tag!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
