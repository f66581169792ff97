# Dataset: download the CIFAR-10 python archive (md5 verified before it is kept) and convert it once.


# On a cluster the download runs in the controlling process: compute nodes often have no internet access.
localrules:
    download_cifar10,


rule download_cifar10:
    output:
        "data/cifar10/cifar-10-python.tar.gz",
    params:
        url=config["cifar10"]["url"],
        md5=config["cifar10"]["md5"],
    log:
        "logs/data/download_cifar10.log",
    shell:
        "{OVERINTERP} download --url {params.url:q} --md5 {params.md5} --out {output} 2> {log}"


rule convert_cifar10:
    input:
        "data/cifar10/cifar-10-python.tar.gz",
    output:
        DATASET,
    log:
        "logs/data/convert_cifar10.log",
    shell:
        "{OVERINTERP} convert --archive {input} --out {output} 2> {log}"
