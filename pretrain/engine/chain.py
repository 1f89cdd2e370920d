"""A chain of stages in one command: each stage starts from the previous stage's last checkpoint.

Stage ``i`` runs in ``OUTPUT/<i>_<config name>/``; all stages share one slice cache
(``OUTPUT/slice_cache`` unless ``data.cache_dir`` is set). ``gram.teacher: previous`` (the
previous stage's last teacher) and ``previous@N`` (its checkpoint at iteration N, kept by
``train.keep_every``) are resolved here. With ``resume``, finished stages are skipped and the
first unfinished one continues from its latest checkpoint. A distillation stage (``stage: distillation``) starts
a new student, taught by ``distill.teacher`` (``--teacher``), by default the previous stage's EMA teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..configs import load_config
from ..configs.schema import DISTILLATION
from . import checkpoint as ckpt
from .distill import distill
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .loop import train
from .run_record import FINISHED, RunResult, read_run_status


def stage_dirs(output: str | Path, configs: Sequence[str]) -> list[Path]:
    return [Path(output) / f"{i + 1:02d}_{Path(name).stem}" for i, name in enumerate(configs)]


def split_overrides(overrides: Sequence[str], n_stages: int) -> list[list[str]]:
    """``key=value`` applies to every stage, ``K:key=value`` to stage K (1-based) only."""
    per_stage: list[list[str]] = [[] for _ in range(n_stages)]
    for item in overrides:
        head, sep, rest = item.partition(":")
        if sep and head.isdigit() and "=" not in head:
            k = int(head)
            if not 1 <= k <= n_stages:
                raise ValueError(f"override '{item}' names stage {k}; the chain has {n_stages} stages")
            per_stage[k - 1].append(rest)
        else:
            for stage in per_stage:
                stage.append(item)
    return per_stage


def resolve_previous(reference: str, previous_dir: Path) -> str:
    """'previous' -> the previous stage's last checkpoint; 'previous@N' -> its checkpoint at N."""
    if reference == "previous":
        latest = ckpt.latest_checkpoint(previous_dir)
        if latest is None:
            raise FileNotFoundError(f"the previous stage ({previous_dir}) has no checkpoint")
        return str(latest)
    iteration = int(reference.partition("@")[2])
    path = ckpt.checkpoint_path(previous_dir, iteration)
    if not path.is_file():
        kept = [i for i, _ in ckpt.list_checkpoints(previous_dir)]
        raise FileNotFoundError(
            f"gram.teacher '{reference}': {path} does not exist; the previous stage kept iterations {kept}. "
            "Keep it with train.keep_every in that stage, or name another one")
    return str(path)


def run_chain(configs: Sequence[str], output: str | Path, overrides: Sequence[str] = (), resume: bool = False,
              context: DistributedContext | None = None) -> list[RunResult]:
    """Run the stages in order; stops at the first stage that does not finish."""
    own_context = context is None
    context = context or init_distributed()
    output = Path(output)
    results: list[RunResult] = []
    try:
        previous: Path | None = None
        for run_dir, name, stage_overrides in zip(stage_dirs(output, configs), configs,
                                                  split_overrides(overrides, len(configs))):
            status = read_run_status(run_dir)
            if resume and status is not None and status["status"] == FINISHED:
                results.append(RunResult(run_dir, FINISHED, status["iteration"],
                                         Path(status["checkpoint"]) if status["checkpoint"] else None, "already done"))
                previous = run_dir
                continue
            extra = []
            config = load_config(name, stage_overrides)
            if config.stage == DISTILLATION:  # a new student: the stage before (if any) is its teacher by default
                if previous is not None and config.distill.teacher in (None, "previous"):
                    extra.append(f"distill.teacher={previous.resolve()}")
            elif previous is not None:
                extra.append(f"init.checkpoint={ckpt.latest_checkpoint(previous)}")
            config = load_config(name, [*stage_overrides, *extra])
            if config.gram.enabled and config.gram.teacher.startswith("previous"):
                if previous is None:
                    raise ValueError(f"stage '{name}' takes its Gram teacher from the previous stage, but it is first")
                extra.append(f"gram.teacher={resolve_previous(config.gram.teacher, previous)}")
                config = load_config(name, [*stage_overrides, *extra])
            runner = distill if config.stage == DISTILLATION else train
            result = runner(config, run_dir, resume=resume, context=context,
                            cache_dir=config.data.cache_dir or output / "slice_cache")
            results.append(result)
            if result.status != FINISHED:
                break
            previous = run_dir
        return results
    finally:
        if own_context:
            shutdown_distributed(context)
