# The ImageNet half of the paper (included when `imagenet.enabled`; see config/imagenet.yaml):
# validate the user's copy -> selecting models (pretrained or trained) -> Batched Gradient SIS on train and
# val, sharded -> 10% backward-selection and random subsets -> fresh models trained and tested on them
# (plus the positions-only control) -> the ImageNet table and figures.
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
IN_VARIANTS = ["bs", "random"] + (["positions"] if IMAGENET["retrain"]["positions_only"] else [])
IN_PER_CLASS = {"train": IMAGENET["train_per_class"], "val": IMAGENET["val_per_class"]}
IN_PRETRAINED = [a for a in IN_ARCHS if IMAGENET["models"][a]["weights"]]
IN_TRAINED = [a for a in IN_ARCHS if not IMAGENET["models"][a]["weights"]]
IN_ROOT = shlex.quote(str(IMAGENET["root"]))


def in_alternatives(names):
    return "|".join(names) if names else "(?!)"


wildcard_constraints:
    arch=in_alternatives(IN_ARCHS),
    in_split="train|val",
    shard=r"\d{4}",
    variant="bs|random|positions",
    seed=r"\d+",


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
    return " ".join(f"--{key} {model[key]}" for key in ("resize", "crop") if model.get(key))


def in_data_args(split):
    return f"--index-dir {IN_INDEX} --root {IN_ROOT} --split {split} {in_per_class(split)}"


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
    ] + [f"results/imagenet/sis-sizes/{arch}.json" for arch in IN_ARCHS]


rule imagenet_index:
    output:
        expand(IN_INDEX + "/{split}.csv", split=["train", "val"]),
    params:
        classes=IMAGENET["num_classes"],
        workers=IMAGENET["workers"],
    threads: max(1, IMAGENET["workers"])
    log:
        "logs/imagenet/index.log",
    shell:
        "{OVERINTERP} imagenet-index --root {IN_ROOT} --num-classes {params.classes} "
        "--workers {params.workers} --out-dir {IN_INDEX} 2> {log}"


rule imagenet_pretrained:
    output:
        "results/imagenet/models/{arch}/model.pt",
    wildcard_constraints:
        arch=in_alternatives(IN_PRETRAINED),
    params:
        weights=lambda w: shlex.quote(str(IMAGENET["models"][w.arch]["weights"])),
        frame=lambda w: in_frame_args(w.arch),
    log:
        "logs/imagenet/model/{arch}.log",
    shell:
        "{OVERINTERP} imagenet-model --arch {wildcards.arch} --weights {params.weights} {params.frame} "
        "--out {output} 2> {log}"


rule imagenet_train:
    input:
        expand(IN_INDEX + "/{split}.csv", split=["train", "val"]),
    output:
        model="results/imagenet/models/{arch}/model.pt",
        metrics="results/imagenet/models/{arch}/metrics.csv",
    wildcard_constraints:
        arch=in_alternatives(IN_TRAINED),
    params:
        recipe=shlex.quote(json.dumps(IMAGENET["train"], sort_keys=True)),
        sizes=in_per_class("train") + " " + in_per_class("val", "--val-per-class"),
        frame=lambda w: in_frame_args(w.arch),
        workers=IMAGENET["workers"],
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=1,
    log:
        "logs/imagenet/train/{arch}.log",
    benchmark:
        "results/benchmarks/imagenet/train/{arch}.tsv"
    shell:
        "{OVERINTERP} imagenet-train --index-dir {IN_INDEX} --root {IN_ROOT} {params.sizes} "
        "--arch {wildcards.arch} {params.frame} --recipe {params.recipe} --workers {params.workers} "
        "--checkpoint results/checkpoints/imagenet/{wildcards.arch}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


