"""Losses of pretrain/ against hand-computed values and invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import (
    DINOLoss,
    GramLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    dino_term_weights,
    masks_weight,
    resize_patch_features,
    sinkhorn_knopp,
    teacher_temperature,
)


def cross_entropy(teacher: list[float], student_logits: list[float], temp: float = 0.1) -> float:
    """-sum_k t_k log softmax(s / temp)_k, written out in plain Python."""
    exps = [math.exp(s / temp) for s in student_logits]
    return -sum(t * math.log(e / sum(exps)) for t, e in zip(teacher, exps))


# --- Sinkhorn-Knopp ---------------------------------------------------------------------------


def test_sinkhorn_rows_are_distributions_and_columns_balance():
    logits = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    assert q.shape == (24, 6) and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(dim=1), torch.ones(24))
    torch.testing.assert_close(q.sum(dim=0), torch.full((6,), 24 / 6), rtol=0.2, atol=0)
    converged = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 4.0), rtol=1e-4, atol=0)


def test_sinkhorn_spreads_identical_samples_uniformly():
    # Every sample prefers prototype 0; balancing the prototypes leaves each sample uniform.
    q = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), teacher_temp=0.1)
    torch.testing.assert_close(q, torch.full((2, 2), 0.5))


def test_sinkhorn_balanced_input_is_a_softmax():
    # Columns already balanced: the result is the row softmax of logits / temp.
    logits = torch.tensor([[0.3, 0.0], [0.0, 0.3]])
    p = math.exp(3.0) / (math.exp(3.0) + 1)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1), torch.tensor([[p, 1 - p], [1 - p, p]]))


def test_sinkhorn_is_finite_where_exp_would_overflow():
    # exp(10 / 0.04) overflows float32; the result only depends on logit differences.
    logits = 10 + 0.1 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    q = sinkhorn_knopp(logits, teacher_temp=0.04)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(q, sinkhorn_knopp(logits - 10, teacher_temp=0.04))


# --- DINO -------------------------------------------------------------------------------------


def test_teacher_temperature_schedule():
    # Meta's np.linspace(0.04, 0.07, 100): 0.07 from step 99 on
    assert teacher_temperature(0, 100) == pytest.approx(0.04)
    assert teacher_temperature(33, 100) == pytest.approx(0.05)
    assert teacher_temperature(99, 100) == pytest.approx(0.07)
    assert teacher_temperature(100, 100) == pytest.approx(0.07)
    assert teacher_temperature(0, 1) == pytest.approx(0.04) and teacher_temperature(1, 1) == pytest.approx(0.07)
    assert teacher_temperature(10_000, 100) == pytest.approx(0.07)
    assert teacher_temperature(5, 0) == pytest.approx(0.07)


def test_dino_term_weights_recipe():
    assert dino_term_weights(2, 8) == pytest.approx((2 / 18, 16 / 18))
    assert dino_term_weights(2, 8, ignore_diagonal=False) == pytest.approx((4 / 20, 16 / 20))


def test_dino_loss_two_global_crops_by_hand():
    s = [[1.0, 0.0, -1.0], [0.2, 0.5, 0.1]]  # student logits of crops 0 and 1 (batch of 1)
    t = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]  # teacher probabilities of crops 0 and 1
    student, teacher = torch.tensor(s)[:, None], torch.tensor(t)[:, None]
    loss = DINOLoss(out_dim=3)

    cross = {(i, j): cross_entropy(t[j], s[i]) for i in range(2) for j in range(2)}
    off_diagonal = (cross[0, 1] + cross[1, 0]) / 2
    assert loss(student, teacher, ignore_diagonal=True).item() == pytest.approx(off_diagonal, rel=1e-5)
    assert loss(student, teacher).item() == pytest.approx(sum(cross.values()) / 4, rel=1e-5)


def test_dino_loss_global_and_local_terms():
    g = torch.Generator().manual_seed(2)
    student_global, student_local = torch.randn(2, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    loss = DINOLoss(out_dim=5)
    teacher = loss.teacher_probs(torch.randn(2, 4, 5, generator=g), teacher_temp=0.07)
    assert teacher.shape == (2, 4, 5)
    global_term, local_term = loss.global_and_local(student_global, student_local, teacher)

    log_p = F.log_softmax(student_global / 0.1, dim=-1)
    expected_global = -((log_p[0] * teacher[1]).sum() + (log_p[1] * teacher[0]).sum()) / (2 * 4)
    log_q = F.log_softmax(student_local / 0.1, dim=-1)
    expected_local = -sum((log_q[i] * teacher[j]).sum() for i in range(3) for j in range(2)) / (6 * 4)
    torch.testing.assert_close(global_term, expected_global)
    torch.testing.assert_close(local_term, expected_local)


def test_dino_loss_gradient_reaches_student_only():
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher_logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = DINOLoss(out_dim=4)
    loss(student, loss.teacher_probs(teacher_logits, 0.04), ignore_diagonal=True).backward()
    assert student.grad is not None and teacher_logits.grad is None


# --- iBOT -------------------------------------------------------------------------------------


def test_ibot_loss_weights_each_image_by_its_masked_count():
    masks = torch.tensor(
        [
            [True, False, False, False],  # 1 masked patch: weight 1
            [False, True, True, False],  # 2 masked patches: weight 1/2 each
            [False, False, False, False],  # unmasked image: counts in the average, adds nothing
        ]
    )
    torch.testing.assert_close(masks_weight(masks), torch.tensor([1.0, 0.5, 0.5]))
    s = [[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    t = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]
    ce = [cross_entropy(t[m], s[m]) for m in range(3)]
    expected = (ce[0] / 1 + (ce[1] + ce[2]) / 2) / 3
    loss = IBOTPatchLoss(patch_out_dim=2)(torch.tensor(s), torch.tensor(t), masks)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_teacher_probs_over_all_masked_patches():
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(3))
    probs = IBOTPatchLoss(patch_out_dim=7).teacher_probs(logits, teacher_temp=0.07)
    torch.testing.assert_close(probs, sinkhorn_knopp(logits, 0.07))


# --- KoLeo ------------------------------------------------------------------------------------


def test_koleo_square_on_circle():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = -math.log(math.sqrt(2))  # every nearest neighbour at chord sqrt(2)
    assert KoLeoLoss()(points).item() == pytest.approx(expected, abs=1e-6)
    assert KoLeoLoss()(5 * points).item() == pytest.approx(expected, abs=1e-6)  # L2-normalised first


def test_koleo_uneven_points():
    # Angles 0, 60, 180 degrees: nearest-neighbour chords 1, 1 and sqrt(3).
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    points = torch.stack([angles.cos(), angles.sin(), torch.zeros(3)], dim=1)
    assert KoLeoLoss()(points).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


def test_koleo_gradient_finite_for_duplicates():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# --- Gram -------------------------------------------------------------------------------------


def test_gram_loss_by_hand():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # Gram: identity
    teacher = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])  # normalised Gram: all ones
    assert GramLoss()(student, teacher).item() == pytest.approx(0.5)


def test_gram_loss_zero_for_identical_and_scale_invariant():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 9, 6, generator=g), torch.randn(2, 9, 6, generator=g)
    gram = GramLoss()
    assert gram(student, student).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(gram(3 * student, teacher), gram(student, teacher))
    batch_level = GramLoss(img_level=False)(student, teacher)
    assert batch_level.shape == () and batch_level.item() > 0


def test_gram_loss_no_gradient_to_teacher():
    student = torch.randn(1, 4, 3, requires_grad=True)
    teacher = torch.randn(1, 4, 3, requires_grad=True)
    GramLoss()(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_resize_patch_features_channels_last_bicubic():
    features = torch.randn(2, 8, 8, 5, generator=torch.Generator().manual_seed(5))
    resized = resize_patch_features(features, (4, 4))
    assert resized.shape == (2, 4, 4, 5)
    expected = F.interpolate(features.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected.permute(0, 2, 3, 1))
    constant = torch.full((1, 6, 6, 3), 2.5)
    torch.testing.assert_close(resize_patch_features(constant, (3, 3)), torch.full((1, 3, 3, 3), 2.5))
