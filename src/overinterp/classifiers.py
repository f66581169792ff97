"""Models as adapters: whatever form an auditor's classifier comes in, every stage sees the same thing.

:func:`load_classifier` accepts

* a model file of this pipeline (``overinterp train``, ``model``, ``ensemble``);
* an architecture name with ``weights``: one of the project's (``cifar_resnet20``, ``cifar_resnet18``,
  ``cifar_vgg16_bn``, ``tiny``, ``efficientnet_lite0``, ...) with a state-dict file, or ``torchvision:NAME``
  with a torchvision weights name (``IMAGENET1K_V1``) or a state-dict file;
* a TorchScript file (``torch.jit.script``/``torch.jit.trace`` + ``save``);
* ``package.module:factory``, a callable that returns the user's ``nn.Module`` (with an optional state dict
  as ``weights``).

Files are read with ``weights_only=True``; a whole pickled ``nn.Module`` is refused (loading it could run
code) with the two ways out. TorchScript and factories are code by nature: the user names them explicitly.

The result is a :class:`Classifier`: the module plus the input convention it takes (normalised with a
mean/std, or raw [0, 1] RGB) and whether it returns logits or probabilities. :meth:`Classifier.engine_model`
gives the module every stage runs: it takes images shifted so that 0 is the dataset-mean colour *in the
model's own input space* (so the masking baseline is always 0 and means the same thing for every model) and
returns logits (log-probabilities for a probability-output model, whose softmax is the model's own output).
"""
from __future__ import annotations

import importlib
import logging
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import CIFAR10_MEAN, CIFAR10_STD
from .efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
from .models import (ARCHITECTURES, AUXILIARY_HEADS, CIFAR_ARCHITECTURES, DEPRECATED_NAMES, build_model,
                     canonical_arch, load_model, save_model, torchvision_network)
from .sis import ShiftedInput
from .utils import CodeInFileError, DataError, load_torch

log = logging.getLogger(__name__)

Normalization = tuple[tuple[float, ...], tuple[float, ...]]
OUTPUTS = ("auto", "logits", "probabilities")
FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # package.module:callable
FORMS_HINT = ("a model file of this pipeline, ARCH --weights STATE_DICT (ARCH: one of the project's "
              f"{', '.join(sorted(ARCHITECTURES))}, or torchvision:NAME), a TorchScript file, or "
              "package.module:factory")


