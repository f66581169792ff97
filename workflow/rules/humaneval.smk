# The human-evaluation study: a static web page of backward-selection subsets, random subsets and full
# images (attention checks), and the scoring of the responses people give in it.
#   Host or send results/humaneval/study/ (or study.zip) only; the answer key beside it stays private.
#   Put the downloaded response CSVs into `humaneval.responses`; the scoring rule then joins `all`.
rule humaneval_build:
    input:
        data=DATASET,
        bs=keep_masks(HUMANEVAL_MODEL, HUMANEVAL_SUBSETS["bs"]),
        random=keep_masks(HUMANEVAL_MODEL, HUMANEVAL_SUBSETS["random"]),
    output:
        # The page, not directory(): Snakemake would add a timestamp file to the participants' folder.
        page="results/humaneval/study/index.html",
        zip="results/humaneval/study.zip",
        key="results/humaneval/answer_key.csv",
        manifest="results/humaneval/manifest.csv",
    log:
        "logs/humaneval/build.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        conditions=" ".join(
            f"--{c}-count {HUMANEVAL[c]['count']} --{c}-seed {HUMANEVAL[c]['seed']}"
            for c in ("bs", "random", "full")
        ),
        options="--display-size {}{}{}".format(
            HUMANEVAL["display_size"],
            (
                f" --post-url {shlex.quote(HUMANEVAL['post_url'])}"
                if HUMANEVAL["post_url"]
                else ""
            ),
            (
                f" --reproduce {shlex.quote(HUMANEVAL['reproduce'])}"
                if HUMANEVAL["reproduce"]
                else ""
            ),
        ),
    shell:
        "python -m overinterp humaneval build --data {input.data} {params.size} --bs-masks {input.bs} "
        "--random-masks {input.random} {params.conditions} {params.options} {params.norm} "
        "--bundle results/humaneval/study --zip {output.zip} --key {output.key} --manifest {output.manifest} 2> {log}"


rule humaneval_score:
    input:
        data=DATASET,
        key="results/humaneval/answer_key.csv",
        responses=humaneval_responses_input,
        predictions=[path for _, _, path in humaneval_predictions()],
    output:
        table="results/tables/humaneval.csv",
        participants="results/tables/humaneval_participants.csv",
        png=report(
            "results/figures/humaneval.png",
            caption="../report/humaneval.rst",
            category=REPORT_CATEGORY["humaneval"],
            subcategory="People vs models",
        ),
        pdf="results/figures/humaneval.pdf",
    log:
        "logs/humaneval/score.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        threshold=HUMANEVAL["attention_threshold"],
        predictions=" ".join(
            shlex.quote(f"{n}:{c}={p}") for n, c, p in humaneval_predictions()
        ),
        responses=lambda w, input: " ".join(shlex.quote(f) for f in input.responses),
    shell:
        "python -m overinterp humaneval score --key {input.key} --data {input.data} --responses {params.responses} "
        "--attention-threshold {params.threshold} --model-predictions {params.predictions} "
        "--table {output.table} --participants {output.participants} --figure results/figures/humaneval 2> {log}"
