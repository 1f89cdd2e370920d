"""Student/teacher networks: masked-token forward, EMA, released weights, and the Gram teacher."""

import pytest
import torch

from nnunet_meddinov3.network.encoder import build_encoder
from pretrain.configs import load_config
from pretrain.losses import GramLoss
from pretrain.model import (
    MaskableBackbone,
    build_gram_teacher,
    build_student_and_teacher,
    copy_teacher_into_gram,
    gram_teacher_patch_features,
    load_released_weights,
    update_ema,
)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return load_config("tiny_stage1").model


def test_unmasked_forward_is_the_encoder_forward():
    encoder = build_encoder("meddinov3_tiny").eval()
    backbone = MaskableBackbone(encoder).eval()
    x = torch.randn(2, 1, 64, 48)
    ours, reference = backbone(x), encoder.forward_tokens(x)
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=0)


def test_masked_patches_are_replaced_before_the_blocks():
    torch.manual_seed(0)
    backbone = MaskableBackbone(build_encoder("meddinov3_tiny")).eval()
    backbone.mask_token.data.normal_()
    x = torch.randn(2, 1, 64, 64)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5]] = True  # patches (0, 0) and (1, 1) of image 0
    changed = x.clone()
    changed[0, :, 0:16, 0:16] += 5.0  # only inside the masked patches
    changed[0, :, 16:32, 16:32] -= 3.0
    with torch.no_grad():
        a, b = backbone(x, masks), backbone(changed, masks)
        unmasked = backbone(x)
    torch.testing.assert_close(a["x_norm_patchtokens"], b["x_norm_patchtokens"], rtol=0, atol=0)
    assert not torch.allclose(a["x_norm_patchtokens"][0], unmasked["x_norm_patchtokens"][0])
    torch.testing.assert_close(a["x_norm_patchtokens"][1], unmasked["x_norm_patchtokens"][1], rtol=0, atol=0)


def test_student_outputs_and_teacher_copy(tiny):
    student, teacher = build_student_and_teacher(tiny)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    for (name, s), (_, t) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(s, t), name
    assert student.encoder.config.drop_path_rate == tiny.drop_path_rate
    assert teacher.encoder.config.drop_path_rate == 0.0
    b = 3
    masks = torch.zeros(2 * b, 16, dtype=torch.bool)
    masks[1, :4] = True
    indices = masks.flatten().nonzero().flatten()
    out = student(torch.randn(2 * b, 1, 64, 64), torch.randn(4 * b, 1, 32, 32), masks, indices)
    k = tiny.dino_head.prototypes
    assert out["dino_global"].shape == (2 * b, k) and out["dino_local"].shape == (4 * b, k)
    assert out["ibot_masked"].shape == (4, tiny.ibot_head.prototypes)
    assert out["cls"].shape == (2 * b, 64) and out["patch"].shape == (2 * b, 16, 64)


def _rope_scale(rope, grid: int) -> torch.Tensor:
    """The coordinate scale behind a RoPE table, read from its largest period, whose angles stay
    small enough to invert: (2, H*W) per-axis scale of every position."""
    table = rope.get_embed([grid, grid]).float()
    quarter = rope.dim // 4  # sin: [h periods, w periods] tiled twice, then cos likewise
    sin_h, sin_w = table[:, quarter - 1], table[:, 2 * quarter - 1]
    coords = (torch.arange(grid) + 0.5) / grid * 2 - 1
    coords_h, coords_w = torch.meshgrid(coords, coords, indexing="ij")
    period = rope.periods[-1].float()
    return torch.stack([torch.asin(sin_h) * period / (2 * torch.pi) / coords_h.flatten(),
                        torch.asin(sin_w) * period / (2 * torch.pi) / coords_w.flatten()])


