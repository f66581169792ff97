# The human-evaluation study: a static web page of backward-selection subsets, random subsets and full
# images (attention checks), and the scoring of the responses people give in it.
#   Host or send results/humaneval/study/ (or study.zip) only; the answer key beside it stays private.
#   Put the downloaded response CSVs into `humaneval.responses`; the scoring rule then joins `all`.
import glob

HUMANEVAL = config["humaneval"]
HUMANEVAL_MODEL = HUMANEVAL["model"] or sis_models()[0]
HUMANEVAL_FRACTION = HUMANEVAL["fraction"] or FRACTIONS[0]
if HUMANEVAL_MODEL not in sis_models():
    raise ValueError(
        f"humaneval.model {HUMANEVAL_MODEL!r} has no backward-selection subsets; choose one of {sis_models()} "
        "(the models SIS runs on) or null"
    )
HUMANEVAL_SUBSETS = {"bs": f"{SIS_METHOD}-bs-{HUMANEVAL_FRACTION}", "random": f"random-{HUMANEVAL_FRACTION}"}


def humaneval_responses():
    return sorted(glob.glob(str(Path(HUMANEVAL["responses"]) / "*.csv")))


def humaneval_predictions():
    """(name, condition, predictions CSV) of the models on the study's images: the model whose subsets
    are shown, on each condition, and the models retrained on each kind of subset, on that kind."""
    model = HUMANEVAL_MODEL
    entries = [(model, "full", f"results/eval/{model}/full.csv")]
    entries += [(model, c, f"results/eval/{model}/{s}.csv") for c, s in HUMANEVAL_SUBSETS.items()]
    entries += [
        (f"{model} retrained on the subsets, seed {seed}", c, f"results/retrain/{model}/{s}-s{seed}/test.csv")
        for seed in RETRAIN_SEEDS
        for c, s in HUMANEVAL_SUBSETS.items()
    ]
    return entries


def humaneval_outputs():
    outputs = ["results/humaneval/study.zip", "results/humaneval/answer_key.csv", "results/humaneval/manifest.csv"]
    if humaneval_responses():
        outputs += ["results/tables/humaneval.csv", "results/figures/humaneval.png"]
    return outputs


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
    params:
        size=split_size_arg("test"),
        norm=normalization_args(),
        conditions=" ".join(
            f"--{c}-count {HUMANEVAL[c]['count']} --{c}-seed {HUMANEVAL[c]['seed']}" for c in ("bs", "random", "full")
        ),
        options="--id-seed {} --display-size {}{}".format(
            HUMANEVAL["id_seed"],
            HUMANEVAL["display_size"],
            f" --post-url {shlex.quote(HUMANEVAL['post_url'])}" if HUMANEVAL["post_url"] else "",
        ),
    log:
        "logs/humaneval/build.log",
    shell:
        "{OVERINTERP} humaneval build --data {input.data} {params.size} --bs-masks {input.bs} "
        "--random-masks {input.random} {params.conditions} {params.options} {params.norm} "
        "--bundle results/humaneval/study --zip {output.zip} --key {output.key} --manifest {output.manifest} 2> {log}"


def humaneval_responses_input(wildcards):
    files = humaneval_responses()
    if not files:
        raise ValueError(
            f"no response files (*.csv) in {HUMANEVAL['responses']}: put the CSVs downloaded from the study "
            "page there (or set humaneval.responses)"
        )
    return files


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
    params:
        threshold=HUMANEVAL["attention_threshold"],
        predictions=" ".join(shlex.quote(f"{n}:{c}={p}") for n, c, p in humaneval_predictions()),
        responses=lambda w, input: " ".join(shlex.quote(f) for f in input.responses),
    log:
        "logs/humaneval/score.log",
    shell:
        "{OVERINTERP} humaneval score --key {input.key} --data {input.data} --responses {params.responses} "
        "--attention-threshold {params.threshold} --model-predictions {params.predictions} "
        "--table {output.table} --participants {output.participants} --figure results/figures/humaneval 2> {log}"
