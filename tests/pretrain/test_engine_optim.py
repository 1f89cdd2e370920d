"""Schedules (pure functions of the iteration), parameter groups, clipping, head warm-up, monitors."""

import math

import pytest
import torch

from pretrain.configs import available_configs, load_config
from pretrain.engine.head_warmup import HeadWarmup
from pretrain.engine.monitors import CollapseMonitor, collapse_statistics
from pretrain.model import build_student_and_teacher
from pretrain.optim import (
    Schedules,
    apply_schedules,
    build_optimizer,
    clip_gradients,
    cosine_rise_constant,
    layer_id,
    warmup_cosine,
)


def test_schedules_of_stage1():
    config = load_config("vitb16_stage1")
    s = Schedules(config, 512)
    total, warmup = config.train.iterations, config.optim.warmup_iterations
    peak = 1e-3 * 4 * math.sqrt(512 / 1024)
    # Meta's CosineScheduler warm-up is np.linspace(0, peak, warmup): the peak at step warmup - 1
    assert s.lr(0) == 0 and s.lr(6000) == pytest.approx(peak * 6000 / (warmup - 1))
    assert s.lr(warmup - 1) == pytest.approx(peak) and s.lr(warmup) == pytest.approx(peak)
    assert s.lr(total) == pytest.approx(1e-6) and s.lr(total + 10) == pytest.approx(1e-6)
    assert s.lr((warmup + total) // 2) == pytest.approx((peak + 1e-6) / 2, rel=1e-4)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(total) == pytest.approx(0.4)
    assert s.weight_decay(total // 2) == pytest.approx(0.22)
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(total) == pytest.approx(1.0)
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(37499) == pytest.approx(0.07)
    assert s.teacher_temp(20000) == pytest.approx(0.04 + 0.03 * 20000 / 37499) and s.teacher_temp(37500) == 0.07
    assert s.last_layer_frozen(1249) and not s.last_layer_frozen(1250)
    assert s.gram_weight(5) == 0.0 and s.local_dino_weight(5) == 1.0
    # pure: the same iteration gives the same values whatever came before
    assert s.at(4321) == Schedules(config, 512).at(4321)


def test_schedules_of_gram_and_high_res_stages():
    g = Schedules(load_config("vitb16_stage2_gram"), 512)
    # Meta's linear_warmup_cosine_decay cosine, cos(linspace(0, pi, 1000)): the end value on step 999
    assert g.gram_weight(0) == 0.0 and g.gram_weight(999) == g.gram_weight(1000) == 2.0
    assert g.gram_weight(500) == pytest.approx(1.0 - math.cos(math.pi * 500 / 999))
    assert g.local_dino_weight(0) == 1.0 and g.local_dino_weight(999) == g.local_dino_weight(1000) == 0.5
    assert g.lr(1000) == g.lr(20000) == pytest.approx(3e-5 * 4 * math.sqrt(0.5))
    h = Schedules(load_config("vitb16_stage3_highres"), 128)
    # Meta's linear_warmup_cosine_decay: (1 - cos(linspace(0, pi, rise))) / 2, the peak on step rise - 1
    assert h.lr(0) == 0.0 and h.lr(1699 // 2) == pytest.approx(h.peak_lr / 2, rel=1e-3)
    assert h.lr(1698) < h.lr(1699) == h.lr(4999) == h.peak_lr
    assert cosine_rise_constant(10, 1.0, 0) == 1.0 and warmup_cosine(5, 1.0, 0.0, 0, 10) == pytest.approx(0.5)
    # the Gram stage's warm-up (linspace(0, peak, W, endpoint=False)) reaches the peak only at W
    assert g.lr(0) == 0.0 and g.lr(500) == pytest.approx(g.peak_lr / 2) and g.lr(999) < g.peak_lr == g.lr(1000)


def test_layer_ids_of_every_parameter():
    """Embeddings and learned tokens 0, block i i + 1, the final norm and the heads depth + 1."""
    student, _ = build_student_and_teacher(load_config("tiny_stage1").model)
    depth = student.encoder.depth
    by_layer = {}
    for name, _ in student.named_parameters():
        by_layer.setdefault(layer_id(name, depth), set()).add(name)
    assert sorted(by_layer) == list(range(depth + 2))
    assert by_layer[0] == {"backbone.mask_token", "backbone.encoder.vit.cls_token", "backbone.encoder.vit.reg_token",
                           "backbone.encoder.vit.patch_embed.proj.weight", "backbone.encoder.vit.patch_embed.proj.bias"}
    for i in range(depth):
        assert by_layer[i + 1] and all(n.startswith(f"backbone.encoder.vit.blocks.{i}.") for n in by_layer[i + 1])
    assert all(n.startswith(("dino_head.", "ibot_head.", "backbone.encoder.vit.norm.")) for n in by_layer[depth + 1])
    assert {n.split(".")[0] for n in by_layer[depth + 1]} == {"dino_head", "ibot_head", "backbone"}

def test_parameter_groups_layer_decay_and_no_weight_decay():
    config = load_config("tiny_stage1")
    student, _ = build_student_and_teacher(config.model)
    depth = student.encoder.depth
    optimizer = build_optimizer(student, config.optim, depth)
    settings = {name: g for g in optimizer.param_groups for name in g["names"]}
    assert set(settings) == {n for n, _ in student.named_parameters()}
    decay = config.optim.layerwise_decay
    assert settings["backbone.encoder.vit.blocks.3.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(decay)
    assert settings["backbone.encoder.vit.blocks.0.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(decay**4)
    assert settings["backbone.encoder.vit.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(decay**5 * 0.2)
    assert settings["backbone.encoder.vit.norm.weight"]["lr_multiplier"] == 1.0
    assert settings["dino_head.mlp.weight"]["lr_multiplier"] == 1.0
    assert layer_id("backbone.encoder.vit.cls_token", depth) == 0
    for name in ("backbone.encoder.vit.blocks.1.norm1.weight", "backbone.encoder.vit.blocks.1.gamma_1",
                 "dino_head.mlp.bias"):
        assert settings[name]["wd_multiplier"] == 0.0, name
    # Meta decays the learned tokens (its rule matches only biases, norms and layer scales)
    for name in ("backbone.encoder.vit.blocks.1.attn.qkv.weight", "backbone.encoder.vit.cls_token",
                 "backbone.encoder.vit.reg_token", "backbone.mask_token"):
        assert settings[name]["wd_multiplier"] == 1.0, name
    spared = build_optimizer(student, load_config("tiny_stage1", ["optim.weight_decay_on_tokens=false"]).optim, depth)
    spared = {name: g["wd_multiplier"] for g in spared.param_groups for name in g["names"]}
    assert {n for n, wd in spared.items() if wd != settings[n]["wd_multiplier"]} == {
        "backbone.encoder.vit.cls_token", "backbone.encoder.vit.reg_token", "backbone.mask_token"}
    assert settings["ibot_head.last_layer.weight"]["is_last_layer"]
    assert not settings["backbone.mask_token"]["is_backbone"]  # trains with the heads in the warm-up

    apply_schedules(optimizer, lr=1.0, weight_decay=0.5, last_layer_frozen=True, backbone_factor=0.0)
    for name, group in settings.items():
        frozen = group["is_backbone"] or group["is_last_layer"]
        assert (group["lr"] == 0) == frozen, name
        assert group["weight_decay"] == 0.5 * group["wd_multiplier"]
    apply_schedules(optimizer, lr=1.0, weight_decay=0.5, last_layer_frozen=False, backbone_factor=0.5)
    assert settings["dino_head.last_layer.weight"]["lr"] == 1.0
    assert settings["backbone.encoder.vit.norm.weight"]["lr"] == 0.5


def test_gradients_are_clipped_per_sub_network():
    student, _ = build_student_and_teacher(load_config("tiny_stage1").model)
    for p in student.parameters():
        p.grad = torch.full_like(p, 10.0)
    norms = clip_gradients(student, 3.0)
    assert set(norms) == {"backbone", "dino_head", "ibot_head"} and all(n > 3 for n in norms.values())
    for part in ("backbone", "dino_head", "ibot_head"):
        grads = [p.grad for p in getattr(student, part).parameters()]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(3.0, rel=1e-4)


def test_head_warmup_fixed_and_plateau():
    config = load_config("tiny_stage1", ["head_warmup.iterations=3", "head_warmup.backbone_warmup_iterations=2"])
    fixed = HeadWarmup(config.head_warmup, active=True)
    factors = []
    for it in range(6):
        factors.append(fixed.backbone_factor(it))
        fixed.observe(it, 5.0)
    assert factors == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert HeadWarmup(config.head_warmup, active=False).backbone_factor(0) == 1.0

    plateau = HeadWarmup(load_config("tiny_stage1", ["head_warmup.plateau_window=2",
                                                     "head_warmup.plateau_tolerance=0.01"]).head_warmup, True)
    losses = [8.0, 7.0, 6.0, 5.0, 4.99, 4.98, 4.98, 4.98]
    messages = [plateau.observe(i, v) for i, v in enumerate(losses)]
    unfrozen_at = next(i for i, m in enumerate(messages) if m)
    # windows of 2: (5.0, 4.99) -> (4.98, 4.98) is the first improvement under 1 %
    assert unfrozen_at == 6 and "settled" in messages[6] and plateau.unfreeze_iteration == 7
    restored = HeadWarmup(plateau.config, True)
    restored.load_state_dict(plateau.state_dict())
    assert restored.backbone_factor(7) == plateau.backbone_factor(7)


def test_collapse_statistics_and_monitor():
    torch.manual_seed(0)
    spread = collapse_statistics(torch.randn(64, 32), torch.randn(64, 256), 0.1)
    same = collapse_statistics(torch.ones(64, 32), torch.zeros(64, 256).index_fill_(1, torch.tensor([3]), 50.0), 0.1)
    assert spread["feature_std"] > 0.5 and same["feature_std"] < 1e-6
    assert spread["teacher_entropy"] > 0.8 and same["teacher_entropy"] < 0.01

    monitor = CollapseMonitor(load_config("tiny_stage1", ["monitor.min_feature_std=0.1", "monitor.patience=2"]).monitor)
    assert monitor.update(0, {"feature_std": 0.0}) is None
    message = monitor.update(1, {"feature_std": 0.0})
    assert "collapse" in message and "feature_std" in message
    assert monitor.update(2, {"feature_std": 1.0}) is None and monitor.streak == 0


def test_uniform_collapse_monitor_needs_uniform_targets_and_a_loss_at_ln_k():
    config = load_config("tiny_stage1", ["monitor.patience=3"]).monitor
    log_k = math.log(256)
    uniform = {"teacher_sample_entropy": 0.999, "dino_loss": log_k + 1e-4, "teacher_logit_std": 3e-4,
               "teacher_ibot_logit_std": 1e-3, "feature_std": 0.5}
    learning = dict(uniform, dino_loss=0.9 * log_k)  # targets still soft, but the student has left ln K
    sharp = dict(uniform, teacher_sample_entropy=0.6)
    not_yet = dict(uniform, teacher_logit_std=0.015)  # at ln K, but the head keeps its spread: still learning
    # DINO flat while the iBOT head still learns: a DINO collapse all the same (issue 21; per head:
    # tests/pretrain/test_collapse_monitors.py)
    patches_learn = dict(uniform, teacher_ibot_logit_std=0.02)

    monitor = CollapseMonitor(config, n_prototypes=256, default_start=5)  # start_iteration null: the warm-up end
    assert [monitor.update(i, uniform) for i in range(5)] == [None] * 5 and monitor.streak == 0
    assert monitor.update(5, uniform) is None and monitor.update(6, uniform) is None
    message = monitor.update(7, uniform)
    assert "uniform collapse" in message and "ln K = 5.5452" in message and "teacher_logit_std 0.0003" in message
    assert "DINO head" in message
    assert "optim.freeze_last_layer_iterations" in message  # says what to try
    for healthy in (learning, sharp, not_yet):
        assert monitor.violations(healthy) == []
    assert [name for name, _ in monitor.violations(patches_learn)] == ["uniform_dino"]
    assert monitor.update(8, learning) is None and monitor.streak == 0


def test_monitors_are_on_by_default_in_every_packaged_config():
    for name in available_configs():
        monitor = load_config(name).monitor
        assert monitor.max_teacher_sample_entropy is not None and monitor.uniform_loss_margin is not None, name
        assert monitor.min_feature_std is not None, name
