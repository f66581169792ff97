# Helpers of the ImageNet stage (workflow/rules/imagenet.smk): its settings, paths and command-line fragments.
IMAGENET = config["imagenet"]
if not IMAGENET["root"]:
    raise ValueError(
        "imagenet.enabled is true but imagenet.root is not set: point it at your ImageNet copy "
        "(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG), e.g. --config imagenet='{root: /data/imagenet}'"
    )
IN_ARCHS = list(IMAGENET["models"])
IN_INDEX = "data/imagenet/index"
IN_FRACTION = f"{IMAGENET['subsets']['fraction']:g}"
IN_SEEDS = IMAGENET["retrain"]["seeds"]
IN_VARIANTS = ["bs", "random"] + (
    ["positions"] if IMAGENET["retrain"]["positions_only"] else []
)
IN_PER_CLASS = {"train": IMAGENET["train_per_class"], "val": IMAGENET["val_per_class"]}
IN_PRETRAINED = [a for a in IN_ARCHS if IMAGENET["models"][a]["weights"]]
IN_TRAINED = [a for a in IN_ARCHS if not IMAGENET["models"][a]["weights"]]
IN_ROOT = shlex.quote(str(IMAGENET["root"]))


def in_alternatives(names):
    return "|".join(names) if names else "(?!)"


def in_shards(arch, split):
    return [
        f"results/imagenet/sis/{arch}/{split}/{i:04d}.npz"
        for i in range(IMAGENET["sis"]["shards"][split])
    ]


def in_per_class(split, flag="--per-class"):
    n = IN_PER_CLASS[split]
    return "" if n is None else f"{flag} {n}"


def in_frame_args(arch):
    model = IMAGENET["models"][arch]
    return " ".join(
        f"--{key} {model[key]}" for key in ("resize", "crop") if model.get(key)
    )


def in_data_args(split):
    return (
        f"--index-dir {IN_INDEX} --root {IN_ROOT} --split {split} {in_per_class(split)}"
    )


def in_keep_masks(arch, variant):
    kind = "random" if variant == "random" else "bs"
    return f"results/imagenet/subsets/{arch}/{kind}-{IN_FRACTION}.npz"


def in_report_figure(name, subcategory, labels=None):
    """A PNG of the ImageNet stage, shown in the report with its caption (workflow/report/imagenet_*.rst)."""
    return report(
        f"results/figures/imagenet-{name}.png",
        caption=f"../report/imagenet_{name.split('-')[0]}.rst",
        category=REPORT_CATEGORY["imagenet"],
        subcategory=subcategory,
        labels=labels,
    )


def imagenet_outputs():
    return [
        "results/tables/imagenet.md",
        "results/tables/imagenet.html",
        "results/figures/imagenet-accuracy.png",
        "results/figures/imagenet-confidence.png",
    ] + [f"results/imagenet/sis-sizes/{arch}-summary.md" for arch in IN_ARCHS]


def in_evaluation_inputs(w):
    """Which model and keep-masks an evaluation name stands for (see imagenet_report.SELECTING_ROWS)."""
    inputs = {"index": "data/imagenet/index/val.csv"}
    if w.name.startswith("full"):
        inputs["model"] = f"results/imagenet/models/{w.arch}/model.pt"
        if w.name != "full":
            inputs["keep"] = in_keep_masks(w.arch, w.name.removeprefix("full-on-"))
    else:
        variant = w.name.rsplit("-s", 1)[0]
        inputs["model"] = f"results/imagenet/retrain/{w.arch}/{w.name}/model.pt"
        inputs["keep"] = in_keep_masks(w.arch, variant)
    return inputs
