"""``overinterp watch -- COMMAND``: run a command (the workflow) and show on the console what its long jobs do.

The workflow's jobs write their progress bars into their log files (``2> logs/...``), where the console does
not see them. While COMMAND runs, every ``--every`` seconds this prints one line per job whose log was
written recently and ends in an unfinished progress bar: the log, the bar's description, how far it is and
how long it has left. COMMAND's own output passes through unchanged, and its exit status is returned.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

# A tqdm line: "desc: 45%|████▌     | 450/1000 [00:10<00:12, 45.0it/s]" (counts may read 450k/1.00M).
BAR = re.compile(r"(?:(?P<desc>[^\r\n]*?):\s+)?(?P<percent>\d+)%\|[^|]*\| (?P<count>\S+) "
                 r"\[(?P<elapsed>[^<\]]+)<(?P<left>[^,\]]+)")


def last_bar(path: Path, tail: int = 4096) -> re.Match | None:
    """The progress bar the log at ``path`` ends with (its last line, tqdm's carriage returns included)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    return BAR.search(lines[-1]) if lines else None


def running_bars(logs: Path, since: float) -> list[str]:
    """One line per log written after ``since`` whose progress bar is unfinished."""
    found = []
    for path in sorted(logs.rglob("*.log")) if logs.is_dir() else []:
        try:
            if path.stat().st_mtime < since:
                continue
        except OSError:
            continue
        bar = last_bar(path)
        if bar is None or int(bar["percent"]) >= 100:
            continue
        left = "time left unknown" if "?" in bar["left"] else f"{bar['left']} left"
        found.append(f"  {path.relative_to(logs).with_suffix('')}: {bar['desc'] or 'working'} {bar['percent']}% "
                     f"({bar['count']}), {bar['elapsed']} so far, {left}")
    return found


def watch(command: list[str], logs: Path, every: float) -> int:
    """Run ``command``; every ``every`` seconds, print the unfinished progress bars of the logs under ``logs``
    written in the last two intervals (long jobs update their logs at least every 30 s)."""
    process = subprocess.Popen(command)
    try:
        while True:
            try:
                return process.wait(timeout=every)
            except subprocess.TimeoutExpired:
                lines = running_bars(logs, time.time() - 2 * every - 30)
                if lines:
                    print(f"[{time.strftime('%H:%M:%S')}] progress (details in {logs}/):", *lines, sep="\n",
                          flush=True)
    except KeyboardInterrupt:  # the command got the interrupt too: let it stop cleanly
        return process.wait()


def logs_of(command: list[str]) -> Path:
    """Where a Snakemake command's jobs write their logs: ``logs/`` under its ``--directory`` (``-d``), if any."""
    for i, word in enumerate(command):
        if word in ("--directory", "-d") and i + 1 < len(command):
            return Path(command[i + 1]) / "logs"
        if word.startswith("--directory="):
            return Path(word.split("=", 1)[1]) / "logs"
    return Path("logs")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("watch", help="run a command (e.g. snakemake) and print its jobs' progress from their logs")
    p.add_argument("--logs", default=None,
                   help="the folder of the jobs' log files (default: logs/ in the command's --directory, or here)")
    p.add_argument("--every", type=float, default=60.0, help="seconds between progress reports")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(handler=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("overinterp watch: give the command to run after --, e.g. overinterp watch -- snakemake --cores 2",
              file=sys.stderr)
        return 2
    return watch(command, Path(args.logs) if args.logs else logs_of(command), args.every)
