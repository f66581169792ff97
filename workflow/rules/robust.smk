# Adversarial robustness (config `adversarial`): clean and PGD accuracy of the adversarially trained models
# and of the standard models they are compared with. Training them is rule `train` (model "<arch>-adv-s<seed>").


rule robustness:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
    output:
        "results/eval/{model}/robust.json",
    log:
        "logs/evaluate/{model}-robust.log",
    benchmark:
        "results/benchmarks/robustness/{model}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        attack=(
            f"--epsilon {ADVERSARIAL['epsilon']} --step-size {ADVERSARIAL['step_size']} "
            f"--steps {ADVERSARIAL['eval_steps']}"
        ),
        tags=lambda w: f"--tag model={w.model} --tag kind={model_kind(w.model)}",
    shell:
        "python -m overinterp --threads {threads} robustness --data {input.data} --model {input.model} {params.size} "
        "{params.norm} {params.attack} {params.tags} --out {output} 2> {log}"


rule robustness_table:
    input:
        expand("results/eval/{model}/robust.json", model=robustness_models()),
    output:
        multiext("results/tables/robustness", ".csv", ".md"),
    log:
        "logs/tables/robustness.log",
    conda:
        "../../envs/overinterp.yaml"
    shell:
        "python -m overinterp tables robustness --out results/tables/robustness {input} 2> {log}"
