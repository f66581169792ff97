# Helpers shared by the rules: the configuration (coerced, validated, cross-checked), model names,
# command-line fragments, the list of final outputs.
import json
import os
import re
import shlex
import shutil
from decimal import Decimal
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

import yaml


# ------------------------------------------------------------------------------------- configuration
def coerce_to_schema(value, schema):
    """Values from `--config key='{a: 3}'` arrive as strings (Snakemake reads nested YAML without types):
    convert each string where the schema asks for a number, boolean or null, so validation sees what the
    user meant. Anything that does not convert is left for validation to report."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: coerce_to_schema(
                v, props.get(k, extra if isinstance(extra, dict) else {})
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [coerce_to_schema(v, schema.get("items", {})) for v in value]
    if not isinstance(value, str):
        return value
    if "null" in types and value in ("null", "~", "None", ""):
        return None
    if "boolean" in types and value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind, convert in (("integer", int), ("number", float)):
        if kind in types:
            try:
                return convert(value)
            except ValueError:
                pass
    return value


CONFIG_SCHEMA = Path(workflow.current_basedir) / "../schemas/config.schema.yaml"
config.update(coerce_to_schema(config, yaml.safe_load(CONFIG_SCHEMA.read_text())))
validate(config, str(CONFIG_SCHEMA))


def config_error(key, problem, fix):
    raise ValueError(f"config `{key}`: {problem}. {fix}")


def fraction_name(value):
    """A kept fraction as written in file names: plain decimals (0.00001, never 1e-05)."""
    return (
        format(Decimal(repr(float(value))).normalize(), "f")
        if value < 1
        else repr(float(value))
    )


def check_config():
    """Combinations the schema cannot express, refused before any job runs."""
    if config["sis"]["method"] == "exact" and "steps" in (
        config["sis"]["storage"],
        config["subsets"]["by"],
    ):
        config_error(
            "sis.storage / subsets.by",
            "steps are the gradient method's: exact backward selection removes one pixel a step",
            "Set sis.method: gradient, or leave sis.storage: orders and subsets.by: pixels",
        )
    seeds, sis_seed_value = config["models"]["seeds"], config["sis"]["seed"]
    if sis_seed_value is not None and sis_seed_value not in seeds:
        config_error(
            "sis.seed",
            f"{sis_seed_value} is not one of models.seeds {seeds}, so it would train an extra "
            "model of its own",
            "Choose one of models.seeds, or null for the first",
        )
    if not config["cifar10"]["enabled"]:
        return
    for split in ("train", "test"):
        size = config["dataset"][f"{split}_size"]
        if size is not None and size % PRESENT_CLASSES:
            config_error(
                f"dataset.{split}_size",
                f"{size} is not a multiple of the {PRESENT_CLASSES} classes, so the "
                "subset cannot be class-balanced",
                f"Choose a multiple of {PRESENT_CLASSES}, or null",
            )
    if not config["humaneval"]["enabled"]:
        return
    if NUM_CLASSES > 10:
        config_error(
            "humaneval",
            f"the study offers number keys 0-9, so at most 10 classes; the dataset has "
            f"{NUM_CLASSES}",
            "Set humaneval.enabled: false",
        )
    if DATASET_ADAPTER != "cifar10":
        return
    # null = the whole CIFAR-10 test split
    test_size = config["dataset"]["test_size"] or 10000
    per_class = test_size // 10
    needed = {
        c: -(-config["humaneval"][c]["count"] // 10) for c in ("bs", "random", "full")
    }
    if sum(needed.values()) > per_class:
        counts = ", ".join(
            f"humaneval.{c}.count = {config['humaneval'][c]['count']}" for c in needed
        )
        config_error(
            "humaneval",
            f"{counts} need up to {sum(needed.values())} test images per class, but "
            f"dataset.test_size = {test_size} has {per_class} per class (conditions never share an image)",
            "Lower the counts or raise dataset.test_size",
        )


# ------------------------------------------------------------------------------------------ the dataset
# Every stage reads one dataset file, whichever adapter made it (workflow/rules/data.smk): a new dataset is an
# adapter and a config entry, not new rules.
DATASET_ADAPTER = config["dataset"]["adapter"]
DATASET = {
    "cifar10": "data/cifar10/cifar10.npz",
    "imagefolder": "data/imagefolder/dataset.npz",
    "imagenet": "data/imagenet/dataset.npz",
}[DATASET_ADAPTER]


def imagefolder_classes():
    """The classes of the image folder, read from its training split's folder names (or the configured list)."""
    root = config["dataset"]["root"]
    if not root:
        config_error(
            "dataset.root",
            f"is not set, but dataset.adapter is {DATASET_ADAPTER}",
            "Point it at your folder: ROOT/train/<class>/<images> and ROOT/<test_split>/<class>/<images>, "
            "e.g. --config dataset='{root: /data/imagenet}'",
        )
    train = Path(root).expanduser() / "train"
    if not train.is_dir():
        config_error(
            "dataset.root",
            f"{root} has no train/ folder",
            "Give the folder that holds train/<class>/<images> and the test split",
        )
    return config["dataset"]["classes"] or sorted(
        p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


# Classes the models tell apart (ImageNet's 1,000 whatever a copy holds), and those the data holds.
PRESENT_CLASSES = 10 if DATASET_ADAPTER == "cifar10" else len(imagefolder_classes())
NUM_CLASSES = 1000 if DATASET_ADAPTER == "imagenet" else PRESENT_CLASSES
CHANCE = 1 / NUM_CLASSES


def dataset_input(wildcards):
    """cifar10: the verified archive; an image folder is read where it is (rerun with `-R dataset` after
    changing its files: Snakemake does not watch a folder)."""
    if DATASET_ADAPTER == "cifar10":
        return {"archive": "data/cifar10/cifar-10-python.tar.gz"}
    return {}


def dataset_source(wildcards, input):
    if DATASET_ADAPTER == "cifar10":
        return f"--archive {input.archive}"
    entry = config["dataset"]
    args = [
        f"--folder {shlex.quote(str(entry['root']))}",
        f"--test-split {entry['test_split']}",
    ]
    args += [f"--{key} {entry[key]}" for key in ("crop", "resize") if entry[key]]
    if DATASET_ADAPTER == "imagenet":
        args.append("--imagenet")
    elif entry["classes"]:
        classes = shlex.quote(",".join(entry["classes"]))
        args.append(f"--classes {classes}")
    if entry["stream"]:
        args.append("--stream")
    return " ".join(args)


check_config()


# The rules run `python -m overinterp` from this source tree, so a job needs only the dependencies (the
# project's .venv, or envs/overinterp.yaml with --sdm conda) on its PATH. The source folder goes into the
# shell prefix, not into each rule's params: a checkout's location is no reason to rerun anything.
# (Snakemake formats the prefix like a shell command: doubled braces stand for the shell's own.)
shell.prefix(
    "set -euo pipefail; export PYTHONPATH="
    + shlex.quote(str(Path(workflow.basedir) / "src"))
    + "${{PYTHONPATH:+:$PYTHONPATH}}; "
)
ARCHITECTURES = config["models"]["architectures"]
for _old in sorted(set(ARCHITECTURES) & {"resnet20", "resnet18", "vgg16_bn"}):
    logger.warning(
        f"models.architectures: {_old!r} is a deprecated name of the CIFAR network 'cifar_{_old}' "
        "(the prefix tells it from torchvision's ImageNet networks); write "
        f"'cifar_{_old}'"
    )
SEEDS = config["models"]["seeds"]
PRETRAINED = config["models"]["pretrained"]
if not ARCHITECTURES and not PRETRAINED:
    config_error(
        "models",
        "neither `architectures` nor `pretrained` names a model",
        "Name an architecture to train, or a pretrained model under models.pretrained",
    )
# Models are named "<architecture>-s<seed>"; for the mitigation experiments also
# "<architecture>-dropout-s<seed>" (trained with input dropout) and "ensemble-<architecture>" (its replicate
# seeds) or "ensemble-mixed" (one replicate of every architecture): an ensemble averages its members' logits.
# "<architecture>-adv-s<seed>" is adversarially trained (config `adversarial`). A pretrained model
# (models.pretrained) is "pretrained-<name>".
MODELS = [f"{arch}-s{seed}" for arch in ARCHITECTURES for seed in SEEDS]
PRETRAINED_MODELS = [f"pretrained-{name}" for name in PRETRAINED]
SINGLE_MODEL_PATTERN = r"[A-Za-z0-9_]+?(-dropout|-adv)?-s\d+"
ADVERSARIAL = config["adversarial"]
# Adversarially trained models: replicate `sis.seed` of each architecture, selecting models like the others.
ADVERSARIAL_MODELS = (
    [f"{arch}-adv-s{config['sis']['seed'] or SEEDS[0]}" for arch in ARCHITECTURES]
    if ADVERSARIAL["enabled"]
    else []
)
SIS_METHOD = config["sis"]["method"]
FRACTIONS = [fraction_name(f) for f in config["subsets"]["fractions"]]
RETRAIN_SEEDS = config["subsets"]["retrain_seeds"]
# Subset names: "<method>-bs-<fraction>", "<method>-positions-<fraction>" (keep-mask alone), "random-<fraction>".
SUBSET_PATTERN = r"(exact|gradient)-(bs|positions)-[0-9.]+|random-[0-9.]+"


wildcard_constraints:
    model=SINGLE_MODEL_PATTERN + r"|(ensemble|pretrained)-[A-Za-z0-9_]+",
    split="train|test|cifar10c",
    # "gradient-<fill>": backward selection with masked pixels filled otherwise (the masking control)
    method=r"exact|gradient(-(mean|noise|impute))?",
    fraction=r"[0-9.]+",
    subset=SUBSET_PATTERN,
    seed=r"\d+",


def pretrained_weights_file(wildcards):
    """A pretrained model's weights when they are a file (so that a new file remakes the model file); a
    torchvision weights name is fetched by the job."""
    weights = str(PRETRAINED[wildcards.name]["weights"])
    return [weights] if weights.endswith((".pt", ".pth")) or "/" in weights else []


def sis_seed():
    seed = config["sis"]["seed"]
    return SEEDS[0] if seed is None else seed


def sis_models():
    """The models whose train and test images go through backward selection: replicate `sis.seed` of each
    architecture (plus the mitigation models when `mitigation.retrain` is set)."""
    models = (
        [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES]
        + PRETRAINED_MODELS
        + ADVERSARIAL_MODELS
    )
    if config["mitigation"]["retrain"]:
        models += mitigation_models()
    return models


def parse_subset(name):
    match = re.fullmatch(
        r"(?:(?P<method>exact|gradient)-(?P<kind>bs|positions)|random)-(?P<fraction>[0-9.]+)",
        name,
    )
    return {
        "method": match["method"],
        "subset": match["kind"] or "random",
        "fraction": match["fraction"],
    }


def keep_masks(model, subset, alone=None):
    """The keep-mask file a subset name refers to (positions-only reuses the backward-selection masks);
    ``alone``: backward selection of that split's images alone ("test", or "cifar10c": the CIFAR-10-C
    sample)."""
    parsed = parse_subset(subset)
    if parsed["subset"] == "random":
        return f"results/subsets/random-{parsed['fraction']}.npz"
    suffix = f"-{alone}" if alone else ""
    return f"results/subsets/{model}/{parsed['method']}/bs-{parsed['fraction']}{suffix}.npz"


def evaluation_tags(model, evaluated="trained", subset=None, seed=None):
    """Metadata stored in an evaluation summary, from which the tables are grouped."""
    parsed = parse_model(model)
    tags = {  # a pretrained or adversarially trained model's rows are its own
        "architecture": (
            model
            if parsed["pretrained"]
            else f"{parsed['arch']}-adv" if parsed["adversarial"] else parsed["arch"]
        ),
        "model": model,
        "kind": model_kind(model),
        "evaluated": evaluated,
        "seed": seed_of(model) if seed is None else seed,
    }
    tags.update(parse_subset(subset) if subset else {"subset": "full"})
    return " ".join(f"--tag {k}={v}" for k, v in tags.items() if v is not None)


def comparison_summaries():
    """Every evaluation summary behind Table 1 and the fraction sweep."""
    summaries = [
        f"results/eval/{model}/full.json"
        for model in MODELS + PRETRAINED_MODELS + ADVERSARIAL_MODELS
    ]
    for model in sis_models():
        for fraction in FRACTIONS:
            trained = [f"{SIS_METHOD}-bs-{fraction}", f"random-{fraction}"]
            summaries += [f"results/eval/{model}/{subset}.json" for subset in trained]
            if config["subsets"]["positions_only"]:
                trained.append(f"{SIS_METHOD}-positions-{fraction}")
            summaries += [
                f"results/retrain/{model}/{subset}-s{seed}/test.json"
                for subset in trained
                for seed in RETRAIN_SEEDS
            ]
    return summaries


def parse_model(model):
    """{'arch', 'seed', 'dropout', 'ensemble', 'pretrained'} of a model name (see MODELS above); a pretrained
    model's arch is the network models retrained on its subsets are made of."""
    if model.startswith("pretrained-"):
        name = model.removeprefix("pretrained-")
        return {
            "arch": PRETRAINED[name]["model"],
            "seed": None,
            "dropout": False,
            "adversarial": False,
            "ensemble": None,
            "pretrained": name,
        }
    if model.startswith("ensemble-"):
        name = model.removeprefix("ensemble-")
        return {
            "arch": ARCHITECTURES[0] if name == "mixed" else name,
            "seed": None,
            "dropout": False,
            "adversarial": False,
            "ensemble": name,
            "pretrained": None,
        }
    match = re.fullmatch(
        r"(?P<arch>[A-Za-z0-9_]+?)(?P<variant>-dropout|-adv)?-s(?P<seed>\d+)", model
    )
    return {
        "arch": match["arch"],
        "seed": int(match["seed"]),
        "dropout": match["variant"] == "-dropout",
        "adversarial": match["variant"] == "-adv",
        "ensemble": None,
        "pretrained": None,
    }


def standard_model(model):
    """The standard selecting model of a model's architecture."""
    return f"{arch_of(model)}-s{sis_seed()}"


def arch_of(model):
    """The architecture of a model; for an ensemble, the one models retrained on its subsets get."""
    return parse_model(model)["arch"]


def seed_of(model):
    return parse_model(model)["seed"]


def model_kind(model):
    parsed = parse_model(model)
    if parsed["pretrained"]:
        return "pretrained"
    if parsed["adversarial"]:
        return "adversarial"
    return (
        "ensemble"
        if parsed["ensemble"]
        else "input_dropout" if parsed["dropout"] else "single"
    )


def ensemble_members(name):
    if name == "mixed":
        return [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES]
    return [f"{name}-s{seed}" for seed in SEEDS]


def mitigation_models():
    """Input-dropout models and ensembles compared with the single models (config `mitigation`)."""
    mitigation = config["mitigation"]
    models = []
    if mitigation["input_dropout"] > 0:
        models += [f"{arch}-dropout-s{sis_seed()}" for arch in ARCHITECTURES]
    if "homogeneous" in mitigation["ensembles"] and len(SEEDS) > 1:
        models += [f"ensemble-{arch}" for arch in ARCHITECTURES]
    if "heterogeneous" in mitigation["ensembles"] and len(ARCHITECTURES) > 1:
        models.append("ensemble-mixed")
    return models


def compared_models():
    """Every model whose test images go through backward selection and the SIS analyses."""
    return sis_models() + mitigation_models()


def normalization_args():
    norm = config["normalization"]
    return "--mean {} --std {} --baseline {}".format(
        " ".join(map(str, norm["mean"])),
        " ".join(map(str, norm["std"])),
        norm["baseline"],
    )


def size_args():
    """--train-size/--test-size for the class-balanced subsets the config asks for."""
    args = []
    for split in ("train", "test"):
        size = config["dataset"][f"{split}_size"]
        if size is not None:
            args.append(f"--{split}-size {size}")
    return " ".join(args)


def split_size_arg(split):
    size = config["dataset"][f"{split}_size"]
    return "" if size is None else f"--size {size}"


def recipe_json(model=None):
    """The training recipe; input-dropout models get the configured dropout probability. Settings left
    unset (null) are left out, so a setting added to the recipe does not rerun the trainings it leaves as
    they were."""
    recipe = {k: v for k, v in config["train"].items() if v is not None}
    if model is not None and parse_model(model)["dropout"]:
        recipe["input_dropout"] = config["mitigation"]["input_dropout"]
    if model is not None and parse_model(model)["adversarial"]:
        recipe.update(
            adversarial_epsilon=ADVERSARIAL["epsilon"],
            adversarial_step_size=ADVERSARIAL["step_size"],
            adversarial_steps=ADVERSARIAL["steps"],
        )
    return shlex.quote(json.dumps(recipe, sort_keys=True))


# Training and backward selection use every core they are given: locally Snakemake caps this at --cores
# (one such job at a time on a small machine); on a cluster it is the CPUs requested per GPU job.
HEAVY_THREADS = 8


def gpus_visible():
    """Whether this machine shows an NVIDIA GPU to its jobs: its driver's nvidia-smi is installed, and
    CUDA_VISIBLE_DEVICES does not hide every device."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    return not hidden and shutil.which("nvidia-smi") is not None


# GPU rules ask for `gpu=1` where there is a GPU; on a machine without one they run on the CPU and do not
# claim (or print) a GPU. The Slurm profile sets `gpu: 1` for them itself: its login node may have none.
GPU_JOB = 1 if gpus_visible() else 0


# Report categories (`snakemake --report`), one per stage in pipeline order; a stage's figures and tables use
# report(..., caption="../report/<name>.rst", category=REPORT_CATEGORY[stage]).
REPORT_CATEGORY = {
    "training": "1. Training",
    "sis": "2. Backward selection and SIS",
    "retrain": "3. Pixel-subset retraining",
    "mitigation": "4. Mitigation",
    "humaneval": "5. Human evaluation",
    "audit": "6. Audits",
    "controls": "7. Controls: what the subsets mean",
    "corruptions": "8. Out of distribution: CIFAR-10-C",
}


# The report's front page, once the run has written it (see the Snakefile's `report:`).
HEADLINE = "results/report-front.rst"


def report_front_page():
    """This run's headline when it exists (absolute: the report reads it from the working directory), else
    the workflow's description."""
    if config["cifar10"]["enabled"] and Path(HEADLINE).exists():
        return str(Path(HEADLINE).resolve())
    return "workflow/report/workflow.rst"


def headline_settings():
    """What the front page says of the configuration, as JSON for `overinterp tables headline`."""
    settings = {
        "architectures": ARCHITECTURES,
        "pretrained": {
            f"pretrained-{name}": entry for name, entry in PRETRAINED.items()
        },
        "seeds": SEEDS,
        "epochs": config["train"]["epochs"],
        "dataset": {
            "cifar10": "CIFAR-10",
            "imagenet": f"ImageNet ({PRESENT_CLASSES} of its 1,000 classes)",
            "imagefolder": f"the image folder {Path(str(config['dataset']['root'])).name} ({NUM_CLASSES} classes)",
        }[DATASET_ADAPTER],
        "chance": CHANCE,
        "train_size": config["dataset"]["train_size"],
        "method": SIS_METHOD,
        "pixels_per_step": config["sis"]["pixels_per_step"],
        "tau": config["sis"]["tau"],
        "fraction": float(FRACTIONS[0]),
        "retrain_seeds": RETRAIN_SEEDS,
        "sis_models": [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES]
        + PRETRAINED_MODELS,
    }
    return shlex.quote(json.dumps(settings))


def all_outputs():
    outputs = [
        f"results/eval/{model}/full.json"
        for model in MODELS + PRETRAINED_MODELS + ADVERSARIAL_MODELS
    ]
    outputs += robustness_outputs()  # workflow/rules/robust.smk
    outputs += [
        HEADLINE,
        "results/tables/table1.md",
        "results/tables/fraction_sweep.md",
        "results/tables/sis_sizes.md",
    ]
    outputs += sis_outputs()  # workflow/rules/sis.smk
    outputs += mitigation_outputs()  # workflow/rules/mitigation.smk
    outputs += humaneval_outputs()  # workflow/rules/humaneval.smk
    outputs += figure_outputs()  # workflow/rules/figures.smk
    outputs += control_outputs()  # workflow/rules/controls.smk
    outputs += corruption_outputs()  # workflow/rules/corruptions.smk
    if not config["cifar10"]["enabled"]:  # audits only (config/audit.yaml)
        outputs = []
    outputs += [f"results/audit/{name}/report.html" for name in AUDITS]  # audit.smk
    return outputs


# ------------------------------------------------------------------ audits (audit.smk)
AUDITS = config["audits"]
# The audit's command-line options, from its config entry (see the schema's `audits`).
AUDIT_OPTIONS = {
    "model": "--model",
    "weights": "--weights",
    "data": "--data",
    "split": "--split",
    "limit": "--limit",
    "classes": "--classes",
    "crop": "--crop",
    "resize": "--resize",
    "normalize": "--normalize",
    "mean_colour": "--mean-colour",
    "output": "--output",
    "method": "--method",
    "pixels_per_step": "--pixels-per-step",
    "tau": "--tau",
    "taus": "--taus",
    "fractions": "--fractions",
    "dtype": "--dtype",
    "seed": "--seed",
}


def audit_args(name):
    options = []
    for key, flag in AUDIT_OPTIONS.items():
        value = AUDITS[name].get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        options.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(options)


def audit_shards(name):
    return [
        f"results/audit/sis/{name}/{i:04d}.npz" for i in range(AUDITS[name]["shards"])
    ]


def audit_inputs(w):
    """The files an audit reads, so that a model or dataset this workflow makes is made first."""
    audit = AUDITS[w.audit]
    files = [audit["model"], audit.get("weights") or ""]
    kind, _, path = audit["data"].partition(":")
    files.append(
        path
        if kind == "cifar10"
        else audit["data"] if audit["data"].endswith(".npz") else ""
    )
    return [f for f in files if f.endswith((".pt", ".pth", ".ts", ".npz"))]


# ------------------------------------------------------------------ backward selection (sis.smk)
SIS_SHARDS = config["sis"]["shards"]
COMPARE_SAMPLE = config["sis"]["compare_sample"]


def sis_args():
    sis = config["sis"]
    batch = "" if sis["batch_size"] is None else f"--batch-size {sis['batch_size']}"
    steps = "--steps" if sis["storage"] == "steps" else ""
    return (
        f"--pixels-per-step {sis['pixels_per_step']} --precision {sis['precision']} {batch} "
        f"--evaluator {sis['evaluator']} {steps} {normalization_args()}"
    )


def subsets_by_args(random=False):
    """How subsets are sized: by pixels (the default, no option) or by the gradient method's steps (whose
    size random subsets need; backward-selection results record it)."""
    if config["subsets"]["by"] == "pixels":
        return ""
    return "--by steps" + (
        f" --pixels-per-step {config['sis']['pixels_per_step']}" if random else ""
    )


def split_method(method):
    """("gradient", "noise") of a method name "gradient-noise"; the fill of a plain method is the mean colour."""
    base, _, fill = method.partition("-")
    return base, fill or "mean"


def fill_args(fill):
    """The options that fill masked pixels with ``fill`` (none for the paper's mean colour)."""
    if fill == "mean":
        return ""
    return f"--fill {fill} --fill-seed {CONTROLS['seed']} --impute-noise {CONTROLS['masking']['impute_noise']}"


def sis_job_args(wildcards):
    """--method, the fill, and the split's size: a fill variant (the masking control) runs at the control's size."""
    base, fill = split_method(wildcards.method)
    if wildcards.split == "cifar10c":  # the whole CIFAR-10-C sample
        size = ""
    elif base != wildcards.method:
        size = control_size_arg(wildcards.split, "--size")
    else:
        size = split_size_arg(wildcards.split)
    return f"--method {base} {fill_args(fill)} --split {split_name(wildcards.split)} {size}"


def sis_shards(model, method, split):
    return [
        f"results/sis/{model}/{method}/{split}/shard{i}.npz" for i in range(SIS_SHARDS)
    ]


def sis_outputs():
    """The merged SIS files (of the training split too unless the dataset is streamed: too large to merge),
    and the agreement table when a comparison sample is set."""
    splits = ["test"] if config["dataset"]["stream"] else ["train", "test"]
    outputs = expand(
        "results/sis/{model}/{method}/{split}.npz",
        model=sis_models(),
        method=SIS_METHOD,
        split=splits,
    )
    outputs += [
        f"results/sis/{model}/{SIS_METHOD}/cifar10c.npz"
        for model in CIFAR10C_SIS_MODELS
    ]
    if COMPARE_SAMPLE:
        outputs += multiext("results/tables/sis_agreement", ".csv", ".md")
    return outputs


# -------------------------------------------------------------- human evaluation (humaneval.smk)
import glob

HUMANEVAL = config["humaneval"]
HUMANEVAL_MODEL = HUMANEVAL["model"] or sis_models()[0]
HUMANEVAL_FRACTION = (
    fraction_name(HUMANEVAL["fraction"]) if HUMANEVAL["fraction"] else FRACTIONS[0]
)
if HUMANEVAL_MODEL not in sis_models():
    raise ValueError(
        f"humaneval.model {HUMANEVAL_MODEL!r} has no backward-selection subsets; choose one of {sis_models()} "
        "(the models SIS runs on) or null"
    )
HUMANEVAL_SUBSETS = {
    "bs": f"{SIS_METHOD}-bs-{HUMANEVAL_FRACTION}",
    "random": f"random-{HUMANEVAL_FRACTION}",
}


def humaneval_responses():
    return sorted(glob.glob(str(Path(HUMANEVAL["responses"]) / "*.csv")))


def humaneval_predictions():
    """(name, condition, predictions CSV) of the models on the study's images: the model whose subsets
    are shown, on each condition, and the models retrained on each kind of subset, on that kind.
    """
    model = HUMANEVAL_MODEL
    entries = [(model, "full", f"results/eval/{model}/full.csv")]
    entries += [
        (model, c, f"results/eval/{model}/{s}.csv")
        for c, s in HUMANEVAL_SUBSETS.items()
    ]
    entries += [
        (
            f"{model} retrained on the subsets, seed {seed}",
            c,
            f"results/retrain/{model}/{s}-s{seed}/test.csv",
        )
        for seed in RETRAIN_SEEDS
        for c, s in HUMANEVAL_SUBSETS.items()
    ]
    return entries


def humaneval_outputs():
    if not config["humaneval"]["enabled"]:
        return []
    outputs = [
        "results/humaneval/study.zip",
        "results/humaneval/answer_key.csv",
        "results/humaneval/manifest.csv",
    ]
    if humaneval_responses():
        outputs += ["results/tables/humaneval.csv", "results/figures/humaneval.png"]
    return outputs


def humaneval_responses_input(wildcards):
    files = humaneval_responses()
    if not files:
        raise ValueError(
            f"no response files (*.csv) in {HUMANEVAL['responses']}: put the CSVs downloaded from the study "
            "page there (or set humaneval.responses)"
        )
    return files


# ------------------------------------------------------------------------ mitigation (mitigation.smk)
def mitigation_outputs():
    if not mitigation_models():
        return []
    return [
        "results/tables/mitigation.md",
        "results/figures/mitigation.png",
        "results/figures/mitigation.pdf",
    ]


# ---------------------------------------------------------------------- figures (figures.smk)
# Tables shown in the report as HTML: name -> (title, stage); results/tables/<name>.csv is the source.
REPORT_TABLES = {
    "table1": (
        f"Table 1: test accuracy with {100 * float(FRACTIONS[0]):g}% of the pixels kept",
        "retrain",
    ),
    "fraction_sweep": ("Test accuracy against the fraction of pixels kept", "retrain"),
    "sis_sizes": (
        f"SIS sizes at tau = {config['sis']['tau']:g}, correct vs incorrect",
        "sis",
    ),
    "misclassified_sis": (
        "SIS sizes of misclassified vs correct images, by threshold",
        "sis",
    ),
}
if ADVERSARIAL_MODELS:
    REPORT_TABLES["robustness"] = ("Clean and PGD accuracy", "training")
if mitigation_models():
    REPORT_TABLES["mitigation"] = (
        "Ensembles and input dropout against single models",
        "mitigation",
    )
if config["sis"]["compare_sample"]:
    REPORT_TABLES["sis_agreement"] = ("Exact vs gradient backward selection", "sis")
CONTROL_TITLES = {
    "smoothed": "Smoothed subsets: confidence on SIS, dilated SIS and random pixels",
    "targeted": "Backward selection towards every class",
    "masking": "Retraining on subsets under fills that hide the mask",
    "swap": "Shape of one image, pixels of another",
}


def figure_outputs():
    names = ["training_curves"] if MODELS else []
    names += [
        "table1",
        "fraction_sweep",
        "confidence_curves",
        "sis_sizes",
        "misclassified_sis",
    ]
    if config["figures"]["sis_examples_per_class"]:
        names += [f"sis_examples/{model}" for model in sis_models()]
    names += [f"retrain_curves/{model}" for model in sis_models()]
    outputs = [
        f"results/figures/{name}.{ext}" for name in names for ext in ("png", "pdf")
    ]
    outputs += [f"results/tables/{table}.html" for table in REPORT_TABLES]
    outputs.append("results/tables/table1.tex")
    return outputs


def figure_prefix(wildcards, output):
    return output.png.removesuffix(".png")


def retrain_runs(model):
    """(legend group, metrics file) of the full-image model and of the models retrained on its subsets at
    Table 1's fraction."""
    fraction = FRACTIONS[0]
    subsets = {
        "backward selection": f"{SIS_METHOD}-bs-{fraction}",
        "random": f"random-{fraction}",
    }
    if config["subsets"]["positions_only"]:
        subsets["mask positions only"] = f"{SIS_METHOD}-positions-{fraction}"
    runs = (
        []
        if parse_model(model)["pretrained"]
        else [("full images", f"results/models/{model}/metrics.csv")]
    )
    runs += [
        (group, f"results/retrain/{model}/{subset}-s{seed}/metrics.csv")
        for group, subset in subsets.items()
        for seed in RETRAIN_SEEDS
    ]
    return runs


def entry_args(pairs):
    return " ".join(f"--entry {shlex.quote(name)} {path}" for name, path in pairs)


# ------------------------------------------------------------------------ controls (controls.smk)
CONTROLS = config["controls"]
# The models the controls run on: each architecture's SIS replicate and the pretrained models.
CONTROL_MODELS = [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES] + PRETRAINED_MODELS
MASKING_KINDS = ["bs", "random"] + (
    ["positions"] if config["subsets"]["positions_only"] else []
)
if CONTROLS["enabled"]:
    REPORT_TABLES.update(
        {
            f"controls_{name}": (title, "controls")
            for name, title in CONTROL_TITLES.items()
        }
    )


def control_size(split):
    size = CONTROLS["masking"][f"{split}_size"]
    return config["dataset"][f"{split}_size"] if size is None else size


def control_size_arg(split, flag):
    size = control_size(split)
    return "" if size is None else f"{flag} {size}"


def check_control_sizes():
    if not CONTROLS["enabled"]:
        return
    for split in ("train", "test"):
        size, full = control_size(split), config["dataset"][f"{split}_size"]
        key = f"controls.masking.{split}_size"
        if size is not None and size % PRESENT_CLASSES:
            config_error(
                key,
                f"{size} is not a multiple of the {PRESENT_CLASSES} classes",
                f"Choose a multiple of {PRESENT_CLASSES}",
            )
        if size is not None and full is not None and size > full:
            config_error(
                key,
                f"{size} is more than dataset.{split}_size = {full}: the control reuses the run's "
                "random and mean-colour subsets, made for those images",
                f"Choose at most {full}, or null",
            )


check_control_sizes()


def masking_method(fill):
    """The backward selection whose subsets the masking control retrains on under ``fill``: the gradient
    method under that fill at the control's size; for the mean colour, the run's own where that is the same
    (the gradient method on the same images)."""
    same_images = all(
        control_size(split) == config["dataset"][f"{split}_size"]
        for split in ("train", "test")
    )
    if fill == "mean" and SIS_METHOD == "gradient" and same_images:
        return SIS_METHOD
    return f"gradient-{fill}"


def masking_masks(model, fill, kind):
    fraction = FRACTIONS[0]
    if kind == "random":
        return f"results/subsets/random-{fraction}.npz"
    return f"results/subsets/{model}/{masking_method(fill)}/bs-{fraction}.npz"


def masking_runs():
    return [
        f"results/controls/masking/{model}/{fill}/{kind}-s{seed}"
        for model in CONTROL_MODELS
        for fill in CONTROLS["masking"]["fills"]
        for kind in MASKING_KINDS
        for seed in CONTROLS["masking"]["retrain_seeds"] or RETRAIN_SEEDS
    ]


def swap_entries(model):
    """(name, model file, keep-masks) the swap test shows swapped subsets to: the selecting model on its own
    backward-selection subsets, and the models retrained on backward-selection and on random subsets.
    """
    fraction = FRACTIONS[0]
    bs = f"{SIS_METHOD}-bs-{fraction}"
    entries = [
        ("original", f"results/models/{model}/model.pt", keep_masks(model, bs, "test"))
    ]
    for subset, name in (
        (bs, "retrained on BS"),
        (f"random-{fraction}", "retrained on random"),
    ):
        entries += [
            (
                f"{name} s{seed}",
                f"results/retrain/{model}/{subset}-s{seed}/model.pt",
                keep_masks(model, subset),
            )
            for seed in RETRAIN_SEEDS
        ]
    return entries


def swap_args(wildcards):
    return " ".join(
        f"--entry {shlex.quote(name)} {path} {masks}"
        for name, path, masks in swap_entries(wildcards.model)
    )


def control_outputs():
    if not CONTROLS["enabled"]:
        return []
    return [
        f"results/{kind}/controls_{name}.{ext}"
        for name in CONTROL_TITLES
        for kind, exts in (("tables", ("csv", "md")), ("figures", ("png", "pdf")))
        for ext in exts
    ]


# ---------------------------------------------------------- adversarial robustness (robust.smk)
def robustness_models():
    """The full-image models whose clean and PGD accuracy is compared: the adversarially trained ones and
    the standard models they are set against."""
    return [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES] + ADVERSARIAL_MODELS


def robustness_outputs():
    if not ADVERSARIAL_MODELS:
        return []
    return multiext("results/tables/robustness", ".csv", ".md")


def control_report_inputs(control):
    if control == "masking":
        return [f"{run}/test.json" for run in masking_runs()]
    return [f"results/controls/{control}/{model}.csv" for model in CONTROL_MODELS]


def control_report_args(control, input):
    if control == "masking":
        return f"--summaries {' '.join(input)} --chance {CHANCE}"
    return f"{entry_args(zip(CONTROL_MODELS, input))} --tau {config['sis']['tau']} --chance {CHANCE}"


# ------------------------------------------------------------ CIFAR-10-C (corruptions.smk)
# With the cifar10 adapter only: CIFAR-10-C holds corruptions of CIFAR-10's test images.
CIFAR10C = config["cifar10c"]
CIFAR10C_ON = (
    CIFAR10C["enabled"]
    and DATASET_ADAPTER == "cifar10"
    and config["cifar10"]["enabled"]
)
CIFAR10C_GRID = "data/cifar10c/grid.npz"
CIFAR10C_SAMPLE = "data/cifar10c/sample.npz"
# The selecting models whose backward selection also runs on the CIFAR-10-C sample (split "cifar10c").
CIFAR10C_SIS_MODELS = (
    [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES]
    + PRETRAINED_MODELS
    + ADVERSARIAL_MODELS
    if CIFAR10C_ON
    else []
)
if CIFAR10C_ON:
    REPORT_TABLES["corruptions"] = (
        "CIFAR-10-C: accuracy against corruption severity",
        "corruptions",
    )


def split_dataset(wildcards):
    """The dataset file a split is read from: the run's, or the CIFAR-10-C sample's (its test split)."""
    return CIFAR10C_SAMPLE if wildcards.split == "cifar10c" else DATASET


def split_name(split):
    return "test" if split == "cifar10c" else split


def cifar10c_convert_args():
    sample = CIFAR10C["sample"]
    args = [
        f"--corruptions {','.join(CIFAR10C['corruptions'])}",
        f"--sample-size {sample['size']} --sample-seed {sample['seed']}",
        split_size_arg("test").replace("--size", "--test-size"),
    ]
    if CIFAR10C["images_per_cell"] is not None:
        args.append(f"--per-cell {CIFAR10C['images_per_cell']}")
    return " ".join(args)


def corruption_runs():
    """Every model evaluated on CIFAR-10-C: the full-image models (single, adversarial, pretrained, input
    dropout, ensembles), and those retrained on the selecting models' subsets at Table 1's fraction.
    """
    runs = [
        f"results/corruptions/{model}/full.csv"
        for model in dict.fromkeys(
            MODELS + PRETRAINED_MODELS + ADVERSARIAL_MODELS + mitigation_models()
        )
    ]
    fraction = FRACTIONS[0]
    subsets = [f"{SIS_METHOD}-bs-{fraction}", f"random-{fraction}"]
    if config["subsets"]["positions_only"]:
        subsets.append(f"{SIS_METHOD}-positions-{fraction}")
    runs += [
        f"results/corruptions/{model}/{subset}-s{seed}.csv"
        for model in sis_models()
        for subset in subsets
        for seed in RETRAIN_SEEDS
    ]
    # the same on subsets chosen on each corrupted image of the sample: the selecting model and the models
    # trained on its subsets
    chosen = [subset for subset in subsets if not subset.startswith("random")]
    runs += [
        f"results/corruptions/{model}/chosen-on-corrupted/{run}.csv"
        for model in CIFAR10C_SIS_MODELS
        for run in [chosen[0]]
        + [f"{subset}-s{seed}" for subset in chosen for seed in RETRAIN_SEEDS]
    ]
    return runs


def parse_run(run):
    """(subset, retrain seed or None) of "<subset>-s<seed>" (a retrained model) or "<subset>" (the selecting
    model)."""
    match = re.fullmatch(rf"(?P<subset>{SUBSET_PATTERN})(-s(?P<seed>\d+))?", run)
    return match["subset"], match["seed"]


def misclassified_entries():
    """(name, test SIS, full-image predictions) of every model compared, and of the selecting models on the
    CIFAR-10-C sample."""
    entries = [
        (
            model,
            f"results/sis/{model}/{SIS_METHOD}/test.npz",
            f"results/eval/{model}/full.csv",
        )
        for model in compared_models()
    ]
    entries += [
        (
            f"{model} on CIFAR-10-C",
            f"results/sis/{model}/{SIS_METHOD}/cifar10c.npz",
            f"results/eval/{model}/cifar10c.csv",
        )
        for model in CIFAR10C_SIS_MODELS
    ]
    return entries


def chosen_on_corrupted_model(model, run):
    subset, seed = parse_run(run)
    if seed is None:
        return f"results/models/{model}/model.pt"
    return f"results/retrain/{model}/{subset}-s{seed}/model.pt"


def chosen_on_corrupted_tags(model, run):
    subset, seed = parse_run(run)
    evaluated = "original" if seed is None else "trained"
    return (
        f"{evaluation_tags(model, evaluated, subset, seed)} --tag chosen_on=corrupted"
    )


def corruption_outputs():
    if not CIFAR10C_ON:
        return []
    return [
        *multiext("results/tables/corruptions", ".csv", ".md", "-cells.csv"),
        *multiext("results/figures/corruptions", ".png", ".pdf"),
    ]