rule imagenet_sis:
    input:
        index=IN_INDEX + "/{in_split}.csv",
        model="results/imagenet/models/{arch}/model.pt",
    output:
        "results/imagenet/sis/{arch}/{in_split}/{shard}.npz",
    params:
        data=lambda w: in_data_args(w.in_split),
        shards=lambda w: IMAGENET["sis"]["shards"][w.in_split],
        k=IMAGENET["sis"]["pixels_per_step"],
        batch=IMAGENET["sis"]["batch_size"],
        bf16="--bf16" if IMAGENET["sis"]["bf16"] else "",
        workers=IMAGENET["workers"],
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=1,
    log:
        "logs/imagenet/sis/{arch}/{in_split}/{shard}.log",
    benchmark:
        "results/benchmarks/imagenet/sis/{arch}/{in_split}/{shard}.tsv"
    shell:
        "{OVERINTERP} imagenet-sis {params.data} --model {input.model} --shard {wildcards.shard} "
        "--shards {params.shards} --pixels-per-step {params.k} --batch-size {params.batch} {params.bf16} "
        "--workers {params.workers} --out {output} 2> {log}"


rule imagenet_bs_subsets:
    input:
        train=lambda w: in_shards(w.arch, "train"),
        val=lambda w: in_shards(w.arch, "val"),
    output:
        "results/imagenet/subsets/{arch}/bs-" + IN_FRACTION + ".npz",
    log:
        "logs/imagenet/subsets/{arch}-bs.log",
    shell:
        "{OVERINTERP} imagenet-subsets --train-shards {input.train} --val-shards {input.val} "
        "--fraction " + IN_FRACTION + " --out {output} 2> {log}"


rule imagenet_random_subsets:
    input:
        index=expand(IN_INDEX + "/{split}.csv", split=["train", "val"]),
        model="results/imagenet/models/{arch}/model.pt",
    output:
        "results/imagenet/subsets/{arch}/random-" + IN_FRACTION + ".npz",
    params:
        sizes=in_per_class("train", "--train-per-class") + " " + in_per_class("val", "--val-per-class"),
        k=IMAGENET["sis"]["pixels_per_step"],
        seeds=IMAGENET["subsets"]["random_seeds"],
    log:
        "logs/imagenet/subsets/{arch}-random.log",
    shell:
        "{OVERINTERP} imagenet-random-subsets --index-dir {IN_INDEX} {params.sizes} --model {input.model} "
        "--pixels-per-step {params.k} --fraction " + IN_FRACTION + " "
        "--train-seed {params.seeds[train]} --val-seed {params.seeds[val]} --out {output} 2> {log}"


rule imagenet_retrain:
    input:
        index=expand(IN_INDEX + "/{split}.csv", split=["train", "val"]),
        keep=lambda w: in_keep_masks(w.arch, w.variant),
    output:
        model="results/imagenet/retrain/{arch}/{variant}-s{seed}/model.pt",
        metrics="results/imagenet/retrain/{arch}/{variant}-s{seed}/metrics.csv",
    params:
        recipe=shlex.quote(json.dumps(IMAGENET["train"], sort_keys=True)),
        sizes=in_per_class("train") + " " + in_per_class("val", "--val-per-class"),
        frame=lambda w: in_frame_args(w.arch),
        positions=lambda w: "--positions-only" if w.variant == "positions" else "",
        workers=IMAGENET["workers"],
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=1,
    log:
        "logs/imagenet/retrain/{arch}/{variant}-s{seed}.log",
    benchmark:
        "results/benchmarks/imagenet/retrain/{arch}/{variant}-s{seed}.tsv"
    shell:
        "{OVERINTERP} imagenet-train --index-dir {IN_INDEX} --root {IN_ROOT} {params.sizes} "
        "--arch {wildcards.arch} {params.frame} --seed {wildcards.seed} --recipe {params.recipe} "
        "--keep-masks {input.keep} {params.positions} --workers {params.workers} "
        "--checkpoint results/checkpoints/imagenet/{wildcards.arch}-{wildcards.variant}-s{wildcards.seed}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


def in_evaluation_inputs(w):
    """Which model and keep-masks an evaluation name stands for (see imagenet_report.SELECTING_ROWS)."""
    inputs = {"index": IN_INDEX + "/val.csv"}
    if w.name.startswith("full"):
        inputs["model"] = f"results/imagenet/models/{w.arch}/model.pt"
        if w.name != "full":
            inputs["keep"] = in_keep_masks(w.arch, w.name.removeprefix("full-on-"))
    else:
        variant = w.name.rsplit("-s", 1)[0]
        inputs["model"] = f"results/imagenet/retrain/{w.arch}/{w.name}/model.pt"
        inputs["keep"] = in_keep_masks(w.arch, variant)
    return inputs


