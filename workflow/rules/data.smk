# Dataset: download the CIFAR-10 python archive (md5 verified before it is kept), or read an image folder,
# and write the dataset file once.


# On a cluster the download runs in the controlling process: compute nodes often have no internet access.
localrules:
    download_cifar10,


# The md5 identifies the archive; where it comes from does not, so a mirror's address is not a parameter
# (changing it does not make Snakemake rebuild a verified, e.g. pulled, archive). `snakemake --lint` reports
# it ("Shell command directly uses variable CIFAR10_URL"), and CIFAR10C_URL of corruptions.smk, on purpose:
# its only findings.
CIFAR10_URL = shlex.quote(config["cifar10"]["url"])


rule download_cifar10:
    output:
        "data/cifar10/cifar-10-python.tar.gz",
    log:
        "logs/data/download_cifar10.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        md5=config["cifar10"]["md5"],
    shell:
        "python -m overinterp download --url {CIFAR10_URL} --md5 {params.md5} --out {output} 2> {log}"


# The one dataset file every later stage reads, from whichever adapter the config names (`dataset.adapter`).
rule dataset:
    input:
        unpack(dataset_input),
    output:
        DATASET,
    log:
        "logs/data/dataset.log",
    conda:
        "../../envs/overinterp.yaml"
    params:
        source=dataset_source,
    shell:
        "python -m overinterp convert {params.source} --out {output} 2> {log}"