@dataclass
class Classifier:
    """A loaded model and the conventions it was made with.

    ``normalize`` is the (mean, std) its inputs are normalised with, None for a model that takes raw [0, 1]
    RGB (and normalises itself); None as a whole while unknown (then the dataset's convention is taken).
    ``frame`` is (resize, crop) of its input when known. ``output`` is logits, probabilities or auto.
    """

    module: nn.Module
    source: str
    normalize: Normalization | None | str = "unknown"
    frame: tuple[int, int] | None = None
    output: str = "auto"
    meta: dict = field(default_factory=dict)

    def model_inputs(self, images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> what the module takes."""
        x = images.to(dtype) / 255
        if self.normalize is None:
            return x
        mean, std = (torch.tensor(v, dtype=dtype).view(1, -1, 1, 1) for v in self.normalize)
        return (x - mean) / std

    def baseline(self, mean_colour) -> torch.Tensor:
        """(1, 3, 1, 1) float64: the dataset-mean colour in the module's input space."""
        return self.model_inputs((torch.tensor(mean_colour, dtype=torch.float64) * 255).view(1, -1, 1, 1),
                                 torch.float64)

    def engine_inputs(self, images: torch.Tensor, mean_colour, dtype=torch.float32) -> torch.Tensor:
        """Module inputs shifted so that a masked pixel (value 0) is the dataset-mean colour."""
        return (self.model_inputs(images, dtype) - self.baseline(mean_colour).to(dtype))

    def engine_model(self, mean_colour) -> nn.Module:
        """The module as every stage runs it: takes :meth:`engine_inputs` (masked = 0), returns logits."""
        shift = self.baseline(mean_colour)
        module = self.module
        if self.output == "probabilities":
            module = ProbabilitiesAsLogits(module)
        if shift.abs().max() > 0:
            module = ShiftedInput(module, shift)
        return module


class ProbabilitiesAsLogits(nn.Module):
    """log of a probability output: its softmax is the model's own probabilities, not a second softmax."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x).clamp_min(torch.finfo(x.dtype).tiny).log()


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a ``code/`` folder (torch.save archives have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _read_state_dict(path: Path) -> dict:
    try:
        blob = load_torch(path)
    except CodeInFileError:
        raise DataError(_pickled_module_message(path)) from None
    if isinstance(blob, dict) and "state_dict" in blob and isinstance(blob["state_dict"], dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise DataError(f"{path} is not a state dict (a mapping of parameter names to tensors); save one with "
                        "torch.save(model.state_dict(), path)")
    if blob and all(k.startswith("module.") for k in blob):  # saved from DataParallel/DistributedDataParallel
        blob = {k.removeprefix("module."): v for k, v in blob.items()}
    return blob


def _pickled_module_message(path: Path) -> str:
    return (f"{path} is a pickled Python object (a whole nn.Module saved with torch.save(model)?). It was "
            "refused unread, because loading it could run code. Either save model.state_dict() and pass "
            "--model ARCH --weights FILE, or export TorchScript (torch.jit.script(model).save(path) or "
            "torch.jit.trace) and pass that file as --model.")


def load_state_dict(module: nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)``, or an error naming the keys that do not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} of another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"architecture {tuple(own[k].shape)})")
        raise DataError(f"{what}: the state dict does not fit the architecture: keys {'; '.join(parts)}. "
                        "Name the architecture the weights were trained with (and its class count).")
    module.load_state_dict(state)


def _project_file(path: Path, blob: dict) -> Classifier:
    module = load_model(path)
    meta = blob.get("meta", {})
    arch = canonical_arch(blob["arch"]) if blob["arch"] in DEPRECATED_NAMES else blob["arch"]
    if "normalize" in meta:
        normalize = (tuple(meta["normalize"]["mean"]), tuple(meta["normalize"]["std"]))
    elif arch in CIFAR_ARCHITECTURES or arch == "ensemble":
        normalize = (CIFAR10_MEAN, CIFAR10_STD)  # files of earlier versions: the CIFAR models' convention
    else:
        normalize = (IMAGENET_MEAN, IMAGENET_STD)
    frame = (meta["resize"], meta["crop"]) if meta.get("crop") else None
    return Classifier(module, f"model file {path} ({arch})", normalize, frame, "logits", {"arch": arch})


def _torchvision(name: str, weights: str | None, num_classes: int | None) -> Classifier:
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise DataError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    if weights is None:
        raise DataError(f"torchvision:{name} needs --weights: a torchvision weights name (e.g. IMAGENET1K_V1) "
                        "or a state-dict file")
    if Path(weights).expanduser().exists() or Path(weights).suffix in (".pt", ".pth"):
        # A state dict of the user's (fine-tuned, own classes): the head takes the dataset's class count.
        module = torchvision_network(name, num_classes)
        normalize, frame = (IMAGENET_MEAN, IMAGENET_STD), None
        state = _read_state_dict(_existing(weights))
        load_state_dict(module, without_auxiliary_heads(name, state), f"{weights} for torchvision:{name}")
    else:
        try:
            entry = tvm.get_model_weights(name)[weights]
        except KeyError:
            names = ", ".join(w.name for w in tvm.get_model_weights(name))
            raise DataError(f"torchvision:{name} has no weights {weights!r}; it has {names}") from None
        try:  # built by torchvision with its weights, so that it takes the inputs they were trained with
            module = tvm.get_model(name, weights=entry)
        except OSError as err:  # URLError is an OSError
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
            raise DataError(f"Cannot fetch torchvision:{name} {weights} from {entry.url} ({err}). Offline, copy "
                            f"the file to {cache} (the torch hub cache; TORCH_HOME moves it), or pass a "
                            "state-dict file as --weights.") from err
        transform = entry.transforms()
        normalize = (tuple(transform.mean), tuple(transform.std))
        frame = (int(transform.resize_size[0]), int(transform.crop_size[0]))
    return Classifier(module, f"torchvision:{name} ({weights})", normalize, frame, "logits",
                      {"arch": f"torchvision:{name}", "weights": str(weights)})


def without_auxiliary_heads(name: str, state: dict) -> dict:
    """``state`` without the auxiliary classifier of torchvision's ``name`` (see models.AUXILIARY_HEADS)."""
    heads = AUXILIARY_HEADS.get(name, ())
    return {k: v for k, v in state.items() if not k.startswith(heads)}


def _factory(spec: str, weights: str | None) -> Classifier:
    module_name, _, attribute = spec.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"cannot import {module_name!r} for the factory {spec} ({err}); make the package "
                        "importable (install it, or add its folder to PYTHONPATH)") from None
    factory = getattr(owner, attribute, None)
    if not callable(factory):
        raise DataError(f"{module_name} has no callable {attribute!r} for the factory {spec}")
    module = factory()
    if not isinstance(module, nn.Module):
        raise DataError(f"the factory {spec} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights:
        load_state_dict(module, _read_state_dict(_existing(weights)), f"{weights} for {spec}")
    return Classifier(module, f"factory {spec}", meta={"arch": spec, "weights": str(weights)})


def _existing(path: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"weights file {path} does not exist")
    return path


def load_classifier(model: str, weights: str | None = None, num_classes: int | None = None) -> Classifier:
    """The classifier ``model`` names (see the module docstring), in eval mode on the CPU.

    ``num_classes`` sizes the head of an architecture built for a state-dict file (a fine-tuned model).
    """
    classifier = _load(model, weights, num_classes)
    classifier.module.eval()  # a factory's fresh module is in training mode: its BatchNorm would learn
    return classifier


def _load(model: str, weights: str | None, num_classes: int | None) -> Classifier:
    path = Path(model).expanduser()
    if path.is_file():
        if is_torchscript(path):
            if weights:
                raise DataError(f"{path} is TorchScript, which holds its weights; drop --weights")
            with warnings.catch_warnings():  # torch 2.10+ calls TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
            return Classifier(module, f"TorchScript file {path}", meta={"arch": "torchscript"})
        try:
            blob = load_torch(path)
        except CodeInFileError:
            raise DataError(_pickled_module_message(path)) from None
        if isinstance(blob, dict) and "arch" in blob:
            if weights:
                raise DataError(f"{path} is a model file of this pipeline, which holds its weights; drop --weights")
            return _project_file(path, blob)
        raise DataError(f"{path} holds weights but no architecture: pass --model ARCH --weights {path}, where "
                        f"ARCH is the architecture they were trained with ({FORMS_HINT})")
    if model.startswith("torchvision:"):
        return _torchvision(model.removeprefix("torchvision:"), weights, num_classes)
    if model in ARCHITECTURES or model in DEPRECATED_NAMES:
        arch = canonical_arch(model)
        if not weights:
            raise DataError(f"architecture {arch} needs --weights: a state-dict file (or pass a model file of "
                            "this pipeline as --model)")
        module = build_model(arch)
        load_state_dict(module, _read_state_dict(_existing(weights)), f"{weights} for {arch}")
        normalize = (CIFAR10_MEAN, CIFAR10_STD) if arch in CIFAR_ARCHITECTURES else (IMAGENET_MEAN, IMAGENET_STD)
        return Classifier(module.eval(), f"{arch} with {weights}", normalize, None, "logits",
                          {"arch": arch, "weights": str(weights)})
    if FACTORY.fullmatch(model):
        return _factory(model, weights)
    if path.suffix or "/" in model:
        raise DataError(f"model file {path} does not exist")
    raise DataError(f"unknown model {model!r}: give {FORMS_HINT}")


def parse_normalize(text: str) -> Normalization | None | str:
    """``auto`` (the model's record, else the dataset's convention), ``none`` (raw [0, 1] inputs),
    ``imagenet``, ``cifar10``, or ``M1,M2,M3,S1,S2,S3`` / ``M1,M2,M3/S1,S2,S3``."""
    named = {"none": None, "auto": "unknown", "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
             "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
    if text.lower() in named:
        return named[text.lower()]
    try:
        values = [float(v) for v in text.replace("/", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 6 or any(s <= 0 for s in values[3:]):
        raise DataError(f"--normalize {text!r}: give auto, none, imagenet, cifar10, or six numbers "
                        "MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B (in [0, 1] units, stds positive)")
    return tuple(values[:3]), tuple(values[3:])


def probe_output(classifier: Classifier, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Run the module on ``x`` (module inputs), check the output's shape, and settle logits vs probabilities.

    Probabilities are detected when every output is non-negative and every row sums to 1 (tolerance 1e-3);
    a model that returns both, or a dict, must be wrapped by the user (say so)."""
    with torch.inference_mode():
        out = classifier.module(x)
    if not isinstance(out, torch.Tensor):
        raise DataError(f"{classifier.source} returns a {type(out).__name__}, not a tensor of class scores; "
                        "wrap it in a factory whose module returns the (N, classes) logits")
    if out.ndim != 2 or out.shape[0] != len(x):
        raise DataError(f"{classifier.source} returns shape {tuple(out.shape)} for {len(x)} images; expected "
                        f"(N, classes) = ({len(x)}, {num_classes})")
    if out.shape[1] != num_classes:
        raise DataError(f"{classifier.source} has {out.shape[1]} outputs but the dataset has {num_classes} "
                        "classes; audit it on data with the classes it was trained on (or give the class list)")
    if classifier.output == "auto":
        sums = out.double().sum(1)
        probabilities = bool((out >= 0).all() and (sums - 1).abs().max() < 1e-3)
        classifier.output = "probabilities" if probabilities else "logits"
        log.info("%s returns %s (detected; --output overrides)", classifier.source, classifier.output)
    return out


# ------------------------------------------------------------------------------------------------------------
# `overinterp model`: a pretrained classifier as a model file of this pipeline, for the workflow's stages


def pretrained_model_file(model: str, weights: str | None, out, data: str, normalize: Normalization) -> dict:
    """Write ``model`` (an architecture of this project or ``torchvision:NAME`` with ``weights``) as a model
    file of this pipeline for the dataset file ``data``: its classes, frame and the normalisation the
    workflow feeds it (``normalize``), checked by a forward pass. Returns the file's meta."""
    from .data import load_split

    split = load_split(data, "test")
    classes = list(split.classes)
    classifier = load_classifier(model, weights, len(classes))
    arch = classifier.meta.get("arch")
    if not (str(arch).startswith("torchvision:") or arch in ARCHITECTURES):
        raise DataError(f"{classifier.source} cannot be stored as a model file of this pipeline (the stages rebuild "
                        "a model from its architecture name); give one of the project's architectures or "
                        "torchvision:NAME with its weights, or audit it as it is with `overinterp audit`")
    state = classifier.module.state_dict()
    if arch.startswith("torchvision:"):
        state = without_auxiliary_heads(arch.removeprefix("torchvision:"), state)
    module = build_model(arch, num_classes=len(classes))
    load_state_dict(module, state, f"{model} ({weights})")
    module.eval()
    probe = Classifier(module, classifier.source, normalize, output="logits")
    probe_output(probe, probe.model_inputs(split.images[:2]), len(classes))
    if classifier.normalize not in ("unknown", None) and not all(
            abs(a - b) < 1e-3 for given, own in zip(normalize, classifier.normalize) for a, b in zip(given, own)):
        log.warning("%s was trained with mean %s, std %s; the workflow normalises with mean %s, std %s "
                    "(config `normalization`)", classifier.source, *classifier.normalize, *normalize)
    meta = {"pretrained": {"model": model, "weights": str(weights)}, "num_classes": len(classes),
            "classes": classes, "resize": split.frame[0], "crop": split.frame[1],
            "normalize": {"mean": list(normalize[0]), "std": list(normalize[1])}}
    save_model(out, module, arch, **meta)
    return meta


def add_commands(subparsers) -> None:
    from .data import add_normalization_arguments

    p = subparsers.add_parser("model", help="a pretrained classifier as a model file for the workflow's stages")
    p.add_argument("--model", required=True,
                   help="one of the project's architectures or torchvision:NAME (the stages rebuild it by name)")
    p.add_argument("--weights", default=None,
                   help="a state-dict file, or a torchvision weights name (IMAGENET1K_V1) for torchvision:NAME")
    p.add_argument("--data", required=True, help="the dataset file (.npz) the model is for: its classes and frame")
    add_normalization_arguments(p)
    p.add_argument("--out", required=True, help="model file (.pt)")
    p.set_defaults(handler=run_model)


def run_model(args) -> int:
    from .data import normalizer_from_args

    normalizer = normalizer_from_args(args)
    normalize = (tuple(normalizer.mean.flatten().tolist()), tuple(normalizer.std.flatten().tolist()))
    meta = pretrained_model_file(args.model, args.weights, args.out, args.data, normalize)
    print(f"{args.out}: {args.model} ({args.weights}), {meta['num_classes']} classes, {meta['crop']}x{meta['crop']}")
    return 0
