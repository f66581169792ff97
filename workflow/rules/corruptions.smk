# CIFAR-10-C (config `cifar10c`): the release downloaded and verified like CIFAR-10, every model evaluated on
# every corruption and severity (a table and a figure), and a pooled sample that backward selection runs on
# (split "cifar10c" of sis.smk; its misclassified-vs-correct comparison is in analysis.smk).


localrules:
    download_cifar10c,


# As for CIFAR-10 (data.smk): the md5 identifies the archive, its address is not a parameter.
CIFAR10C_URL = shlex.quote(config["cifar10c"]["url"])


rule download_cifar10c:
    output:
        "data/cifar10c/CIFAR-10-C.tar",
    log:
        "logs/data/download_cifar10c.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        md5=config["cifar10c"]["md5"],
    shell:
        "python -m overinterp download --url {CIFAR10C_URL} --md5 {params.md5} --config-key cifar10c "
        "--out {output} 2> {log}"


# The evaluation grid (the test split's images under every corruption and severity) and the SIS sample.
rule cifar10c_dataset:
    input:
        archive="data/cifar10c/CIFAR-10-C.tar",
        data=DATASET,
    output:
        grid=CIFAR10C_GRID,
        sample=CIFAR10C_SAMPLE,
    log:
        "logs/data/cifar10c.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        options=cifar10c_convert_args(),
    shell:
        "python -m overinterp corruptions convert --archive {input.archive} --data {input.data} {params.options} "
        "--grid {output.grid} --sample {output.sample} 2> {log}"


rule corruptions_full_image:
    input:
        grid=CIFAR10C_GRID,
        data=DATASET,
        model="results/models/{model}/model.pt",
    output:
        "results/corruptions/{model}/full.csv",
    log:
        "logs/corruptions/{model}/full.log",
    benchmark:
        "results/benchmarks/corruptions/{model}/full.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        norm=normalization_args(),
        tags=lambda w: evaluation_tags(w.model),
    shell:
        "python -m overinterp --threads {threads} corruptions evaluate --grid {input.grid} --data {input.data} "
        "--model {input.model} {params.norm} {params.tags} --out {output} 2> {log}"


# A model retrained on subsets sees the same subset of each corrupted image: the positions chosen on the clean
# image, with the corrupted image's values there.
rule corruptions_retrained:
    input:
        grid=CIFAR10C_GRID,
        data=DATASET,
        model="results/retrain/{model}/{subset}-s{seed}/model.pt",
        masks=lambda w: keep_masks(w.model, w.subset),
    output:
        "results/corruptions/{model}/{subset}-s{seed}.csv",
    log:
        "logs/corruptions/{model}/{subset}-s{seed}.log",
    benchmark:
        "results/benchmarks/corruptions/{model}/{subset}-s{seed}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        norm=normalization_args(),
        positions=lambda w: (
            "--positions-only"
            if parse_subset(w.subset)["subset"] == "positions"
            else ""
        ),
        tags=lambda w: evaluation_tags(w.model, "trained", w.subset, seed=w.seed),
    shell:
        "python -m overinterp --threads {threads} corruptions evaluate --grid {input.grid} --data {input.data} "
        "--model {input.model} --keep-masks {input.masks} {params.positions} {params.norm} {params.tags} "
        "--out {output} 2> {log}"


# The CIFAR-10-C sample on subsets backward selection chose on each corrupted image (not carried over from the
# clean image, whose positions alone betray the class): the selecting model, and the models retrained on its
# subsets. The clean row is the test split on its own subsets.
rule corruptions_chosen_on_corrupted:
    input:
        sample=CIFAR10C_SAMPLE,
        data=DATASET,
        model=lambda w: chosen_on_corrupted_model(w.model, w.run),
        masks=lambda w: keep_masks(w.model, parse_run(w.run)[0], "cifar10c"),
        clean_masks=lambda w: keep_masks(w.model, parse_run(w.run)[0], "test"),
    output:
        "results/corruptions/{model}/chosen-on-corrupted/{run}.csv",
    log:
        "logs/corruptions/{model}/chosen-on-corrupted/{run}.log",
    wildcard_constraints:
        run=rf"({SUBSET_PATTERN})(-s\d+)?",
    conda:
        "../../envs/overinterp.yaml"
    params:
        norm=normalization_args(),
        positions=lambda w: (
            "--positions-only"
            if parse_subset(parse_run(w.run)[0])["subset"] == "positions"
            else ""
        ),
        tags=lambda w: chosen_on_corrupted_tags(w.model, w.run),
    shell:
        "python -m overinterp corruptions evaluate --sample {input.sample} --data {input.data} "
        "--model {input.model} --sample-keep-masks {input.masks} --keep-masks {input.clean_masks} "
        "{params.positions} {params.norm} {params.tags} --out {output} 2> {log}"


rule corruptions_table:
    input:
        corruption_runs(),
    output:
        multiext("results/tables/corruptions", ".csv", ".md", "-cells.csv"),
        png=report(
            "results/figures/corruptions.png",
            caption="../report/corruptions.rst",
            category=REPORT_CATEGORY["corruptions"],
        ),
        pdf="results/figures/corruptions.pdf",
    log:
        "logs/tables/corruptions.log",
    conda:
        "../../envs/overinterp.yaml"
    shell:
        "python -m overinterp corruptions table --out results/tables/corruptions --figure results/figures/corruptions "
        "{input} 2> {log}"
