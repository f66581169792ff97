# Overinterpretation in image classifiers (Carter et al., NeurIPS 2021), end to end.
#   snakemake --cores N                              the paper's CIFAR-10 experiment (config/config.yaml)
#   snakemake --cores N --configfile config/quick.yaml   every stage at reduced scale
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


conda: "envs/overinterp.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sis.smk"
include: "workflow/rules/subsets.smk"
include: "workflow/rules/retrain.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/humaneval.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/mitigation.smk"


if config["imagenet"]["enabled"]:  # the ImageNet half, on the user's own copy (config/imagenet.yaml)

    include: "workflow/rules/imagenet.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
