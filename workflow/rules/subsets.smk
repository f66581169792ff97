# Pixel-subset keep-masks: the pixels backward selection removed last, and random pixels of the same count.


rule backselect_subsets:
    input:
        # the training split's shards, one at a time (ImageNet's 1.28M results do not fit in memory together)
        train=lambda w: sis_shards(w.model, w.method, "train"),
        test="results/sis/{model}/{method}/test.npz",
    output:
        "results/subsets/{model}/{method}/bs-{fraction}.npz",
    log:
        "logs/subsets/{model}/{method}-bs-{fraction}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        by=subsets_by_args(),
    shell:
        "python -m overinterp subsets backselect --sis-train {input.train} --sis-test {input.test} "
        "--fraction {wildcards.fraction} {params.by} --out {output} 2> {log}"


# Keep-masks of the test images (or of the CIFAR-10-C sample) alone, to evaluate a model on its own subsets.
rule backselect_test_subsets:
    input:
        test="results/sis/{model}/{method}/{split}.npz",
    output:
        "results/subsets/{model}/{method}/bs-{fraction}-{split}.npz",
    log:
        "logs/subsets/{model}/{method}-bs-{fraction}-{split}.log",
    wildcard_constraints:
        split="test|cifar10c",
    conda:
        "../../envs/overinterp.yaml"
    params:
        by=subsets_by_args(),
    shell:
        "python -m overinterp subsets backselect --sis-test {input.test} --fraction {wildcards.fraction} {params.by} "
        "--out {output} 2> {log}"


rule random_subsets:
    input:
        DATASET,
    output:
        "results/subsets/random-{fraction}.npz",
    log:
        "logs/subsets/random-{fraction}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        sizes=size_args(),
        seeds="--seed-train {train} --seed-test {test}".format(
            **config["subsets"]["random_seeds"]
        ),
        by=subsets_by_args(random=True),
    shell:
        "python -m overinterp subsets random --data {input} {params.sizes} {params.seeds} "
        "--fraction {wildcards.fraction} {params.by} --out {output} 2> {log}"


# The full-image model on pixel subsets of the test images: is it confident on 5% of the pixels?
rule evaluate_on_subsets:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
        masks=lambda w: keep_masks(w.model, w.subset, "test"),
    output:
        predictions="results/eval/{model}/{subset}.csv",
        summary="results/eval/{model}/{subset}.json",
    log:
        "logs/evaluate/{model}-{subset}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        tags=lambda w: evaluation_tags(w.model, "original", w.subset),
    shell:
        "python -m overinterp evaluate --data {input.data} --model {input.model} --keep-masks {input.masks} "
        "{params.size} {params.norm} {params.tags} "
        "--predictions {output.predictions} --summary {output.summary} 2> {log}"
