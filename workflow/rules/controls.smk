# Controls of what backward-selection subsets mean (config `controls`), run on each SIS model: smoothed
# SIS, targeted SIS, the masking fill (backward selection and retraining under fills that hide the mask) and
# the shape-vs-pixels swap. Each ends in a table and a figure (`controls_report`).


rule control_smoothed:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
        sis=f"results/sis/{{model}}/{SIS_METHOD}/test.npz",
    output:
        "results/controls/smoothed/{model}.csv",
    log:
        "logs/controls/smoothed/{model}.log",
    benchmark:
        "results/benchmarks/controls/smoothed/{model}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        tau=config["sis"]["tau"],
        fraction=FRACTIONS[0],
        seed=CONTROLS["seed"],
    shell:
        "python -m overinterp controls smoothed --data {input.data} {params.size} {params.norm} --model {input.model} "
        "--sis {input.sis} --tau {params.tau} --fraction {params.fraction} --seed {params.seed} --out {output} 2> {log}"


rule control_targeted:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
    output:
        "results/controls/targeted/{model}.csv",
    log:
        "logs/controls/targeted/{model}.log",
    benchmark:
        "results/benchmarks/controls/targeted/{model}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        sample=CONTROLS["targeted"]["images"],
        seed=CONTROLS["seed"],
        pixels_per_step=config["sis"]["pixels_per_step"],
        tau=config["sis"]["tau"],
        fraction=FRACTIONS[0],
    shell:
        "python -m overinterp --threads {threads} controls targeted --data {input.data} {params.size} {params.norm} "
        "--model {input.model} --sample {params.sample} --seed {params.seed} --pixels-per-step {params.pixels_per_step} "
        "--tau {params.tau} --fraction {params.fraction} --out {output} 2> {log}"


# The masking control: fresh models trained and tested on the subsets with masked pixels filled by `fill`
# (backward selection under the same fill: sis.smk and subsets.smk, method "gradient-<fill>").
rule control_masking_retrain:
    input:
        data=DATASET,
        masks=lambda w: masking_masks(w.model, w.fill, w.kind),
    output:
        model="results/controls/masking/{model}/{fill}/{kind}-s{seed}/model.pt",
        metrics="results/controls/masking/{model}/{fill}/{kind}-s{seed}/metrics.csv",
    log:
        "logs/controls/masking/{model}/{fill}/{kind}-s{seed}.log",
    benchmark:
        "results/benchmarks/controls/masking/{model}/{fill}/{kind}-s{seed}.tsv"
    wildcard_constraints:
        fill="mean|noise|impute",
        kind="bs|random|positions",
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        arch=lambda w: arch_of(w.model),
        recipe=recipe_json(),
        sizes=" ".join(
            control_size_arg(split, f"--{split}-size") for split in ("train", "test")
        ),
        norm=normalization_args(),
        fill=lambda w: fill_args(w.fill),
        positions=lambda w: "--positions-only" if w.kind == "positions" else "",
    shell:
        "python -m overinterp --threads {threads} train --data {input.data} --arch {params.arch} --seed {wildcards.seed} "
        "--recipe {params.recipe} {params.sizes} {params.norm} {params.fill} --keep-masks {input.masks} {params.positions} "
        "--checkpoint results/checkpoints/controls/masking/{wildcards.model}/{wildcards.fill}/{wildcards.kind}-s{wildcards.seed}.pt "
        "--out {output.model} --metrics {output.metrics} 2> {log}"


rule control_masking_evaluate:
    input:
        data=DATASET,
        model="results/controls/masking/{model}/{fill}/{kind}-s{seed}/model.pt",
        masks=lambda w: masking_masks(w.model, w.fill, w.kind),
    output:
        predictions="results/controls/masking/{model}/{fill}/{kind}-s{seed}/test.csv",
        summary="results/controls/masking/{model}/{fill}/{kind}-s{seed}/test.json",
    log:
        "logs/controls/masking/{model}/{fill}/{kind}-s{seed}-evaluate.log",
    wildcard_constraints:
        fill="mean|noise|impute",
        kind="bs|random|positions",
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=control_size_arg("test", "--size"),
        norm=normalization_args(),
        fill=lambda w: fill_args(w.fill),
        positions=lambda w: "--positions-only" if w.kind == "positions" else "",
        tags=lambda w: (
            f"--tag model={w.model} --tag fill={w.fill} --tag subset={w.kind} --tag seed={w.seed} "
            f"--tag train_images={control_size('train') or 'all'}"
        ),
    shell:
        "python -m overinterp evaluate --data {input.data} --model {input.model} --keep-masks {input.masks} "
        "{params.positions} {params.size} {params.norm} {params.fill} {params.tags} "
        "--predictions {output.predictions} --summary {output.summary} 2> {log}"


rule control_swap:
    input:
        data=DATASET,
        files=lambda w: [
            path
            for _, model, masks in swap_entries(w.model)
            for path in (model, masks)
        ],
    output:
        "results/controls/swap/{model}.csv",
    log:
        "logs/controls/swap/{model}.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        entries=swap_args,
        seed=CONTROLS["seed"],
    shell:
        "python -m overinterp controls swap --data {input.data} {params.size} {params.norm} {params.entries} "
        "--seed {params.seed} --out {output} 2> {log}"


# One rule per control's table and figure (caption workflow/report/controls_<name>.rst).
for _control, _title in CONTROL_TITLES.items():

    rule:
        name:
            f"controls_report_{_control}"
        input:
            control_report_inputs(_control),
        output:
            csv=f"results/tables/controls_{_control}.csv",
            md=f"results/tables/controls_{_control}.md",
            png=report(
                f"results/figures/controls_{_control}.png",
                caption=f"../report/controls_{_control}.rst",
                category=REPORT_CATEGORY["controls"],
                subcategory=_title,
            ),
            pdf=f"results/figures/controls_{_control}.pdf",
        log:
            f"logs/controls/{_control}-report.log",
        conda:
            "../../envs/overinterp.yaml"
        params:
            control=_control,
            args=control_report_args(_control, control_report_inputs(_control)),
        shell:
            "python -m overinterp controls report {params.control} {params.args} "
            "--table results/tables/controls_{params.control} --figure results/figures/controls_{params.control} "
            "2> {log}"
