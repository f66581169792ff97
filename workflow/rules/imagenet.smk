# The ImageNet half of the paper (included when `imagenet.enabled`; see config/imagenet.yaml):
# validate the user's copy -> selecting models (pretrained or trained) -> Batched Gradient SIS on train and
# val, sharded -> 10% backward-selection and random subsets -> fresh models trained and tested on them
# (plus the positions-only control) -> the ImageNet table and figures.
wildcard_constraints:
    arch=in_alternatives(IN_ARCHS),
    in_split="train|val",
    shard=r"\d{4}",
    variant="bs|random|positions",
    seed=r"\d+",


rule imagenet_index:
    output:
        expand("data/imagenet/index/{split}.csv", split=["train", "val"]),
    log:
        "logs/imagenet/index.log",
    conda:
        "../../envs/overinterp.yaml"
    threads: max(1, IMAGENET["workers"])
    params:
        root=IN_ROOT,
        index=lambda w, output: Path(output[0]).parent,
        classes=IMAGENET["num_classes"],
        workers=IMAGENET["workers"],
    shell:
        "python -m overinterp imagenet-index --root {params.root} --num-classes {params.classes} "
        "--workers {params.workers} --out-dir {params.index} 2> {log}"


rule imagenet_pretrained:
    output:
        "results/imagenet/models/{arch}/model.pt",
    log:
        "logs/imagenet/model/{arch}.log",
    wildcard_constraints:
        arch=in_alternatives(IN_PRETRAINED),
    conda:
        "../../envs/overinterp.yaml"
    params:
        weights=lambda w: shlex.quote(str(IMAGENET["models"][w.arch]["weights"])),
        frame=lambda w: in_frame_args(w.arch),
    shell:
        "python -m overinterp imagenet-model --arch {wildcards.arch} --weights {params.weights} {params.frame} "
        "--out {output} 2> {log}"


rule imagenet_train:
    input:
        expand("data/imagenet/index/{split}.csv", split=["train", "val"]),
    output:
        model="results/imagenet/models/{arch}/model.pt",
        metrics="results/imagenet/models/{arch}/metrics.csv",
    log:
        "logs/imagenet/train/{arch}.log",
    benchmark:
        "results/benchmarks/imagenet/train/{arch}.tsv"
    wildcard_constraints:
        arch=in_alternatives(IN_TRAINED),
    conda:
        "../../envs/overinterp.yaml"
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=GPU_JOB,
    params:
        recipe=shlex.quote(json.dumps(IMAGENET["train"], sort_keys=True)),
        root=IN_ROOT,
        sizes=f"{in_per_class('train')} {in_per_class('val', '--val-per-class')}",
        frame=lambda w: in_frame_args(w.arch),
        workers=IMAGENET["workers"],
    shell:
        "python -m overinterp imagenet-train --index-dir data/imagenet/index --root {params.root} {params.sizes} "
        "--arch {wildcards.arch} {params.frame} --recipe {params.recipe} --workers {params.workers} "
        "--checkpoint results/checkpoints/imagenet/{wildcards.arch}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


rule imagenet_sis:
    input:
        index="data/imagenet/index/{in_split}.csv",
        model="results/imagenet/models/{arch}/model.pt",
    output:
        "results/imagenet/sis/{arch}/{in_split}/{shard}.npz",
    log:
        "logs/imagenet/sis/{arch}/{in_split}/{shard}.log",
    benchmark:
        "results/benchmarks/imagenet/sis/{arch}/{in_split}/{shard}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=GPU_JOB,
    params:
        data=lambda w: in_data_args(w.in_split),
        shards=lambda w: IMAGENET["sis"]["shards"][w.in_split],
        k=IMAGENET["sis"]["pixels_per_step"],
        batch=IMAGENET["sis"]["batch_size"],
        bf16="--bf16" if IMAGENET["sis"]["bf16"] else "",
        workers=IMAGENET["workers"],
    shell:
        "python -m overinterp imagenet-sis {params.data} --model {input.model} --shard {wildcards.shard} "
        "--shards {params.shards} --pixels-per-step {params.k} --batch-size {params.batch} {params.bf16} "
        "--workers {params.workers} --out {output} 2> {log}"


rule imagenet_bs_subsets:
    input:
        train=lambda w: in_shards(w.arch, "train"),
        val=lambda w: in_shards(w.arch, "val"),
    output:
        f"results/imagenet/subsets/{{arch}}/bs-{IN_FRACTION}.npz",
    log:
        "logs/imagenet/subsets/{arch}-bs.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        fraction=IN_FRACTION,
    shell:
        "python -m overinterp subsets backselect --by steps --sis-train {input.train} --sis-test {input.val} "
        "--fraction {params.fraction} --out {output} 2> {log}"


rule imagenet_random_subsets:
    input:
        index=expand("data/imagenet/index/{split}.csv", split=["train", "val"]),
        model="results/imagenet/models/{arch}/model.pt",
    output:
        f"results/imagenet/subsets/{{arch}}/random-{IN_FRACTION}.npz",
    log:
        "logs/imagenet/subsets/{arch}-random.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        sizes=f"{in_per_class('train', '--train-per-class')} {in_per_class('val', '--val-per-class')}",
        k=IMAGENET["sis"]["pixels_per_step"],
        seeds=IMAGENET["subsets"]["random_seeds"],
        fraction=IN_FRACTION,
    shell:
        "python -m overinterp imagenet-random-subsets --index-dir data/imagenet/index {params.sizes} --model {input.model} "
        "--pixels-per-step {params.k} --fraction {params.fraction} "
        "--train-seed {params.seeds[train]} --val-seed {params.seeds[val]} --out {output} 2> {log}"