def test_rope_rescaling_scales_both_axes_by_one_log_uniform_factor_in_training_only():
    torch.manual_seed(0)
    rope = build_encoder("tiny").vit.rope  # fp32 RoPE, so the scale can be read back
    rope.set_coordinate_rescaling(2.0)
    rope.eval()
    torch.testing.assert_close(_rope_scale(rope, 4), torch.ones(2, 16), rtol=0, atol=1e-4)
    rope.train()
    scales = []
    for _ in range(200):
        scale = _rope_scale(rope, 4)
        torch.testing.assert_close(scale, scale[0, 0].expand(2, 16), rtol=1e-3, atol=1e-4)  # one factor
        scales.append(scale[0, 0].item())
    scales = torch.tensor(scales)
    assert 0.5 - 1e-3 <= scales.min() and scales.max() <= 2 + 1e-3
    # log-uniform on [-log 2, log 2]: as many draws shrink as stretch, and both ends are reached
    assert 70 < (scales < 1).sum() < 130 and scales.min() < 0.6 and scales.max() > 1.7
    rope.set_coordinate_rescaling(None)
    torch.testing.assert_close(_rope_scale(rope, 4), torch.ones(2, 16), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=">= 1"):
        rope.set_coordinate_rescaling(0.5)


def test_rescaled_rope_changes_the_student_not_the_teacher():
    # layer scale 1: with the recipe's 1e-5 the random blocks barely touch the tokens
    config = load_config("tiny_stage3_highres", ["model.drop_path_rate=0", "model.layer_scale_init=1.0"]).model
    assert config.rope_rescale_coords == 2.0
    torch.manual_seed(0)
    student, teacher = build_student_and_teacher(config)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = student.backbone(x), student.backbone(x)
        assert not torch.allclose(a["x_norm_patchtokens"], b["x_norm_patchtokens"])
        t1, t2 = teacher.backbone(x), teacher.backbone(x)
        torch.testing.assert_close(t1["x_norm_patchtokens"], t2["x_norm_patchtokens"], rtol=0, atol=0)
        student.eval()  # same weights, no augmentation: the teacher's output
        torch.testing.assert_close(student.backbone(x)["x_norm_patchtokens"], t1["x_norm_patchtokens"],
                                   rtol=0, atol=0)


def test_ema_update(tiny):
    student, teacher = build_student_and_teacher(tiny)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    update_ema(teacher, student, 0.9)
    for name, s in student.named_parameters():
        torch.testing.assert_close(dict(teacher.named_parameters())[name], 0.9 * before[name] + 0.1 * s.detach())


def _to_reference_layout(encoder_state: dict) -> dict:
    """Our encoder keys -> Meta's DinoVisionTransformer keys (MedDINOv3 layout: no qkv bias)."""
    out = {}
    for key, value in encoder_state.items():
        key = key.removeprefix("vit.").replace("reg_token", "storage_tokens")
        key = key.replace("rope.periods", "rope_embed.periods")
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value
    return out


def test_released_training_checkpoint_loads_with_heads_and_mask_token(tiny, tmp_path):
    source, _ = build_student_and_teacher(tiny)
    with torch.no_grad():
        source.backbone.mask_token.normal_()
    backbone = _to_reference_layout(source.encoder.state_dict())
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher["backbone.mask_token"] = source.backbone.mask_token.detach().clone()
    teacher.update({f"dino_head.{k}": v for k, v in source.dino_head.state_dict().items()})
    teacher.update({f"ibot_head.{k}": v for k, v in source.ibot_head.state_dict().items()})
    path = tmp_path / "meddinov3_like.pth"
    torch.save({"teacher": teacher}, path)

    torch.manual_seed(1)
    target, _ = build_student_and_teacher(tiny)
    info = load_released_weights(target, str(path))
    assert info["heads_loaded"] and info["mask_token_loaded"] and info["layout"] == "dinov3_training"
    assert "DINOv3 License" in info["licence"]
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name

    # Meta's hub layout: backbone and mask token, no heads
    hub = dict(backbone, mask_token=teacher["backbone.mask_token"])
    torch.save(hub, tmp_path / "hub.pth")
    info = load_released_weights(build_student_and_teacher(tiny)[0], str(tmp_path / "hub.pth"))
    assert not info["heads_loaded"] and info["mask_token_loaded"] and info["layout"] == "dinov3_reference"



