"""The ``overinterp`` command line: one subcommand per pipeline step, each a thin call into the package.

Every feature module exposes ``add_commands(subparsers)``; the subcommand's handler receives the parsed
arguments. Errors the user can fix (``DataError``, ``ConfigError``) print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .utils import DataError

# Subcommand -> the module that defines it. Only that module is imported for a run (the whole set costs
# seconds of imports, paid by every job of the workflow); help and unknown commands load all of them.
COMMANDS = {
    "download": "data_commands", "convert": "data_commands", "ensemble": "models", "model": "classifiers",
    "train": "train",
    "evaluate": "evaluate", "sis": "sis_commands", "sis-merge": "sis_commands", "sis-agreement": "sis_commands",
    "sis-agreement-table": "sis_commands", "subsets": "subsets", "tables": "analysis", "figures": "figures",
    "controls": "controls", "corruptions": "corruptions", "robustness": "robust", "humaneval": "humaneval", "publish": "artifacts", "pull": "artifacts", "audit": "audit", "watch": "progress",
}
OPTIONS_WITH_VALUES = {"--log-level", "--threads"}
# The subcommands by stage, in pipeline order, for `overinterp --help`.
STAGES = {
    "data": ["download", "convert"],
    "models": ["train", "model", "ensemble", "evaluate", "robustness"],
    "backward selection (SIS)": ["sis", "sis-merge", "sis-agreement", "sis-agreement-table"],
    "pixel subsets": ["subsets"],
    "controls of what the subsets mean": ["controls"],
    "out of distribution (CIFAR-10-C)": ["corruptions"],
    "tables and figures": ["tables", "figures"],
    "human evaluation": ["humaneval"],
    "audit your own model": ["audit"],
    "sharing results (DVC)": ["publish", "pull"],
    "running the workflow": ["watch"],
}
DESCRIPTION = ("Find overinterpretation in image classifiers (Carter et al., NeurIPS 2021): the workflow's steps, "
               "and audits of your own model.")
EXAMPLES = """examples:
  overinterp audit --model torchvision:resnet18 --weights IMAGENET1K_V1 --data imagenet:/data/imagenet \\
      --split val --limit 200 --method gradient --out audit-resnet18
  overinterp sis --data data/cifar10/cifar10.npz --model results/models/cifar_resnet20-s0/model.pt \\
      --split test --limit 10 --method exact --threads 1 --out test-sis.npz

Each subcommand's own --help lists its options and their defaults; the README says how the workflow calls them."""


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


class DefaultsShown(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it says it already or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.required or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def add_global_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """--log-level and --threads; after the subcommand they default to nothing, so that a value given before
    it stands unless repeated after it."""
    parser.add_argument("--log-level", default=argparse.SUPPRESS if after_command else "INFO",
                        help="logging level: DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS if after_command else None,
                        help="CPU threads for torch (default: PyTorch's choice, usually all cores)")


def _subparsers(parser: argparse.ArgumentParser):
    return [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]


def _accept_global_options(parser: argparse.ArgumentParser) -> None:
    """Every (nested) subcommand takes the global options too (a value given there wins) and shows defaults."""
    for action in _subparsers(parser):
        for sub in action.choices.values():
            add_global_options(sub, after_command=True)
            sub.formatter_class = DefaultsShown
            _accept_global_options(sub)


def _stage_listing(subparsers) -> str:
    helps = {action.dest: action.help for action in subparsers._choices_actions}
    width = max(map(len, helps)) + 2
    lines = []
    for stage, names in STAGES.items():
        lines.append(f"{stage}:")
        lines += [f"  {name:{width}s}{helps[name]}" for name in names if name in helps]
    return "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overinterp", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"overinterp {__version__}")
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       help="one of the commands below, by stage; COMMAND --help lists its options")
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f"overinterp.{name}").add_commands(subparsers)
    _accept_global_options(parser)
    parser.epilog = f"{_stage_listing(subparsers)}\n\n{EXAMPLES}"
    subparsers._choices_actions.clear()  # listed by stage in the epilog instead of in one long block
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
