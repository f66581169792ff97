# Mitigation experiments: ensembles and input-dropout models measured like the single models (SIS sizes,
# confidence on their own backward-selection subsets, retrained accuracy where configured).


rule ensemble:
    input:
        lambda w: [
            f"results/models/{member}/model.pt" for member in ensemble_members(w.name)
        ],
    output:
        "results/models/ensemble-{name}/model.pt",
    log:
        "logs/ensemble/{name}.log",
    conda:
        "../../envs/overinterp.yaml"
    shell:
        "python -m overinterp ensemble --out {output} {input} 2> {log}"


rule mitigation_table:
    input:
        summaries=lambda w: [
            path
            for model in compared_models()
            for path in (
                f"results/eval/{model}/full.json",
                f"results/eval/{model}/{SIS_METHOD}-bs-{FRACTIONS[0]}.json",
                *(
                    f"results/retrain/{model}/{SIS_METHOD}-bs-{FRACTIONS[0]}-s{seed}/test.json"
                    for seed in (RETRAIN_SEEDS if model in sis_models() else [])
                ),
            )
        ],
        sizes=expand("results/tables/sis_sizes/{model}.csv", model=compared_models()),
    output:
        multiext("results/tables/mitigation", ".csv", ".md"),
    log:
        "logs/tables/mitigation.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        tau=config["sis"]["tau"],
    shell:
        "python -m overinterp tables mitigation --tau {params.tau} --out results/tables/mitigation "
        "--sis-sizes {input.sizes} --summaries {input.summaries} 2> {log}"


rule figure_mitigation:
    input:
        per_image=expand(
            "results/tables/sis_sizes/{model}.csv", model=compared_models()
        ),
        table="results/tables/mitigation.csv",
    output:
        png=report(
            "results/figures/mitigation.png",
            caption="../report/mitigation.rst",
            category=REPORT_CATEGORY["mitigation"],
            subcategory="Ensembles and input dropout",
        ),
        pdf="results/figures/mitigation.pdf",
    log:
        "logs/figures/mitigation.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        entries=lambda w, input: entry_args(zip(compared_models(), input.per_image)),
        tau=config["sis"]["tau"],
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures mitigation {params.entries} --table {input.table} --tau {params.tau} "
        "--out {params.prefix} 2> {log}"
