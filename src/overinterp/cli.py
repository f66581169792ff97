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

COMMAND_MODULES = (
    "overinterp.data_commands",
    "overinterp.models",
    "overinterp.train",
    "overinterp.evaluate",
    "overinterp.sis_commands",
    "overinterp.subsets",
    "overinterp.analysis",
    "overinterp.figures",
    "overinterp.humaneval",
    "overinterp.artifacts",
    "overinterp.imagenet_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overinterp", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
