# Pixel-subset keep-masks: the pixels backward selection removed last, and random pixels of the same count.


rule backselect_subsets:
    input:
        train="results/sis/{model}/{method}/train.npz",
        test="results/sis/{model}/{method}/test.npz",
    output:
        "results/subsets/{model}/{method}/bs-{fraction}.npz",
    log:
        "logs/subsets/{model}/{method}-bs-{fraction}.log",
    shell:
        "{OVERINTERP} subsets backselect --sis-train {input.train} --sis-test {input.test} "
        "--fraction {wildcards.fraction} --out {output} 2> {log}"


rule backselect_test_subsets:
    """Keep-masks of the test images alone, to evaluate a model on its own subsets."""
    input:
        test="results/sis/{model}/{method}/test.npz",
    output:
        "results/subsets/{model}/{method}/bs-{fraction}-test.npz",
    log:
        "logs/subsets/{model}/{method}-bs-{fraction}-test.log",
    shell:
        "{OVERINTERP} subsets backselect --sis-test {input.test} --fraction {wildcards.fraction} --out {output} 2> {log}"


rule random_subsets:
    input:
        DATASET,
    output:
        "results/subsets/random-{fraction}.npz",
    params:
        sizes=size_args(),
        seeds="--seed-train {train} --seed-test {test}".format(**config["subsets"]["random_seeds"]),
    log:
        "logs/subsets/random-{fraction}.log",
    shell:
        "{OVERINTERP} subsets random --data {input} {params.sizes} {params.seeds} "
        "--fraction {wildcards.fraction} --out {output} 2> {log}"


rule evaluate_on_subsets:
    """The full-image model on pixel subsets of the test images: is it confident on 5% of the pixels?"""
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
        masks=lambda w: keep_masks(w.model, w.subset, test_only=True),
    output:
        predictions="results/eval/{model}/{subset}.csv",
        summary="results/eval/{model}/{subset}.json",
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        tags=lambda w: evaluation_tags(w.model, "original", w.subset),
    log:
        "logs/evaluate/{model}-{subset}.log",
    shell:
        "{OVERINTERP} evaluate --data {input.data} --model {input.model} --keep-masks {input.masks} "
        "{params.size} {params.norm} {params.tags} "
        "--predictions {output.predictions} --summary {output.summary} 2> {log}"
