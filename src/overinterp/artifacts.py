"""Share the expensive artifacts through DVC: ``overinterp publish`` and ``overinterp pull``.

publish: track the dataset (``data.dvc``, committed with the official archive's md5 and size, gets the
converted dataset file beside it) and the heavy result folders that exist (``dvc add``, one ``.dvc``
file each), copy Snakemake's metadata record of every tracked workflow output into that ``.dvc`` file's
``meta`` field (DVC keeps ``meta`` untouched) with the git commit of the code, and ``dvc push``. It
refuses outputs Snakemake would rebuild, files no rule made (a foreign model, a leftover ``.part``) and
code with uncommitted changes, so a remote never holds results that disagree with a committed workflow;
``force`` overrides the last two. The human-evaluation responses (personal data) are published only when
asked for. No absolute local path goes into a ``.dvc`` file.

pull: ``dvc pull``, then make the checkout consistent for Snakemake:
1. restore the publisher's metadata records into ``.snakemake/metadata``, so the params, code, input
   and software-env rerun triggers compare the current workflow with what produced the files
   (a config change after publishing still shows as "params changed");
2. repair modification times, which DVC sets in checkout order: ``snakemake --touch
   --rerun-triggers mtime --drop-metadata`` over the pulled outputs touches them in DAG order and
   leaves the restored records alone. Only the pulled outputs are targets, so a local result
   downstream of a pulled file (say an evaluation of an older model) still counts as stale.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

import yaml

from .utils import DataError

log = logging.getLogger(__name__)

DATA_DIR = "data"
DATA_POINTER = "data.dvc"
# What data.dvc tracks: the archive (committed with its official md5), and the converted dataset, which
# publish adds so that a pull needs no conversion (a new dataset file would make every result stale).
DATA_FILES = ("data/cifar10/cifar-10-python.tar.gz", "data/cifar10/cifar10.npz")
RESPONSES_DIR = "data/humaneval/responses"  # people's answers: never published unless asked for
# The code whose uncommitted changes would make published results disagree with every commit.
CODE_PATHS = ("Snakefile", "workflow", "src", "config", "envs", "profiles", "pyproject.toml")
# Folders of results, each published as a whole: results/<name>/, results/audit/<name>/ for audits (their
# orderings in results/audit/sis).
RESULT_ROOTS = ("results", "results/audit")
# Results that cost GPU time; cheaper ones (evaluations, tables, figures) are rebuilt after a pull
# unless a heavy result was computed from them.
HEAVY_DIRS = tuple(f"{root}/{name}" for root in RESULT_ROOTS for name in ("models", "sis", "subsets", "retrain"))
META_KEY = "snakemake"


def _run(cmd: list[str], cwd: Path, capture: bool = False) -> str:
    result = subprocess.run(cmd, cwd=cwd, text=True, capture_output=capture)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-20:] if capture else []
        raise DataError(f"`{' '.join(cmd[2:5])} ...` failed (exit {result.returncode})"
                        + ("".join(f"\n  {line}" for line in detail)))
    return result.stdout if capture else ""


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _snakemake(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def workflow_outputs(root: Path, snakemake_args: list[str]) -> dict[str, tuple[str, str]]:
    """{output file: (status, plan)} for every job of the workflow, from ``snakemake --summary``."""
    out = _run(_snakemake("--summary", *snakemake_args), root, capture=True)
    rows = [line.split("\t") for line in out.splitlines()]
    header = rows[0] if rows else []
    if header[:1] != ["output_file"]:
        raise DataError("unexpected `snakemake --summary` output; is this the workflow's root folder?")
    return {row[0]: (row[-2], row[-1]) for row in rows[1:] if len(row) == len(header)}


def _files_under(root: Path, folder: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file())


def _dvc_file(root: Path, folder: str) -> Path:
    return root / (DATA_POINTER if folder == DATA_DIR else f"{folder}.dvc")


def _source_commit(root: Path, force: bool) -> dict:
    """The git commit the results were made with; uncommitted changes to the code are refused."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, text=True, capture_output=True)
    if head.returncode != 0:
        if force:
            return {"commit": None, "uncommitted_changes": True}
        raise DataError(f"{root} is not a git checkout with a commit, so the results cannot name the code that "
                        "made them; commit the workflow first (or pass --force)")
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS],
                             cwd=root, text=True, capture_output=True, check=True).stdout.splitlines()
    if changed and not force:
        raise DataError("the workflow or package has uncommitted changes, so no commit made these results: "
                        + ", ".join(line[3:] for line in changed[:8]) + (" ..." if len(changed) > 8 else "")
                        + ". Commit them (and rerun what they change) first, or pass --force")
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(changed)}


