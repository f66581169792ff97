"""The command line as a new user meets it: --version, help grouped by stage, global options anywhere."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from overinterp import __version__
from overinterp.cli import COMMANDS, STAGES, build_parser, main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overinterp", *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"overinterp {__version__}"


def test_help_lists_every_command_once_under_its_stage_with_examples():
    text = run("--help").stdout
    assert sorted(name for names in STAGES.values() for name in names) == sorted(COMMANDS)
    listing = text[text.index("data:\n"):text.index("examples:")]
    lines = [line.split()[0] for line in listing.splitlines() if line.startswith("  ")]
    assert sorted(lines) == sorted(COMMANDS)
    for stage in STAGES:
        assert f"\n{stage}:\n" in text
    examples = text[text.index("examples:"):]
    assert examples.count("overinterp ") >= 2 and "==SUPPRESS==" not in text


@pytest.mark.parametrize("argv", [
    ["sis-merge", "--threads", "2", "--log-level", "DEBUG", "--out", "x.npz", "a.npz"],
    ["--threads", "2", "--log-level", "DEBUG", "sis-merge", "--out", "x.npz", "a.npz"],
    ["subsets", "random", "--data", "d.npz", "--fraction", "0.1", "--out", "o.npz", "--threads", "2", "--log-level", "DEBUG"],
])
def test_global_options_before_or_after_the_command(argv):
    args = build_parser(argv[0] if argv[0] != "--threads" else argv[4]).parse_args(argv)
    assert args.threads == 2 and args.log_level == "DEBUG"


def test_command_level_value_wins_and_default_stays():
    args = build_parser("sis-merge").parse_args(["--threads", "3", "sis-merge", "--threads", "1", "--out", "x", "a"])
    assert args.threads == 1
    args = build_parser("sis-merge").parse_args(["sis-merge", "--out", "x", "a"])
    assert args.threads is None and args.log_level == "INFO"


def test_a_missing_file_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["--threads", "1", "sis-merge", "--out", str(tmp_path / "x.npz"), str(tmp_path / "none.npz")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_help_lists_architectures_and_recipe_keys():
    text = run("train", "--help").stdout
    for name in ("cifar_resnet20", "cifar_vgg16_bn", "tiny", "epochs (200)", "milestones ([60, 120, 160])",
                 "input_dropout (0.0)"):
        assert name in " ".join(text.split()), name
    assert build_parser("train").parse_args(["train", "--data", "d", "--arch", "resnet20", "--out", "o",
                                             "--metrics", "m"]).arch == "resnet20"  # old names still work
    bad = run("train", "--data", "d", "--arch", "resnet9000", "--out", "o", "--metrics", "m")
    assert bad.returncode == 2 and "unknown architecture 'resnet9000'" in bad.stderr and "torchvision:NAME" in bad.stderr
    assert build_parser("train").parse_args(["train", "--data", "d", "--arch", "torchvision:resnet18", "--out", "o",
                                             "--metrics", "m"]).arch == "torchvision:resnet18"


def _parsers(parser, path=()):
    from overinterp.cli import _subparsers

    for action in _subparsers(parser):
        for name, sub in action.choices.items():
            yield (*path, name), sub
            yield from _parsers(sub, (*path, name))


def test_every_option_has_help_and_shows_its_default():
    import argparse

    for path, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"overinterp {' '.join(path)}: {name} has no help text"
            if action.option_strings and not action.required and action.default not in (None, False):
                flag = action.option_strings[0]
                after = text[text.rindex(flag):]
                assert "default" in after[:400], f"overinterp {' '.join(path)} --help does not show {flag}'s default"


def test_watch_shows_the_jobs_progress_from_their_logs_and_returns_the_exit_status(tmp_path):
    """`overinterp watch -- COMMAND` (what `make run` runs): the progress bar a job writes into its log is
    printed on the console while it runs; COMMAND's exit status is passed on."""
    logs = tmp_path / "logs"
    (logs / "sis").mkdir(parents=True)
    job = ("import sys, time\nfrom tqdm import tqdm\n"
           "with open(sys.argv[1], 'w') as log:\n"
           "    for _ in tqdm(range(30), desc='BackSelect', file=log, mininterval=0):\n"
           "        time.sleep(0.1); log.flush()\n"
           "sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-m", "overinterp", "watch", "--logs", str(logs), "--every", "0.5", "--",
                           sys.executable, "-c", job, str(logs / "sis" / "shard-0.log")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    lines = [line for line in done.stdout.splitlines() if "sis/shard-0: BackSelect" in line]
    assert lines, done.stdout
    assert re.search(r"BackSelect \d+% \(\d+/30\), [\d:]+ so far, [\d:]+ left", lines[0])
    from overinterp.progress import logs_of

    assert logs_of(["snakemake", "--cores", "2", "--directory", "/w", "-n"]) == Path("/w/logs")
    assert logs_of(["snakemake", "--directory=/w"]) == Path("/w/logs") and logs_of(["snakemake"]) == Path("logs")
    missing = subprocess.run([sys.executable, "-m", "overinterp", "watch"], capture_output=True, text=True)
    assert missing.returncode == 2 and "give the command to run after --" in missing.stderr


def test_make_install_takes_the_cpu_build_of_torch_when_asked(tmp_path):
    """`make install TORCH=cpu` installs torch from PyTorch's CPU index before the project; plain `make install`
    leaves torch to PyPI (dry runs: nothing is installed)."""
    from conftest import REPO

    def plan(*extra):
        return subprocess.run(["make", "-n", "-C", str(REPO), "install", f"VENV={tmp_path / 'venv'}", *extra],
                              capture_output=True, text=True, check=True).stdout

    cpu = plan("TORCH=cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu torch torchvision" in cpu
    assert cpu.index("whl/cpu") < cpu.index("-e '.[test]'")
    assert "whl/cpu" not in plan()
