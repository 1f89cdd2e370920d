"""Gradient accumulation computes Meta's whole-batch step: N micro-steps of B images (on one process
or spread over two gloo ranks) equal one step of N x B images in the losses, the collapse
statistics, every gradient and the updated student and teacher, because the teacher is centred
over the whole global batch (pretrain/engine/teacher_targets.py).

Tolerances: both sides run the same fp32 arithmetic with batch reductions in another order
(Sinkhorn-Knopp sums over 16 rows, means over 8 images, DDP's average of two ranks). Each
reordering moves a value by a few ulps (~1e-7 relative); through a 4-block ViT's backward that
stays far below 1e-4 relative, the bound used for gradients. AdamW's update divides by
sqrt(v) + eps: at the first step a weight moves by lr * g / (|g| + 1e-8), which is well posed only
where |g| >= 1e-6; there the updated student and teacher must agree within 1e-3 x lr.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest
from pretrain_synthetic import ct_volume, write_nifti

from pretrain.configs import load_config
from pretrain.losses.ibot import masks_weight
from pretrain.engine.data import build_loader
from pretrain.engine.distributed import init_distributed
from pretrain.engine.loop import Trainer
from pretrain.engine.teacher_targets import MICRO_BATCH

IMAGES, GROUP = 8, 2  # one step over 8 images; micro-batches (and KoLeo groups) of 2
ITERATION = 5  # after tiny_stage1's LR warm-up and last-layer freeze: every group updates
CROPS = ("global_crops", "local_crops")
LOSSES = ("dino_loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "total_loss")
# the DINO head's, over the whole batch (the iBOT head's come from the first micro-batch alone)
STATISTICS = ("teacher_entropy", "teacher_sample_entropy", "teacher_logit_std", "feature_std")


def split_batch(batch: dict, size: int) -> list[dict]:
    """A crop-major collated batch (pretrain/data/collate.py) as micro-batches of ``size`` images."""
    n = batch["global_crops"].shape[0] // 2
    parts = []
    for first in range(0, n, size):
        part = {}
        for key in (*CROPS, "masks"):
            crops = batch[key].unflatten(0, (-1, n))  # (n_crops, n, ...)
            part[key] = crops[:, first:first + size].flatten(0, 1)
        masks = part["masks"]
        part.update(mask_indices=masks.flatten().nonzero().flatten(), masks_weight=masks_weight(masks),
                    n_masked_patches=torch.tensor(int(masks.sum())))
        parts.append(part)
    return parts


def _config(data: dict, *overrides: str):
    return load_config("tiny_stage1", [f"data.roots=[{data['root']}]", f"data.cache_dir={data['cache']}",
                                       "model.drop_path_rate=0.0", "train.iterations=20", *overrides])


def _step(trainer: Trainer, micro_batches: list[dict]) -> dict:
    """One optimiser step; the gradients as the optimiser sees them (after clipping, DDP's average)."""
    grads = {}

    def keep_gradients(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.student.named_parameters() if p.grad is not None})

    handle = trainer.optimizer.register_step_pre_hook(keep_gradients)
    metrics = trainer.train_iteration(ITERATION, iter(micro_batches))
    handle.remove()
    return {"metrics": metrics, "grads": grads,
            "student": {k: v.detach().clone() for k, v in trainer.student.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()}}


def _trainer(config, run_dir) -> Trainer:
    trainer = Trainer(config, run_dir, init_distributed())
    trainer.setup()
    return trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(30 + i))
    return {"root": root, "cache": tmp_path_factory.mktemp("slice_cache")}


@pytest.fixture(scope="module")
def whole_batch_step(data, tmp_path_factory):
    """The reference: one step over all 8 images, KoLeo within groups of 2 (what each micro-step sees)."""
    torch.set_num_threads(1)
    trainer = _trainer(_config(data, f"data.batch_size={IMAGES}", f"loss.koleo_group_size={GROUP}"),
                       tmp_path_factory.mktemp("whole"))
    loader = build_loader(trainer.config, trainer.slices, 0, 1, 1, ITERATION, ITERATION + 1, pin_memory=False,
                          patch_size=trainer.student.encoder.patch_size)
    batch = next(iter(loader))
    assert int(batch["masks"].any(-1).sum()) >= 4  # masked crops in several micro-batches: iBOT is exercised
    return batch, _step(trainer, [batch])


def _assert_same_step(step: dict, reference: dict, keys: tuple[str, ...], lr: float) -> None:
    for key in keys:
        assert step["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5, abs=1e-6), key
    assert step["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(step["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=name)
    for part in ("student", "teacher"):
        for name, value in reference[part].items():
            # AdamW's first step moves a weight by lr * g / (|g| + 1e-8): for |g| >= 1e-6 a 1e-4 relative
            # change of g moves it by < 1e-6 lr, below that it is a sign and ill-conditioned: not compared
            grad = reference["grads"].get(name)
            well_posed = grad.abs() >= 1e-6 if grad is not None else torch.ones_like(value, dtype=torch.bool)
            torch.testing.assert_close(step[part][name][well_posed], value[well_posed], rtol=0, atol=1e-3 * lr,
                                       msg=f"{part} {name}")


def test_micro_steps_on_one_process_equal_the_whole_batch_step(data, whole_batch_step, tmp_path):
    batch, reference = whole_batch_step
    trainer = _trainer(_config(data, f"data.batch_size={GROUP}", f"optim.global_batch_size={IMAGES}"), tmp_path)
    assert trainer.accumulation == IMAGES // GROUP
    step = _step(trainer, split_batch(batch, GROUP))
    lr = reference["metrics"]["lr"]
    assert lr > 0 and step["metrics"]["lr"] == lr
    _assert_same_step(step, reference, LOSSES + STATISTICS, lr)


def test_centring_each_micro_batch_alone_is_another_step(data, whole_batch_step, tmp_path):
    """The option that saves the memory (loss.centre_over=micro_batch) centres 4 rows at a time: the
    DINO targets, and so the loss, differ from the whole batch's."""
    batch, reference = whole_batch_step
    config = _config(data, f"data.batch_size={GROUP}", f"optim.global_batch_size={IMAGES}",
                     f"loss.centre_over={MICRO_BATCH}")
    step = _step(_trainer(config, tmp_path), split_batch(batch, GROUP))
    assert step["metrics"]["koleo_loss"] == pytest.approx(reference["metrics"]["koleo_loss"], rel=1e-5)
    assert abs(step["metrics"]["dino_loss"] - reference["metrics"]["dino_loss"]) > 1e-4


def _rank_worker(rank: int, world: int, init_file: str, data: dict, parts: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = _config(data, f"data.batch_size={GROUP}", f"optim.global_batch_size={IMAGES}")
        trainer = _trainer(config, f"{out}/run")
        assert trainer.accumulation == IMAGES // (GROUP * world)
        # the global stream's order: micro-step m of rank r holds part m * world + r
        mine = [parts[m * world + rank] for m in range(trainer.accumulation)]
        step = _step(trainer, mine)
        if rank == 0:
            torch.save(step, f"{out}/step.pt")
    finally:
        dist.destroy_process_group()


def test_micro_steps_on_two_gloo_ranks_equal_the_whole_batch_step(data, whole_batch_step, tmp_path):
    batch, reference = whole_batch_step
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), data, split_batch(batch, GROUP), str(tmp_path)),
             nprocs=world, join=True)
    step = torch.load(tmp_path / "step.pt", weights_only=False)
    # the statistics are each rank's, averaged: not the whole batch's
    _assert_same_step(step, reference, LOSSES, reference["metrics"]["lr"])