def _relative(value, root: Path):
    """``value`` with this checkout's absolute path made relative, at any depth."""
    if isinstance(value, str):
        return value.replace(f"{root}/", "").replace(str(root), ".")
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    return value


def _track_data(root: Path, files: list[str]) -> None:
    """data.dvc lists ``files`` (md5 entries of unchanged paths kept); ``dvc commit`` hashes and caches them."""
    pointer = root / DATA_POINTER
    stage = yaml.safe_load(pointer.read_text()) if pointer.exists() else {}
    known = {out["path"]: out for out in stage.get("outs", [])}
    stage["outs"] = [known.get(f, {"path": f, "hash": "md5"}) for f in files]
    pointer.write_text(yaml.safe_dump(stage, sort_keys=False))
    _run(_dvc("commit", "--force", "--quiet", DATA_POINTER), root)


def _persistence(root: Path):
    # Snakemake's own record store (the default file backend), so records keep its exact format.
    from snakemake.persistence.file import FilePersistence

    return FilePersistence(path=root / ".snakemake")


def _check_remote(root: Path, remote: str | None) -> None:
    names = [line.split()[0] for line in _run(_dvc("remote", "list"), root, capture=True).splitlines() if line]
    default = _run(_dvc("remote", "default"), root, capture=True).strip() if names else ""
    if remote is not None and remote not in names:
        raise DataError(f"no DVC remote named {remote!r} (configured: {', '.join(names) or 'none'})")
    if remote is None and not default:
        raise DataError("no default DVC remote: add one with `dvc remote add -d NAME URL` "
                        "(see README, 'Sharing results with DVC')")


def _reason(status: str) -> str:
    """Why Snakemake would rebuild a file; "ok" with a rebuild pending means an input is stale."""
    return "an input is out of date" if status == "ok" else status


def _folder_of(path: str) -> str | None:
    """The publishable folder a workflow file lives in: data/ or a folder of one of the RESULT_ROOTS."""
    parts = Path(path).parts
    if parts[:1] == (DATA_DIR,):
        return DATA_DIR
    for root in sorted(RESULT_ROOTS, key=len, reverse=True):
        depth = root.count("/") + 2
        if "/".join(parts[:depth - 1]) == root and len(parts) > depth:
            folder = "/".join(parts[:depth])
            return None if folder in RESULT_ROOTS else folder
    return None


def publish(root: Path, snakemake_args: list[str], remote: str | None = None, force: bool = False,
            include_responses: bool = False) -> list[Path]:
    """Track the dataset, the heavy result folders and every folder they were computed from with DVC,
    record their provenance, push; returns the .dvc files."""
    folders = {f for f in (DATA_DIR, *HEAVY_DIRS) if (root / f).is_dir()}
    if not folders & set(HEAVY_DIRS):
        raise DataError(f"nothing to publish: none of {', '.join(HEAVY_DIRS)} exists; run the workflow first")
    code = _source_commit(root, force)
    _check_remote(root, remote)
    outputs = workflow_outputs(root, snakemake_args)
    persistence = _persistence(root)
    records: dict[str, dict] = {}
    # Close the set over inputs (as Snakemake recorded them), so that nothing a published file was made
    # from is missing after a pull: a rebuilt input would make the published file stale again.
    pending = sorted(folders)
    while pending:
        for name in _files_under(root, pending.pop()):
            record = persistence._read_record(name) if name in outputs else None
            if record is None:
                continue
            records[name] = dict(record.items())
            for source in record.input or []:
                folder = _folder_of(source)
                if folder and folder not in folders and (root / folder).is_dir():
                    folders.add(folder)
                    pending.append(folder)
    folders = sorted(folders)
    files = {folder: _files_under(root, folder) for folder in folders}
    if DATA_DIR in files:
        responses = [f for f in files[DATA_DIR] if f.startswith(RESPONSES_DIR + "/")] if include_responses else []
        files[DATA_DIR] = [f for f in DATA_FILES if (root / f).is_file()] + responses
    unknown = [f for folder, fs in files.items() if folder != DATA_DIR for f in fs if f not in outputs]
    if unknown and not force:
        raise DataError("these files were made by no rule of the workflow, so they are not published: "
                        + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                        + "; remove them (leftovers of interrupted jobs, files of other runs) or pass --force")
    stale = [f"{f} ({_reason(outputs[f][0])})" for fs in files.values() for f in fs
             if f in outputs and outputs[f][1] != "no update"]
    if stale:
        raise DataError("Snakemake would rebuild these files, so they are not published: "
                        + ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else "")
                        + "; run the workflow (with the same configuration) first")
    unrecorded = [f for fs in files.values() for f in fs if f in outputs and f not in records]
    if unrecorded:
        log.warning("no Snakemake metadata for %d outputs (e.g. %s); after a pull only their modification "
                    "times are checked", len(unrecorded), unrecorded[0])

    if DATA_DIR in files:
        _track_data(root, files[DATA_DIR])
    results = [folder for folder in folders if folder != DATA_DIR]
    if results:
        _run(_dvc("add", "--quiet", *results), root)
    dvc_files = [_dvc_file(root, folder) for folder in folders]
    for folder, dvc_file in zip(folders, dvc_files):
        stage = yaml.safe_load(dvc_file.read_text())
        meta = stage.setdefault("meta", {})
        # Without the shell command: it holds local paths (a mirror's file:// address), and no rerun
        # trigger reads it.
        published = {f: {k: v for k, v in records[f].items() if k != "shellcmd"} for f in files[folder] if f in records}
        meta[META_KEY] = _relative(published, root)
        meta["source"] = code
        dvc_file.write_text(yaml.safe_dump(stage, sort_keys=False))
    _run(_dvc("push", *(["--remote", remote] if remote else []), *map(str, dvc_files)), root)
    print("Published " + ", ".join(folders) + ". Commit the pointers: git add "
          + " ".join(p.relative_to(root).as_posix() for p in dvc_files) + " && git commit")
    return dvc_files