rule imagenet_evaluate:
    input:
        unpack(in_evaluation_inputs),
    output:
        predictions="results/imagenet/eval/{arch}/{name}.csv",
        summary="results/imagenet/eval/{arch}/{name}.json",
    wildcard_constraints:
        name=r"full|full-on-bs|full-on-random|(bs|random|positions)-s\d+",
    params:
        data=in_data_args("val"),
        keep=lambda w, input: f"--keep-masks {input.keep}" if "keep" in input.keys() else "",
        positions=lambda w: "--positions-only" if w.name.startswith("positions") else "",
        workers=IMAGENET["workers"],
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=1,
    log:
        "logs/imagenet/evaluate/{arch}/{name}.log",
    shell:
        "{OVERINTERP} imagenet-evaluate {params.data} --model {input.model} {params.keep} {params.positions} "
        "--workers {params.workers} --predictions {output.predictions} --summary {output.summary} 2> {log}"


rule imagenet_sis_sizes:
    input:
        lambda w: in_shards(w.arch, "val"),
    output:
        sizes="results/imagenet/sis-sizes/{arch}.csv",
        summary="results/imagenet/sis-sizes/{arch}.json",
    params:
        tau=IMAGENET["sis"]["threshold"],
    log:
        "logs/imagenet/sis-sizes/{arch}.log",
    shell:
        "{OVERINTERP} imagenet-sis-sizes --shards {input} --tau {params.tau} --out {output.sizes} "
        "--summary {output.summary} 2> {log}"


rule imagenet_report:
    input:
        index=IN_INDEX + "/val.csv",
        evaluations=expand(
            "results/imagenet/eval/{arch}/{name}.csv",
            arch=IN_ARCHS,
            name=["full", "full-on-bs", "full-on-random"]
            + [f"{v}-s{s}" for v in IN_VARIANTS for s in IN_SEEDS],
        ),
        shards=[path for arch in IN_ARCHS for path in in_shards(arch, "val")],
    output:
        table="results/tables/imagenet.csv",
        markdown="results/tables/imagenet.md",
        accuracy=in_report_figure("accuracy", "Accuracy on pixel subsets"),
        confidence=in_report_figure("confidence", "Confidence along backward selection"),
        examples=[in_report_figure(f"examples-{arch}", "SIS examples", {"model": arch}) for arch in IN_ARCHS],
        pdfs=[
            f"results/figures/imagenet-{name}.pdf"
            for name in ["accuracy", "confidence"] + [f"examples-{arch}" for arch in IN_ARCHS]
        ],
    params:
        val=in_per_class("val", "--val-per-class"),
        seeds=" ".join(map(str, IN_SEEDS)),
        positions="" if IMAGENET["retrain"]["positions_only"] else "--no-positions-only",
        tau=IMAGENET["sis"]["threshold"],
        examples=IMAGENET["figures"]["examples"],
    log:
        "logs/imagenet/report.log",
    shell:
        "{OVERINTERP} imagenet-report --eval-dir results/imagenet/eval --val-shards {input.shards} "
        "--index-dir {IN_INDEX} --root {IN_ROOT} {params.val} --archs {IN_ARCHS} --seeds {params.seeds} "
        "--fraction " + IN_FRACTION + " --tau {params.tau} {params.positions} --examples {params.examples} "
        "--table {output.table} --figures results/figures 2> {log}"


rule imagenet_table_html:
    input:
        "results/tables/imagenet.csv",
    output:
        report(
            "results/tables/imagenet.html",
            caption="../report/table_imagenet.rst",
            category=REPORT_CATEGORY["imagenet"],
            subcategory="Tables",
            labels={"table": "ImageNet: top-1 / top-5 on pixel subsets"},
        ),
    log:
        "logs/tables/imagenet_html.log",
    shell:
        "{OVERINTERP} figures table-html --table {input} --title 'ImageNet: accuracy on pixel subsets' "
        "--out {output} 2> {log}"
