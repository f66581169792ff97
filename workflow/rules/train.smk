# Models trained on full images with the paper's recipe, and their test-set predictions.


rule train:
    input:
        DATASET,
    output:
        model="results/models/{model}/model.pt",
        metrics="results/models/{model}/metrics.csv",
    log:
        "logs/train/{model}.log",
    benchmark:
        "results/benchmarks/train/{model}.tsv"
    wildcard_constraints:
        model=SINGLE_MODEL_PATTERN,
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        arch=lambda w: arch_of(w.model),
        seed=lambda w: seed_of(w.model),
        recipe=lambda w: recipe_json(w.model),
        sizes=size_args(),
        norm=normalization_args(),
    shell:
        "python -m overinterp --threads {threads} train --data {input} --arch {params.arch} --seed {params.seed} "
        "--recipe {params.recipe} {params.sizes} {params.norm} "
        "--checkpoint results/checkpoints/{wildcards.model}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


# A pretrained selecting model (models.pretrained) as a model file for the dataset: its classes, frame and the
# normalisation the stages feed it, checked by a forward pass. It runs in the controlling process on a
# cluster: torchvision's weights may need fetching, and compute nodes often have no internet access.
localrules:
    pretrained,


rule pretrained:
    input:
        data=DATASET,
        weights=pretrained_weights_file,
    output:
        "results/models/pretrained-{name}/model.pt",
    log:
        "logs/models/pretrained-{name}.log",
    wildcard_constraints:
        name="|".join(map(re.escape, PRETRAINED)) or "(?!)",
    conda:
        "../../envs/overinterp.yaml"
    params:
        model=lambda w: shlex.quote(PRETRAINED[w.name]["model"]),
        weights=lambda w: shlex.quote(str(PRETRAINED[w.name]["weights"])),
        norm=normalization_args(),
    shell:
        "python -m overinterp model --model {params.model} --weights {params.weights} --data {input.data} {params.norm} "
        "--out {output} 2> {log}"


# Full images: the test split ("full"), or the CIFAR-10-C sample ("cifar10c", corruptions.smk).
rule evaluate:
    input:
        data=lambda w: CIFAR10C_SAMPLE if w.images == "cifar10c" else DATASET,
        model="results/models/{model}/model.pt",
    output:
        predictions="results/eval/{model}/{images}.csv",
        summary="results/eval/{model}/{images}.json",
    log:
        "logs/evaluate/{model}-{images}.log",
    wildcard_constraints:
        images="full|cifar10c",
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=lambda w: "" if w.images == "cifar10c" else split_size_arg("test"),
        norm=normalization_args(),
        tags=lambda w: evaluation_tags(w.model),
    shell:
        "python -m overinterp evaluate --data {input.data} --model {input.model} {params.size} {params.norm} {params.tags} "
        "--predictions {output.predictions} --summary {output.summary} 2> {log}"