def pull(root: Path, snakemake_args: list[str], remote: str | None = None) -> dict[str, tuple[str, str]]:
    """Pull the published artifacts and leave Snakemake's view consistent; returns the pulled outputs' summary."""
    candidates = [_dvc_file(root, DATA_DIR), *(f for r in RESULT_ROOTS for f in sorted((root / r).glob("*.dvc")))]
    dvc_files = [p for p in candidates if p.exists()]
    if not dvc_files:
        raise DataError("no data.dvc or results/*.dvc here: nothing was published in this commit")
    _run(_dvc("pull", *(["--remote", remote] if remote else []), *map(str, dvc_files)), root)

    persistence = _persistence(root)
    from snakemake.persistence import MetadataRecord

    pulled = []
    for dvc_file in dvc_files:
        stage = yaml.safe_load(dvc_file.read_text())
        for out in stage.get("outs", []):
            path = (dvc_file.parent / out["path"]).relative_to(root).as_posix()
            pulled += _files_under(root, path) if (root / path).is_dir() else [path]
        records = (stage.get("meta") or {}).get(META_KEY) or {}
        for name, record in records.items():
            persistence._write_record(name, MetadataRecord.model_validate(record))
            persistence._unmark_incomplete(name)

    outputs = workflow_outputs(root, snakemake_args)
    targets = [f for f in pulled if f in outputs]
    if targets:
        # Targets right before the user's arguments, which may start with targets of their own
        # (argparse wants positional arguments in one run).
        _run(_snakemake("--touch", "--quiet", "--rerun-triggers", "mtime", "--drop-metadata", "--cores", "1",
                        *targets, *snakemake_args), root, capture=True)
    outputs = workflow_outputs(root, snakemake_args)
    summary = {f: outputs[f] for f in targets}
    stale = {f: s for f, s in summary.items() if s[1] != "no update"}
    print(f"Pulled {len(pulled)} files; {len(targets) - len(stale)} of {len(targets)} workflow outputs "
          "among them are up to date.")
    for name, (status, _) in sorted(stale.items()):
        print(f"  will rebuild {name}: {_reason(status)}")
    return summary


def add_commands(subparsers) -> None:
    import argparse

    for name, func, text in (
        ("publish", publish, "track the dataset and the heavy results with DVC and push them to the remote"),
        ("pull", pull, "pull published artifacts and mark them up to date for Snakemake"),
    ):
        p = subparsers.add_parser(name, help=text, description=text + ". Run in the workflow's root folder.")
        p.add_argument("--remote", help="DVC remote (default: the project's default remote)")
        if name == "publish":
            p.add_argument("--force", action="store_true",
                           help="publish even with uncommitted code changes or files no rule made")
            p.add_argument("--include-responses", action="store_true",
                           help=f"also publish the study's responses ({RESPONSES_DIR}/: personal data)")
        p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                       help="after --: the workflow's snakemake arguments, e.g. -- --configfile config/quick.yaml")
        p.set_defaults(handler=partial(_handle, func))


def _handle(func, args) -> int:
    snakemake_args = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    options = {"force": args.force, "include_responses": args.include_responses} if func is publish else {}
    func(Path.cwd(), snakemake_args, args.remote, **options)
    return 0
