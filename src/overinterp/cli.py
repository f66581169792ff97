"""The ``overinterp`` command line: one subcommand per pipeline step, each a thin call into the package.

Every feature module exposes ``add_commands(subparsers)``; the subcommand's handler receives the parsed
arguments. Errors the user can fix (``DataError``, ``ConfigError``) print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .utils import DataError

# Subcommand -> the module that defines it. Only that module is imported for a run (the whole set costs
# seconds of imports, paid by every job of the workflow); help and unknown commands load all of them.
COMMANDS = {
    "download": "data_commands", "convert": "data_commands", "ensemble": "models", "train": "train",
    "evaluate": "evaluate", "sis": "sis_commands", "sis-merge": "sis_commands", "sis-agreement": "sis_commands",
    "sis-agreement-table": "sis_commands", "subsets": "subsets", "tables": "analysis", "figures": "figures",
    "humaneval": "humaneval", "publish": "artifacts", "pull": "artifacts", "audit": "audit",
    **{f"imagenet-{name}": "imagenet_commands" for name in (
        "index", "model", "train", "evaluate", "sis", "subsets", "random-subsets", "sis-sizes", "report")},
}
OPTIONS_WITH_VALUES = {"--log-level", "--threads"}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a global option or its value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in OPTIONS_WITH_VALUES:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overinterp", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f"overinterp.{name}").add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_in(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = args.handler(args)
    except (DataError, ValueError, OSError) as err:  # OSError: a full disk, a missing or unreadable file
        print(f"overinterp {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
