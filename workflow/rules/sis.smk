# Backward selection (BackSelect) of every train and test image for the SIS models, sharded over images,
# and the exact-vs-gradient agreement on a sample of test images.


rule sis_shard:
    input:
        data=split_dataset,
        model="results/models/{model}/model.pt",
    output:
        "results/sis/{model}/{method}/{split}/shard{shard}.npz",
    log:
        "logs/sis/{model}/{method}/{split}/shard{shard}.log",
    benchmark:
        "results/benchmarks/sis/{model}/{method}/{split}/shard{shard}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        job=sis_job_args,
        shards=SIS_SHARDS,
        options=sis_args(),
    shell:
        "python -m overinterp --threads {threads} sis --data {input.data} --model {input.model} {params.job} "
        "--shard {wildcards.shard} --shards {params.shards} {params.options} --out {output} 2> {log}"


rule sis_merge:
    input:
        lambda w: sis_shards(w.model, w.method, w.split),
    output:
        "results/sis/{model}/{method}/{split}.npz",
    log:
        "logs/sis/{model}/{method}/{split}/merge.log",
    conda:
        "../../envs/overinterp.yaml"
    shell:
        "python -m overinterp sis-merge --out {output} {input} 2> {log}"


rule sis_compare:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
    output:
        "results/sis/{model}/{method}/compare.npz",
    log:
        "logs/sis/{model}/{method}/compare.log",
    benchmark:
        "results/benchmarks/sis/{model}/{method}/compare.tsv"
    conda:
        "../../envs/overinterp.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=GPU_JOB,
    params:
        size=split_size_arg("test"),
        limit=COMPARE_SAMPLE,
        options=sis_args(),
    shell:
        "python -m overinterp --threads {threads} sis --data {input.data} --model {input.model} --split test {params.size} "
        "--limit {params.limit} --method {wildcards.method} {params.options} --out {output} 2> {log}"


rule sis_agreement:
    input:
        data=DATASET,
        model="results/models/{model}/model.pt",
        exact="results/sis/{model}/exact/compare.npz",
        gradient="results/sis/{model}/gradient/compare.npz",
    output:
        "results/sis/{model}/agreement.csv",
    log:
        "logs/sis/{model}/agreement.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        fraction=config["subsets"]["fractions"][0],
        norm=normalization_args(),
    shell:
        "python -m overinterp sis-agreement --exact {input.exact} --gradient {input.gradient} --fraction {params.fraction} "
        "--data {input.data} --model {input.model} {params.norm} --out {output} 2> {log}"


rule sis_agreement_table:
    input:
        expand("results/sis/{model}/agreement.csv", model=sis_models()),
    output:
        csv="results/tables/sis_agreement.csv",
        md="results/tables/sis_agreement.md",
    log:
        "logs/tables/sis_agreement.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        tables=lambda w, input: " ".join(
            f"{m}={p}" for m, p in zip(sis_models(), input)
        ),
    shell:
        "python -m overinterp sis-agreement-table --csv {output.csv} --markdown {output.md} {params.tables} 2> {log}"
