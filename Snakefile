# Overinterpretation in image classifiers (Carter et al., NeurIPS 2021), end to end.
#   snakemake --cores N                              the paper's CIFAR-10 experiment (config/config.yaml)
#   snakemake --cores N --configfile config/quick.yaml   every stage at reduced scale
#   snakemake --cores N --configfile config/imagenet.yaml --config dataset='{root: ...}'   the ImageNet experiment
#   snakemake --cores N --configfile config/audit.yaml   audit a trained classifier (see README)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# The report opens with this run's headline (Table 1, key numbers, the configuration in words) once the
# `headline` rule has written it, before that with the workflow's description.
report: report_front_page()


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sis.smk"
include: "workflow/rules/subsets.smk"
include: "workflow/rules/retrain.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/humaneval.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/mitigation.smk"
include: "workflow/rules/controls.smk"
include: "workflow/rules/robust.smk"
include: "workflow/rules/corruptions.smk"
include: "workflow/rules/audit.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
