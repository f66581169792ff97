# Backward selection (BackSelect) of every train and test image for the SIS models, sharded over images,
# and the exact-vs-gradient agreement on a sample of test images.

SIS_SHARDS = config["sis"]["shards"]
COMPARE_SAMPLE = config["sis"]["compare_sample"]


def sis_args():
    sis = config["sis"]
    batch = "" if sis["batch_size"] is None else f"--batch-size {sis['batch_size']}"
    return (f"--pixels-per-step {sis['pixels_per_step']} --precision {sis['precision']} {batch} "
            f"{normalization_args()}")


def sis_outputs():
    """The merged SIS files of both splits, and the agreement table when a comparison sample is set."""
    outputs = expand("results/sis/{model}/{method}/{split}.npz", model=sis_models(), method=SIS_METHOD,
                     split=["train", "test"])
    if COMPARE_SAMPLE:
        outputs += multiext("results/tables/sis_agreement", ".csv", ".md")
    return outputs


rule sis_shard:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
    output:
        "results/sis/{model}/{method}/{split}/shard{shard}.npz",
    wildcard_constraints:
        shard=r"\d+",
    params:
        size=lambda w: split_size_arg(w.split),
        options=sis_args(),
    threads: HEAVY_THREADS
    resources:
        gpu=1,
    log:
        "logs/sis/{model}/{method}/{split}/shard{shard}.log",
    benchmark:
        "results/benchmarks/sis/{model}/{method}/{split}/shard{shard}.tsv"
    shell:
        "{OVERINTERP} --threads {threads} sis --data {input.data} --model {input.model} --split {wildcards.split} {params.size} "
        "--method {wildcards.method} --shard {wildcards.shard} --shards {SIS_SHARDS} {params.options} "
        "--out {output} 2> {log}"


rule sis_merge:
    input:
        expand("results/sis/{{model}}/{{method}}/{{split}}/shard{shard}.npz", shard=range(SIS_SHARDS)),
    output:
        "results/sis/{model}/{method}/{split}.npz",
    log:
        "logs/sis/{model}/{method}/{split}/merge.log",
    shell:
        "{OVERINTERP} sis-merge --out {output} {input} 2> {log}"


rule sis_compare:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
    output:
        "results/sis/{model}/{method}/compare.npz",
    params:
        size=split_size_arg("test"),
        options=sis_args(),
    threads: HEAVY_THREADS
    resources:
        gpu=1,
    log:
        "logs/sis/{model}/{method}/compare.log",
    benchmark:
        "results/benchmarks/sis/{model}/{method}/compare.tsv"
    shell:
        "{OVERINTERP} --threads {threads} sis --data {input.data} --model {input.model} --split test {params.size} "
        "--limit {COMPARE_SAMPLE} --method {wildcards.method} {params.options} --out {output} 2> {log}"


rule sis_agreement:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
        exact="results/sis/{model}/exact/compare.npz",
        gradient="results/sis/{model}/gradient/compare.npz",
    output:
        "results/sis/{model}/agreement.csv",
    params:
        fraction=config["subsets"]["fractions"][0],
        norm=normalization_args(),
    log:
        "logs/sis/{model}/agreement.log",
    shell:
        "{OVERINTERP} sis-agreement --exact {input.exact} --gradient {input.gradient} --fraction {params.fraction} "
        "--data {input.data} --model {input.model} {params.norm} --out {output} 2> {log}"


rule sis_agreement_table:
    input:
        expand("results/sis/{model}/agreement.csv", model=sis_models()),
    output:
        csv="results/tables/sis_agreement.csv",
        md="results/tables/sis_agreement.md",
    params:
        tables=lambda w, input: " ".join(f"{m}={p}" for m, p in zip(sis_models(), input)),
    log:
        "logs/tables/sis_agreement.log",
    shell:
        "{OVERINTERP} sis-agreement-table --csv {output.csv} --markdown {output.md} {params.tables} 2> {log}"
