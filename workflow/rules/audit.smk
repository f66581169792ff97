# Audits of trained classifiers (config `audits`, e.g. config/audit.yaml): `overinterp audit` at scale. The
# backward-selection orderings are split over `shards` jobs (each resumable, one GPU each on a cluster), then
# one job computes the audit from them: SIS sizes, the model on its own subsets against random ones, the
# figures and results/audit/<name>/report.html. A model or dataset this workflow makes is made first.
wildcard_constraints:
    audit="|".join(map(re.escape, AUDITS)) or "(?!)",
    audit_shard=r"\d{4}",


rule audit_orderings:
    input:
        audit_inputs,
    output:
        "results/audit/sis/{audit}/{audit_shard}.npz",
    log:
        "logs/audit/sis/{audit}/{audit_shard}.log",
    benchmark:
        "results/benchmarks/audit/sis/{audit}/{audit_shard}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    resources:
        gpu=GPU_JOB,
    params:
        options=lambda w: audit_args(w.audit),
        shards=lambda w: AUDITS[w.audit]["shards"],
    shell:
        "python -m overinterp audit {params.options} --shard {wildcards.audit_shard}/{params.shards} "
        "--out {output} 2> {log}"


rule audit_report:
    input:
        files=audit_inputs,
        shards=lambda w: audit_shards(w.audit),
    output:
        report=report(
            "results/audit/{audit}/report.html",
            caption="../report/audit.rst",
            category=REPORT_CATEGORY["audit"],
            labels=lambda w: {"audit": w.audit},
        ),
        summary="results/audit/{audit}/summary.json",
        tables=multiext(
            "results/audit/{audit}/", "predictions.csv", "sis_sizes.csv", "subsets.csv"
        ),
        orderings="results/audit/{audit}/backselect.npz",
        figures=multiext(
            "results/audit/{audit}/",
            "sis-sizes.png",
            "sis-sizes.pdf",
            "subsets.png",
            "subsets.pdf",
            "examples.png",
            "examples.pdf",
        ),
    log:
        "logs/audit/report/{audit}.log",
    benchmark:
        "results/benchmarks/audit/report/{audit}.tsv"
    conda:
        "../../envs/overinterp.yaml"
    resources:
        gpu=GPU_JOB,
    params:
        options=lambda w: audit_args(w.audit),
        out=lambda w, output: Path(output.summary).parent,
    shell:
        "python -m overinterp audit {params.options} --orderings {input.shards} --out {params.out} 2> {log}"
