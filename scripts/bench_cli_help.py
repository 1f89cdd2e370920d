"""Wall time of ``meddinov3 [SUBCOMMAND] --help`` for every subcommand (the console script, a fresh process each).

    PYTHONPATH=$PWD python scripts/bench_cli_help.py [--repeats 3]

Prints the median over the repeats per command and whether stderr carried a warning; the target is
under 2 s each. Speed is measured here, not asserted by a timed test.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from nnunet_meddinov3.cli.main import SUBCOMMANDS

WEIGHTS_ACTIONS = ("list", "info", "convert", "verify", "fetch")


def commands() -> list[list[str]]:
    cmds = [[]] + [[name] for name in SUBCOMMANDS]
    cmds += [["weights", action] for action in WEIGHTS_ACTIONS]
    return cmds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command; the median is shown (default 3)")
    args = parser.parse_args()
    exe = shutil.which("meddinov3") or sys.exit("meddinov3 is not on PATH (pip install -e .)")
    print(f"{'command':40} {'median s':>9} {'max s':>7}  stderr")
    worst = 0.0
    for cmd in commands():
        times, noise = [], ""
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = subprocess.run([exe, *cmd, "--help"], capture_output=True, text=True, env=dict(os.environ))
            times.append(time.perf_counter() - start)
            if result.returncode != 0:
                noise = f"exit {result.returncode}"
            elif result.stderr.strip():
                lines = result.stderr.strip().splitlines()
                noise = next((line for line in lines if "Warning" in line), lines[-1]).strip()[:70]
        median = statistics.median(times)
        worst = max(worst, median)
        print(f"{'meddinov3 ' + ' '.join(cmd + ['--help']):40} {median:9.2f} {max(times):7.2f}  {noise or '-'}")
    print(f"slowest median: {worst:.2f} s (cores: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
