"""Helpers shared by the end-to-end tests (they drive the real console scripts in subprocesses).

A module of its own rather than tests/conftest.py: test modules cannot import from conftest.py,
because pytest imports tests/conftest.py and tests/pretrain/conftest.py both as the top-level module
``conftest`` (the folders are not packages), so ``from conftest import ...`` gets whichever came last.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


def isolated_nnunet_env(root: Path, **extra: str) -> dict:
    """This process's environment without the user's nnU-Net and MEDDINOV3 settings, with nnU-Net's three
    folders under ``root`` (raw, pre, res), one process for nnU-Net's pools and one OpenMP thread, then
    ``extra`` on top.

    nnUNetv2_predict's own defaults (``-npp 3 -nps 3``) spawn up to five workers, each importing torch and
    nnU-Net, to predict two tiny cases: on a 2-core CI machine that is most of a prediction's time.
    nnUNet_npp/nnUNet_nps=1 keep its multiprocessing path (``-npp 0 -nps 0`` would switch to another,
    sequential one) with one worker each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet", "MEDDINOV3"))}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_def_n_proc="1", nnUNet_npp="1", nnUNet_nps="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run(cmd, env, cwd, expect_ok=True, timeout=600) -> subprocess.CompletedProcess:
    """Run ``cmd`` with ``env`` in ``cwd``; unless ``expect_ok`` is False a non-zero exit fails the test
    with the command and the tails of its stdout and stderr."""
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def planned_synthetic_dataset(root: Path, dataset_id: int, name: str, plan_command: list, *, num_train: int,
                              num_test: int, shape: tuple) -> dict:
    """A synthetic CT dataset written to ``root``/raw and planned and preprocessed by ``plan_command`` (a
    console script), in an :func:`isolated_nnunet_env`: ``{"root", "env"}``."""
    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset

    write_nnunet_raw_dataset(root / "raw", dataset_id, name=name, num_train=num_train, num_test=num_test, shape=shape)
    env = isolated_nnunet_env(root, MEDDINOV3_CACHE=str(root / "cache"))
    run(plan_command, env, root)
    return {"root": root, "env": env}


STOCK_CT_DATASET = 501


def stock_planned_ct(root: Path) -> dict:
    """Dataset501_SyntheticCT (6 training cases, 2 test cases of 5 x 64 x 64) in ``root``/raw, planned and
    preprocessed by the stock ``nnUNetv2_plan_and_preprocess -c 2d``: ``{"root", "raw", "env", "id", "name"}``,
    ``env`` an :func:`isolated_nnunet_env` with its caches under ``root``."""
    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset

    raw = write_nnunet_raw_dataset(root / "raw", STOCK_CT_DATASET, num_train=6, num_test=2, shape=(5, 64, 64))
    env = isolated_nnunet_env(root, MEDDINOV3_CACHE=str(root / "cache"))
    run(["nnUNetv2_plan_and_preprocess", "-d", str(STOCK_CT_DATASET), "-c", "2d", "-np", "1"], env, root)
    return {"root": root, "raw": raw, "env": env, "id": STOCK_CT_DATASET, "name": raw.name}