def test_released_weights_are_read_once_and_mismatches_name_the_file(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    from nnunet_meddinov3.checkpoints import CheckpointMetadata, CheckpointMismatchError, write_checkpoint

    source, _ = build_student_and_teacher(tiny)
    encoder_state = source.encoder.state_dict()
    reads = []
    torch_load, load_file = torch.load, safetensors.torch.load_file
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or torch_load(f, *a, **k))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda f, *a, **k: reads.append(f) or load_file(f, *a, **k))

    hub = tmp_path / "hub.pth"
    torch.save(_to_reference_layout(encoder_state), hub)
    reads.clear()
    info = load_released_weights(build_student_and_teacher(tiny)[0], str(hub))
    assert reads == [hub] and info["layout"] == "dinov3_reference"

    ours = tmp_path / "ours.safetensors"
    write_checkpoint(ours, encoder_state, CheckpointMetadata(
        architecture=source.encoder.config.to_dict(), in_channels=1, licence="test licence",
        stages=[{"name": "stage1", "iterations": 2}]))
    reads.clear()
    target = build_student_and_teacher(tiny)[0]
    info = load_released_weights(target, str(ours))
    assert reads == [str(ours)] and info["layout"] == "meddinov3" and info["licence"] == "test licence"
    assert info["stages"] == [{"name": "stage1", "iterations": 2}] and not info["heads_loaded"]
    for key, value in encoder_state.items():
        assert torch.equal(target.encoder.state_dict()[key], value), key

    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in _to_reference_layout(encoder_state).items() if k != "cls_token"}, broken)
    with pytest.raises(CheckpointMismatchError, match="broken.pth") as error:
        load_released_weights(build_student_and_teacher(tiny)[0], str(broken))
    assert "cls_token" in str(error.value)

def test_gram_teacher_reads_patch_tokens_from_the_dict_key(tiny):
    """The known upstream bug: the Gram target must be the Gram teacher's *patch* features
    (``forward_tokens(x)["x_norm_patchtokens"]``), resized to the student's grid."""
    student, teacher = build_student_and_teacher(tiny)
    gram = build_gram_teacher(tiny)
    copy_teacher_into_gram(gram, teacher)
    with torch.no_grad():  # make the features differ image to image and between networks
        for p in list(gram.parameters()) + list(student.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    crops = torch.randn(4, 1, 128, 128)  # the Gram teacher sees 2x the student's 64 px crop
    target = gram_teacher_patch_features(gram, crops, (4, 4))

    expected_tokens = gram.forward_tokens(crops)["x_norm_patchtokens"]  # (4, 64, D): an 8 x 8 grid
    expected = torch.nn.functional.interpolate(
        expected_tokens.unflatten(1, (8, 8)).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(target, expected)
    assert target.shape == (4, 16, 64)

    student_patch = student.backbone(torch.nn.functional.avg_pool2d(crops, 2))["x_norm_patchtokens"]
    loss = GramLoss()(student_patch, target)
    assert loss.item() > 1e-6  # nonzero
    # and it depends on the Gram teacher's patch features: changing them changes the loss
    with torch.no_grad():
        for p in gram.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed = GramLoss()(student_patch, gram_teacher_patch_features(gram, crops, (4, 4)))
    assert changed.item() != pytest.approx(loss.item())
    # a copy of the teacher into the Gram teacher is exact
    copy_teacher_into_gram(gram, teacher)
    for name, p in gram.named_parameters():
        assert torch.equal(p, dict(teacher.encoder.named_parameters())[name])
