# Tables: Table 1 with its controls, the kept-fraction sweep, SIS sizes of correct vs incorrect images; the
# report's front page from them.


rule comparison_tables:
    input:
        comparison_summaries(),
    output:
        multiext("results/tables/table1", ".csv", ".md", ".tex"),
        multiext("results/tables/fraction_sweep", ".csv", ".md"),
    log:
        "logs/tables/comparison.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        fraction=FRACTIONS[0],
    shell:
        "python -m overinterp tables comparison --fraction {params.fraction} --table1 results/tables/table1 "
        "--sweep results/tables/fraction_sweep {input} 2> {log}"


rule sis_size_tables:
    input:
        sis=expand(
            "results/sis/{model}/{method}/test.npz",
            model=compared_models(),
            method=SIS_METHOD,
        ),
        predictions=expand("results/eval/{model}/full.csv", model=compared_models()),
    output:
        per_image=expand(
            "results/tables/sis_sizes/{model}.csv", model=compared_models()
        ),
        summary=multiext("results/tables/sis_sizes", ".csv", ".md"),
    log:
        "logs/tables/sis_sizes.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        tau=config["sis"]["tau"],
        entries=lambda w, input: " ".join(
            f"--entry {m} {s} {p}"
            for m, s, p in zip(compared_models(), input.sis, input.predictions)
        ),
    shell:
        "python -m overinterp tables sis-sizes --tau {params.tau} {params.entries} "
        "--per-image-dir results/tables/sis_sizes --summary results/tables/sis_sizes 2> {log}"


# Misclassified vs correct images at several thresholds (the paper: misclassified images have smaller SIS), on
# the test images and on the CIFAR-10-C sample.
rule misclassified_sis:
    input:
        [path for entry in misclassified_entries() for path in entry[1:]],
    output:
        multiext("results/tables/misclassified_sis", ".csv", ".md", "-images.csv"),
    log:
        "logs/tables/misclassified_sis.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        taus=" ".join(map(str, config["sis"]["misclassified_taus"])),
        entries=" ".join(
            f"--entry {shlex.quote(name)} {sis} {predictions}"
            for name, sis, predictions in misclassified_entries()
        ),
    shell:
        "python -m overinterp tables misclassified --taus {params.taus} {params.entries} "
        "--out results/tables/misclassified_sis 2> {log}"


rule headline:
    input:
        table1="results/tables/table1.csv",
        sis_sizes="results/tables/sis_sizes.csv",
    output:
        HEADLINE,
    log:
        "logs/tables/headline.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        settings=headline_settings(),
    shell:
        "python -m overinterp tables headline --table1 {input.table1} --sis-sizes {input.sis_sizes} "
        "--settings {params.settings} --out {output} 2> {log}"
