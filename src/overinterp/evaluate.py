"""Prediction and evaluation: per-image predictions and a summary that later stages read."""
from __future__ import annotations

import argparse

import pandas as pd
import torch

from .data import load_split
from .models import load_model
from .utils import resolve_device, save_dataframe, save_json


@torch.inference_mode()
def predict(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities (N, classes) of ``model`` on normalised NCHW ``inputs``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for chunk in inputs.split(batch_size):
        with autocast:
            logits = model(chunk.to(device).contiguous(memory_format=torch.channels_last))
        out.append(logits.float().softmax(1))
    model.train(was_training)
    return torch.cat(out)


def prediction_table(probs: torch.Tensor, labels: torch.Tensor, index) -> pd.DataFrame:
    probs, labels = probs.cpu(), labels.cpu()
    confidence, prediction = probs.max(1)
    return pd.DataFrame({
        "index": index,
        "label": labels.numpy(),
        "prediction": prediction.numpy(),
        "confidence": confidence.numpy(),
        "label_probability": probs.gather(1, labels.view(-1, 1)).squeeze(1).numpy(),
    })


def summarize(table: pd.DataFrame) -> dict:
    return {
        "n": int(len(table)),
        "accuracy": float((table["prediction"] == table["label"]).mean()),
        "mean_confidence": float(table["confidence"].mean()),
    }


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="per-image predictions and accuracy of a model on the test split")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--size", type=int, default=None, help="class-balanced subset size of the split")
    p.add_argument("--keep-masks", default=None, help="evaluate on these pixel subsets of the split")
    p.add_argument("--positions-only", action="store_true")
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("--baseline", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--predictions", required=True, help="per-image predictions (.csv)")
    p.add_argument("--summary", required=True, help="accuracy and mean confidence (.json)")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from .train import model_inputs, normalizer_from_args

    device = resolve_device(args.device)
    split = load_split(args.data, args.split, args.size)
    keep = None
    if args.keep_masks:
        from .subsets import load_keep_masks

        keep = load_keep_masks(args.keep_masks, args.split, split.index)
    inputs = model_inputs(normalizer_from_args(args), split.images, keep, args.positions_only)
    probs = predict(load_model(args.model, device), inputs)
    table = prediction_table(probs, split.labels, split.index)
    save_dataframe(args.predictions, table)
    save_json(args.summary, summarize(table))
    return 0
