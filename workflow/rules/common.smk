# Helpers shared by the rules: model names, command-line fragments, the list of final outputs.
import json
import shlex
from pathlib import Path

# The rules run the package from this source tree, so a job needs only the dependencies
# (the project's .venv, or envs/overinterp.yaml with --sdm conda) on its PATH.
OVERINTERP = "PYTHONPATH={}${{PYTHONPATH:+:$PYTHONPATH}} python -m overinterp".format(
    shlex.quote(str(Path(workflow.basedir) / "src"))
)
ARCHITECTURES = config["models"]["architectures"]
SEEDS = config["models"]["seeds"]
# A trained model is named "<architecture>-s<seed>".
MODELS = [f"{arch}-s{seed}" for arch in ARCHITECTURES for seed in SEEDS]


wildcard_constraints:
    model=r"[A-Za-z0-9_]+-s\d+",
    split="train|test",


def arch_of(model):
    return model.rsplit("-s", 1)[0]


def seed_of(model):
    return int(model.rsplit("-s", 1)[1])


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


def recipe_json():
    return shlex.quote(json.dumps(config["train"], sort_keys=True))


DATASET = "data/cifar10/cifar10.npz"


def all_outputs():
    outputs = [f"results/eval/{model}/full.json" for model in MODELS]
    return outputs
