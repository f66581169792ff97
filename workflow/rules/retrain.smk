# Fresh models trained and tested on pixel subsets (backward selection, random, mask positions only).


# Random subsets do not depend on the selecting model: an adversarially trained or input-dropout model's
# random-subset models are the standard model's of the same architecture (the same masks, network, recipe and
# seeds), copied rather than trained again.
ruleorder: share_random_retrain > retrain


localrules:
    share_random_retrain,


rule share_random_retrain:
    input:
        model=lambda w: f"results/retrain/{standard_model(w.model)}/random-{w.fraction}-s{w.seed}/model.pt",
        metrics=lambda w: f"results/retrain/{standard_model(w.model)}/random-{w.fraction}-s{w.seed}/metrics.csv",
    output:
        model="results/retrain/{model}/random-{fraction}-s{seed}/model.pt",
        metrics="results/retrain/{model}/random-{fraction}-s{seed}/metrics.csv",
    log:
        "logs/retrain/{model}/random-{fraction}-s{seed}.log",
    wildcard_constraints:
        model=r"[A-Za-z0-9_]+?-(dropout|adv)-s\d+",
    conda:
        "../../envs/overinterp.yaml"
    shell:
        "(cp {input.model} {output.model} && cp {input.metrics} {output.metrics}) 2> {log}"


rule retrain:
    input:
        data=DATASET,
        masks=lambda w: keep_masks(w.model, w.subset),
    output:
        model="results/retrain/{model}/{subset}-s{seed}/model.pt",
        metrics="results/retrain/{model}/{subset}-s{seed}/metrics.csv",
    log:
        "logs/retrain/{model}/{subset}-s{seed}.log",
    benchmark:
        "results/benchmarks/retrain/{model}/{subset}-s{seed}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        arch=lambda w: arch_of(w.model),
        recipe=recipe_json(),  # a fresh model with the plain recipe, whatever selected the pixels
        sizes=size_args(),
        norm=normalization_args(),
        positions=lambda w: (
            "--positions-only"
            if parse_subset(w.subset)["subset"] == "positions"
            else ""
        ),
    shell:
        "python -m overinterp --threads {threads} train --data {input.data} --arch {params.arch} --seed {wildcards.seed} "
        "--recipe {params.recipe} {params.sizes} {params.norm} --keep-masks {input.masks} {params.positions} "
        "--checkpoint results/checkpoints/retrain/{wildcards.model}/{wildcards.subset}-s{wildcards.seed}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


rule evaluate_retrained:
    input:
        data=DATASET,
        model="results/retrain/{model}/{subset}-s{seed}/model.pt",
        masks=lambda w: keep_masks(w.model, w.subset),
        reference="results/eval/{model}/full.csv",
    output:
        predictions="results/retrain/{model}/{subset}-s{seed}/test.csv",
        summary="results/retrain/{model}/{subset}-s{seed}/test.json",
    log:
        "logs/evaluate/retrain/{model}/{subset}-s{seed}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        positions=lambda w: (
            "--positions-only"
            if parse_subset(w.subset)["subset"] == "positions"
            else ""
        ),
        tags=lambda w: evaluation_tags(w.model, "trained", w.subset, seed=w.seed),
    shell:
        "python -m overinterp evaluate --data {input.data} --model {input.model} --keep-masks {input.masks} "
        "{params.positions} {params.size} {params.norm} {params.tags} "
        "--reference-predictions {input.reference} "
        "--predictions {output.predictions} --summary {output.summary} 2> {log}"
