# Figures (PNG for screen and report, PDF for print) and the result tables as HTML pages, each marked
# for the report (`snakemake --report results/report.html`) with a caption in workflow/report/ that
# states what it shows and the configuration behind it. Report categories follow the pipeline's stages.
# To add a figure: a rule whose PNG output is wrapped in report(..., category=REPORT_CATEGORY[stage])
# (common.smk), its caption, and its paths in that stage's outputs (e.g. figure_outputs() in common.smk).


rule figure_training_curves:
    input:
        expand("results/models/{model}/metrics.csv", model=MODELS),
    output:
        png=report(
            "results/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category=REPORT_CATEGORY["training"],
            subcategory="Training curves",
        ),
        pdf="results/figures/training_curves.pdf",
    log:
        "logs/figures/training_curves.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        entries=lambda w, input: entry_args(zip(map(arch_of, MODELS), input)),
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures training-curves {params.entries} --title 'Full-image models' "
        "--out {params.prefix} 2> {log}"


rule figure_retrain_curves:
    input:
        lambda w: [path for _, path in retrain_runs(w.model)],
    output:
        png=report(
            "results/figures/retrain_curves/{model}.png",
            caption="../report/retrain_curves.rst",
            category=REPORT_CATEGORY["retrain"],
            subcategory="Training curves on pixel subsets",
            labels={"model": "{model}"},
        ),
        pdf="results/figures/retrain_curves/{model}.pdf",
    log:
        "logs/figures/retrain_curves/{model}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        entries=lambda w: entry_args(retrain_runs(w.model)),
        prefix=figure_prefix,
        title=lambda w: shlex.quote(
            f"Models trained on {100 * float(FRACTIONS[0]):g}% pixel subsets of {w.model}"
        ),
    shell:
        "python -m overinterp figures training-curves {params.entries} --title {params.title} --out {params.prefix} 2> {log}"


rule figure_sis_examples:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
        sis=f"results/sis/{{model}}/{SIS_METHOD}/test.npz",
    output:
        png=report(
            "results/figures/sis_examples/{model}.png",
            caption="../report/sis_examples.rst",
            category=REPORT_CATEGORY["sis"],
            subcategory="SIS examples",
            labels={"model": "{model}"},
        ),
        pdf="results/figures/sis_examples/{model}.pdf",
    log:
        "logs/figures/sis_examples/{model}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        tau=config["sis"]["tau"],
        per_class=config["figures"]["sis_examples_per_class"],
        classes=(
            f"--classes {config['figures']['sis_examples_classes']}"
            if config["figures"]["sis_examples_classes"]
            else ""
        ),
        norm=normalization_args(),
        prefix=figure_prefix,
        title=lambda w: shlex.quote(
            f"{w.model}: sufficient input subsets ({SIS_METHOD} backward selection)"
        ),
    shell:
        "python -m overinterp figures sis-examples --data {input.data} --model {input.model} --sis {input.sis} "
        "--tau {params.tau} --per-class {params.per_class} {params.classes} {params.norm} --title {params.title} "
        "--out {params.prefix} 2> {log}"


rule figure_confidence_curves:
    input:
        expand(
            "results/sis/{model}/{method}/test.npz",
            model=sis_models(),
            method=SIS_METHOD,
        ),
    output:
        png=report(
            "results/figures/confidence_curves.png",
            caption="../report/confidence_curves.rst",
            category=REPORT_CATEGORY["sis"],
            subcategory="Confidence along backward selection",
        ),
        pdf="results/figures/confidence_curves.pdf",
    log:
        "logs/figures/confidence_curves.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        entries=lambda w, input: entry_args(zip(sis_models(), input)),
        tau=config["sis"]["tau"],
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures confidence-curves {params.entries} --tau {params.tau} --out {params.prefix} 2> {log}"


rule figure_sis_sizes:
    input:
        per_image=expand("results/tables/sis_sizes/{model}.csv", model=sis_models()),
        summary="results/tables/sis_sizes.csv",
    output:
        png=report(
            "results/figures/sis_sizes.png",
            caption="../report/sis_sizes.rst",
            category=REPORT_CATEGORY["sis"],
            subcategory="SIS sizes",
        ),
        pdf="results/figures/sis_sizes.pdf",
    log:
        "logs/figures/sis_sizes.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        entries=lambda w, input: entry_args(zip(sis_models(), input.per_image)),
        tau=config["sis"]["tau"],
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures sis-sizes {params.entries} --summary {input.summary} --tau {params.tau} "
        "--out {params.prefix} 2> {log}"


rule figure_table1:
    input:
        "results/tables/table1.csv",
    output:
        png=report(
            "results/figures/table1.png",
            caption="../report/table1.rst",
            category=REPORT_CATEGORY["retrain"],
            subcategory="Table 1",
        ),
        pdf="results/figures/table1.pdf",
    log:
        "logs/figures/table1.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        fraction=FRACTIONS[0],
        chance=CHANCE,
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures table1 --table {input} --fraction {params.fraction} --chance {params.chance} "
        "--out {params.prefix} 2> {log}"


rule figure_fraction_sweep:
    input:
        sweep="results/tables/fraction_sweep.csv",
        table="results/tables/table1.csv",
    output:
        png=report(
            "results/figures/fraction_sweep.png",
            caption="../report/fraction_sweep.rst",
            category=REPORT_CATEGORY["retrain"],
            subcategory="Kept-fraction sweep",
        ),
        pdf="results/figures/fraction_sweep.pdf",
    log:
        "logs/figures/fraction_sweep.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        chance=CHANCE,
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures fraction-sweep --sweep {input.sweep} --table {input.table} --chance {params.chance} "
        "--out {params.prefix} 2> {log}"


rule figure_misclassified_sis:
    input:
        table="results/tables/misclassified_sis.csv",
        images="results/tables/misclassified_sis-images.csv",
    output:
        png=report(
            "results/figures/misclassified_sis.png",
            caption="../report/misclassified_sis.rst",
            category=REPORT_CATEGORY["sis"],
            subcategory="SIS sizes",
        ),
        pdf="results/figures/misclassified_sis.pdf",
    log:
        "logs/figures/misclassified_sis.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        prefix=figure_prefix,
    shell:
        "python -m overinterp figures misclassified --table {input.table} --images {input.images} "
        "--out {params.prefix} 2> {log}"


# One rule per report table (caption workflow/report/table_<name>.rst).
for _table, (_title, _stage) in REPORT_TABLES.items():

    rule:
        name:
            f"report_table_{_table}"
        input:
            f"results/tables/{_table}.csv",
        output:
            report(
                f"results/tables/{_table}.html",
                caption=f"../report/table_{_table}.rst",
                category=REPORT_CATEGORY[_stage],
                subcategory="Tables",
                labels={"table": _title},
            ),
        log:
            f"logs/tables/{_table}_html.log",
        conda:
            "../../envs/overinterp.yaml"
        params:
            title=shlex.quote(_title),
        shell:
            "python -m overinterp figures table-html --table {input} --title {params.title} --out {output} 2> {log}"
