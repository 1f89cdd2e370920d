"""DINOHead: reference DINOv3 key names and shapes, strict load of MedDINOv3-layout teacher heads."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.heads import DINOHead

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "meddino_tiny_teacher.pth"


@pytest.fixture(scope="module")
def teacher_state() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)["teacher"]


def head_state(teacher_state, prefix):
    return {k[len(prefix) :]: v for k, v in teacher_state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("prefix", ["dino_head.", "ibot_head."])
def test_reference_heads_load_strictly(teacher_state, prefix):
    state = head_state(teacher_state, prefix)
    head = DINOHead(in_dim=64, out_dim=32, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    assert set(head.state_dict()) == set(state)
    head.load_state_dict(state, strict=True)

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    hidden = F.gelu(F.linear(x, state["mlp.0.weight"], state["mlp.0.bias"]))
    hidden = F.gelu(F.linear(hidden, state["mlp.2.weight"], state["mlp.2.bias"]))
    bottleneck = F.normalize(F.linear(hidden, state["mlp.4.weight"], state["mlp.4.bias"]), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(head(x), bottleneck @ state["last_layer.weight"].T)
        torch.testing.assert_close(head(x, no_last_layer=True), bottleneck)
        torch.testing.assert_close(head(bottleneck, only_last_layer=True), head(x))


def test_default_shapes_are_the_recipe_heads():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DINOHead(768).state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 768),
        "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048),
        "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048),
        "mlp.4.bias": (256,),
        "last_layer.weight": (65536, 256),
    }


def test_normalized_prototypes_keep_keys_and_use_unit_rows(teacher_state):
    state = head_state(teacher_state, "dino_head.")
    head = DINOHead(64, out_dim=32, hidden_dim=32, bottleneck_dim=16, normalize_prototypes=True)
    head.load_state_dict(state, strict=True)
    bottleneck = F.normalize(torch.randn(3, 16), dim=-1)
    expected = bottleneck @ F.normalize(state["last_layer.weight"], dim=-1).T
    with torch.no_grad():
        torch.testing.assert_close(head(bottleneck, only_last_layer=True), expected)


def test_single_layer_head():
    head = DINOHead(8, out_dim=5, bottleneck_dim=4, nlayers=1)
    assert set(head.state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight"}
    assert head(torch.randn(2, 8)).shape == (2, 5)
