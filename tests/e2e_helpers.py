"""Helpers shared by the end-to-end tests (they drive the real console scripts in subprocesses).

A module of its own rather than tests/conftest.py: test modules cannot import from conftest.py,
because pytest imports tests/conftest.py and tests/pretrain/conftest.py both as the top-level module
``conftest`` (the folders are not packages), so ``from conftest import ...`` gets whichever came last.
"""
from __future__ import annotations

import subprocess


def run(cmd, env, cwd, expect_ok=True, timeout=600) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``env`` in ``cwd``; unless ``expect_ok`` is False a non-zero exit fails the test
    with the command and the tails of its stdout and stderr."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc
