# Helpers shared by the rules: model names, command-line fragments, the list of final outputs.
import json
import re
import shlex
from pathlib import Path

# The rules run the package from this source tree, so a job needs only the dependencies
# (the project's .venv, or envs/overinterp.yaml with --sdm conda) on its PATH.
OVERINTERP = "PYTHONPATH={}${{PYTHONPATH:+:$PYTHONPATH}} python -m overinterp".format(
    shlex.quote(str(Path(workflow.basedir) / "src"))
)
ARCHITECTURES = config["models"]["architectures"]
SEEDS = config["models"]["seeds"]
# Models are named "<architecture>-s<seed>"; for the mitigation experiments also
# "<architecture>-dropout-s<seed>" (trained with input dropout) and "ensemble-<architecture>" (its replicate
# seeds) or "ensemble-mixed" (one replicate of every architecture): an ensemble averages its members' logits.
MODELS = [f"{arch}-s{seed}" for arch in ARCHITECTURES for seed in SEEDS]
SINGLE_MODEL_PATTERN = r"[A-Za-z0-9_]+?(-dropout)?-s\d+"
SIS_METHOD = config["sis"]["method"]
FRACTIONS = config["subsets"]["fractions"]
RETRAIN_SEEDS = config["subsets"]["retrain_seeds"]
# Subset names: "<method>-bs-<fraction>", "<method>-positions-<fraction>" (keep-mask alone), "random-<fraction>".
SUBSET_PATTERN = r"(exact|gradient)-(bs|positions)-[0-9.]+|random-[0-9.]+"


wildcard_constraints:
    model=SINGLE_MODEL_PATTERN + r"|ensemble-[A-Za-z0-9_]+",
    split="train|test",
    method="exact|gradient",
    fraction=r"[0-9.]+",
    subset=SUBSET_PATTERN,
    seed=r"\d+",


def sis_seed():
    seed = config["sis"]["seed"]
    return SEEDS[0] if seed is None else seed


def sis_models():
    """The models whose train and test images go through backward selection: replicate `sis.seed` of each
    architecture (plus the mitigation models when `mitigation.retrain` is set)."""
    models = [f"{arch}-s{sis_seed()}" for arch in ARCHITECTURES]
    if config["mitigation"]["retrain"]:
        models += mitigation_models()
    return models


def parse_subset(name):
    match = re.fullmatch(r"(?:(?P<method>exact|gradient)-(?P<kind>bs|positions)|random)-(?P<fraction>[0-9.]+)", name)
    return {
        "method": match["method"],
        "subset": match["kind"] or "random",
        "fraction": match["fraction"],
    }


def keep_masks(model, subset, test_only=False):
    """The keep-mask file a subset name refers to (positions-only reuses the backward-selection masks);
    ``test_only`` needs backward selection of the test images alone."""
    parsed = parse_subset(subset)
    if parsed["subset"] == "random":
        return f"results/subsets/random-{parsed['fraction']}.npz"
    suffix = "-test" if test_only else ""
    return f"results/subsets/{model}/{parsed['method']}/bs-{parsed['fraction']}{suffix}.npz"


def evaluation_tags(model, evaluated="trained", subset=None, seed=None):
    """Metadata stored in an evaluation summary, from which the tables are grouped."""
    tags = {"architecture": arch_of(model), "model": model, "kind": model_kind(model), "evaluated": evaluated,
            "seed": seed_of(model) if seed is None else seed}
    tags.update(parse_subset(subset) if subset else {"subset": "full"})
    return " ".join(f"--tag {k}={v}" for k, v in tags.items() if v is not None)


def comparison_summaries():
    """Every evaluation summary behind Table 1 and the fraction sweep."""
    summaries = [f"results/eval/{model}/full.json" for model in MODELS]
    for model in sis_models():
        for fraction in FRACTIONS:
            trained = [f"{SIS_METHOD}-bs-{fraction}", f"random-{fraction}"]
            summaries += [f"results/eval/{model}/{subset}.json" for subset in trained]
            if config["subsets"]["positions_only"]:
                trained.append(f"{SIS_METHOD}-positions-{fraction}")
            summaries += [
                f"results/retrain/{model}/{subset}-s{seed}/test.json" for subset in trained for seed in RETRAIN_SEEDS
            ]
    return summaries


def parse_model(model):
    """{'arch', 'seed', 'dropout', 'ensemble'} of a model name (see MODELS above)."""
    if model.startswith("ensemble-"):
        name = model.removeprefix("ensemble-")
        return {"arch": ARCHITECTURES[0] if name == "mixed" else name, "seed": None, "dropout": False,
                "ensemble": name}
    match = re.fullmatch(r"(?P<arch>[A-Za-z0-9_]+?)(?P<dropout>-dropout)?-s(?P<seed>\d+)", model)
    return {"arch": match["arch"], "seed": int(match["seed"]), "dropout": bool(match["dropout"]), "ensemble": None}


def arch_of(model):
    """The architecture of a model; for an ensemble, the one models retrained on its subsets get."""
    return parse_model(model)["arch"]


def seed_of(model):
    return parse_model(model)["seed"]


def model_kind(model):
    parsed = parse_model(model)
    return "ensemble" if parsed["ensemble"] else "input_dropout" if parsed["dropout"] else "single"


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
        " ".join(map(str, norm["mean"])), " ".join(map(str, norm["std"])), norm["baseline"]
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
    """The training recipe; input-dropout models get the configured dropout probability."""
    recipe = dict(config["train"])
    if model is not None and parse_model(model)["dropout"]:
        recipe["input_dropout"] = config["mitigation"]["input_dropout"]
    return shlex.quote(json.dumps(recipe, sort_keys=True))


DATASET = "data/cifar10/cifar10.npz"
# Training and backward selection use every core they are given: locally Snakemake caps this at --cores
# (one such job at a time on a small machine); on a cluster it is the CPUs requested per GPU job.
HEAVY_THREADS = 8


# Report categories (`snakemake --report`), one per stage in pipeline order; a stage's figures and tables use
# report(..., caption="../report/<name>.rst", category=REPORT_CATEGORY[stage]).
REPORT_CATEGORY = {
    "training": "1. Training",
    "sis": "2. Backward selection and SIS",
    "retrain": "3. Pixel-subset retraining",
    "mitigation": "4. Mitigation",
    "humaneval": "5. Human evaluation",
    "imagenet": "6. ImageNet",
}


def all_outputs():
    outputs = [f"results/eval/{model}/full.json" for model in MODELS]
    outputs += ["results/tables/table1.md", "results/tables/fraction_sweep.md", "results/tables/sis_sizes.md"]
    outputs += sis_outputs()  # workflow/rules/sis.smk
    outputs += mitigation_outputs()  # workflow/rules/mitigation.smk
    outputs += humaneval_outputs()  # workflow/rules/humaneval.smk
    outputs += figure_outputs()  # workflow/rules/figures.smk
    if not config["cifar10"]["enabled"]:  # an ImageNet-only configuration (config/imagenet.yaml)
        outputs = []
    if config["imagenet"]["enabled"]:
        outputs += imagenet_outputs()  # workflow/rules/imagenet.smk
    return outputs