rule imagenet_retrain:
    input:
        index=expand("data/imagenet/index/{split}.csv", split=["train", "val"]),
        keep=lambda w: in_keep_masks(w.arch, w.variant),
    output:
        model="results/imagenet/retrain/{arch}/{variant}-s{seed}/model.pt",
        metrics="results/imagenet/retrain/{arch}/{variant}-s{seed}/metrics.csv",
    log:
        "logs/imagenet/retrain/{arch}/{variant}-s{seed}.log",
    benchmark:
        "results/benchmarks/imagenet/retrain/{arch}/{variant}-s{seed}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=GPU_JOB,
    params:
        recipe=shlex.quote(json.dumps(IMAGENET["train"], sort_keys=True)),
        root=IN_ROOT,
        sizes=f"{in_per_class('train')} {in_per_class('val', '--val-per-class')}",
        frame=lambda w: in_frame_args(w.arch),
        positions=lambda w: "--positions-only" if w.variant == "positions" else "",
        workers=IMAGENET["workers"],
    shell:
        "python -m overinterp imagenet-train --index-dir data/imagenet/index --root {params.root} {params.sizes} "
        "--arch {wildcards.arch} {params.frame} --seed {wildcards.seed} --recipe {params.recipe} "
        "--keep-masks {input.keep} {params.positions} --workers {params.workers} "
        "--checkpoint results/checkpoints/imagenet/{wildcards.arch}-{wildcards.variant}-s{wildcards.seed}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


rule imagenet_evaluate:
    input:
        unpack(in_evaluation_inputs),
    output:
        predictions="results/imagenet/eval/{arch}/{name}.csv",
        summary="results/imagenet/eval/{arch}/{name}.json",
    log:
        "logs/imagenet/evaluate/{arch}/{name}.log",
    wildcard_constraints:
        name=r"full|full-on-bs|full-on-random|(bs|random|positions)-s\d+",
    conda:
        "../../envs/overinterp.yaml"
    threads: max(1, IMAGENET["workers"])
    resources:
        gpu=GPU_JOB,
    params:
        data=in_data_args("val"),
        keep=lambda w, input: (
            f"--keep-masks {input.keep}" if "keep" in input.keys() else ""
        ),
        positions=lambda w: "--positions-only" if w.name.startswith("positions") else "",
        workers=IMAGENET["workers"],
    shell:
        "python -m overinterp imagenet-evaluate {params.data} --model {input.model} {params.keep} {params.positions} "
        "--workers {params.workers} --predictions {output.predictions} --summary {output.summary} 2> {log}"


rule imagenet_sis_sizes:
    input:
        shards=lambda w: in_shards(w.arch, "val"),
        predictions="results/imagenet/eval/{arch}/full.csv",
    output:
        per_image="results/imagenet/sis-sizes/{arch}.csv",
        summary=multiext("results/imagenet/sis-sizes/{arch}-summary", ".csv", ".md"),
    log:
        "logs/imagenet/sis-sizes/{arch}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        tau=IMAGENET["sis"]["threshold"],
        folder=lambda w, output: Path(output.per_image).parent,
        summary=lambda w, output: output.summary[0].removesuffix(".csv"),
    shell:
        "python -m overinterp tables sis-sizes --tau {params.tau} --entry {wildcards.arch} {input.shards} {input.predictions} "
        "--per-image-dir {params.folder} --summary {params.summary} 2> {log}"


rule imagenet_report:
    input:
        index="data/imagenet/index/val.csv",
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
        examples=[
            in_report_figure(f"examples-{arch}", "SIS examples", {"model": arch})
            for arch in IN_ARCHS
        ],
        pdfs=[
            f"results/figures/imagenet-{name}.pdf"
            for name in ["accuracy", "confidence"]
            + [f"examples-{arch}" for arch in IN_ARCHS]
        ],
    log:
        "logs/imagenet/report.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        val=in_per_class("val", "--val-per-class"),
        root=IN_ROOT,
        archs=" ".join(IN_ARCHS),
        fraction=IN_FRACTION,
        seeds=" ".join(map(str, IN_SEEDS)),
        positions="" if IMAGENET["retrain"]["positions_only"] else "--no-positions-only",
        tau=IMAGENET["sis"]["threshold"],
        examples=IMAGENET["figures"]["examples"],
    shell:
        "python -m overinterp imagenet-report --eval-dir results/imagenet/eval --val-shards {input.shards} "
        "--index-dir data/imagenet/index --root {params.root} {params.val} --archs {params.archs} --seeds {params.seeds} "
        "--fraction {params.fraction} --tau {params.tau} {params.positions} --examples {params.examples} "
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
    conda:
        "../../envs/overinterp.yaml"
    shell:
        "python -m overinterp figures table-html --table {input} --title 'ImageNet: accuracy on pixel subsets' "
        "--out {output} 2> {log}"
