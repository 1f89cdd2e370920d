"""LoRA adapters (nnunet_meddinov3/network/lora.py, peft) and the trainers' lora_* recipe keys."""
import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the 'lora' extra (pip install 'nnunet-meddinov3[lora]')")

from nnunet_meddinov3.network import ENCODER_CONFIGS, MedDINOv3Net, build_encoder, lora  # noqa: E402
from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D  # noqa: E402
from nnunet_meddinov3.training import recipe  # noqa: E402
from nnunet_meddinov3.training.recipe import RecipeError  # noqa: E402
from test_trainer_env import make_trainer, nnunet_folders  # noqa: E402,F401  (the tiny real-trainer fixture)

SMALL = dict(embed_dim=64, depth=2, num_heads=4)
# every kind of block: MedDINOv3 (no qkv bias), official (q bias: the fused F.linear path), SwiGLU, SwiGLU64 without
# qkv bias; the large layouts at a tiny size
LAYOUTS = [(name, {}) for name in sorted(ENCODER_CONFIGS) if "tiny" in name] + [
    (name, SMALL) for name in ("vits16plus", "vit7b16") if name in ENCODER_CONFIGS]
# A changed output is one far above fp32 rounding: features are O(1) after the final LayerNorm and
# the float error of a 4-block, 64-wide forward is ~1e-6; a rank-2 adapter with B ~ 0.1 moves them ~1e-1.
MOVED = 1e-3
SAME = 1e-5  # qkv(x) + bias instead of F.linear(x, W, bias): same sum, other rounding (~1e-7 per op)


def _encoder(name, seed=0, **overrides):
    torch.manual_seed(seed)
    encoder = build_encoder(name, in_channels=1, **overrides).eval()
    for block in encoder.vit.blocks:  # layer scale 1e-5 would hide every branch's change under rounding
        block.gamma_1.data.fill_(1.0)
        block.gamma_2.data.fill_(1.0)
    return encoder


def _features(encoder, x):
    with torch.no_grad():
        return torch.cat([f.flatten() for f in encoder.forward_tokens(x).values()])


@pytest.mark.parametrize("name,overrides", LAYOUTS, ids=[name for name, _ in LAYOUTS])
def test_every_adapter_changes_the_output(name, overrides):
    """With the official layout's q bias timm computes F.linear(x, qkv.weight, bias) and would skip a
    wrapped qkv: each adapter alone must move the output."""
    encoder = _encoder(name, **overrides)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = _features(encoder, x)
    lora.add_lora(encoder, rank=2, alpha=2.0, targets="qkv,proj,mlp")
    assert (_features(encoder, x) - plain).abs().max() < SAME  # B = 0: unchanged until trained
    layers = lora.adapter_layers(encoder)
    assert len(layers) == len(lora.target_layer_names(_encoder(name, **overrides).vit, "qkv,proj,mlp")) >= 4 * encoder.depth
    for layer_name, layer in layers.items():
        b = layer.lora_B["default"].weight
        with torch.no_grad():
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(2)))
        moved = (_features(encoder, x) - plain).abs().max().item()
        with torch.no_grad():
            b.zero_()
        assert moved > MOVED, f"the adapter of {layer_name} does not change the output ({moved:.2e})"


def test_without_routing_the_q_bias_path_skips_a_wrapped_qkv():
    """Why route_qkv_through_module exists (timm's behaviour this project adapts to)."""
    import peft

    encoder = _encoder("tiny")
    assert encoder.vit.blocks[0].attn.q_bias is not None
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = _features(encoder, x)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["blocks.0.attn.qkv"]), encoder.vit)
    with torch.no_grad():
        encoder.vit.blocks[0].attn.qkv.lora_B["default"].weight.fill_(0.1)
    assert torch.equal(_features(encoder, x), plain)


def test_base_frozen_adapters_trainable_and_counted():
    encoder = _encoder("meddinov3_tiny")
    lora.add_lora(encoder, rank=4, alpha=8.0, targets="qkv,proj")
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    d = encoder.config.embed_dim
    assert lora.parameter_counts(encoder)["trainable"] == encoder.depth * 4 * ((d + 3 * d) + (d + d))
    assert lora.add_lora(encoder, rank=4, alpha=8.0, targets="proj,qkv") is encoder.lora  # idempotent
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(encoder, rank=8, alpha=8.0, targets="qkv,proj")
    assert set(lora.base_parameters(encoder)) == set(dict(_encoder("meddinov3_tiny").named_parameters()))


def test_targets_parse_the_same_in_the_recipe_and_the_network():
    assert recipe.LORA_TARGET_NAMES == lora.TARGETS
    assert recipe.parse_assignments(["lora_targets=mlp, qkv"], "x") == {"lora_targets": "qkv,mlp"}
    with pytest.raises(RecipeError, match="lora_targets='q' is not a valid comma-separated subset"):
        recipe.parse_assignments(["lora_targets=q"], "x")
    with pytest.raises(ValueError, match="subset of qkv, proj, mlp"):
        lora.parse_targets("ffn")


@pytest.mark.parametrize("name, network, shape", [("tiny", MedDINOv3Net, (1, 1, 48, 48)),
                                                  ("meddinov3_tiny", MedDINOv3Net, (1, 1, 48, 48)),
                                                  ("meddinov3_tiny", MedDINOv3Net3D, (1, 1, 3, 48, 48))])
def test_a_plain_network_loads_an_adapted_one_merged(name, network, shape):
    """What nnUNetv2_predict does: the plans' network (no adapters) loads a LoRA checkpoint strictly; the
    3D network's slice context, outside the encoder, gets no adapters."""
    torch.manual_seed(0)
    adapted = network(1, 3, encoder=name).eval()
    lora.add_lora(adapted.encoder, rank=4, alpha=8.0, targets="qkv,proj,mlp")
    for layer in lora.adapter_layers(adapted.encoder).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    state = adapted.state_dict()
    assert "encoder.vit.blocks.0.attn.qkv.base_layer.weight" in state and "encoder.lora._extra_state" in state
    assert not any("lora_" in key for key in state if not key.startswith("encoder."))
    plain = lora.merge_adapters_on_load(network(1, 3, encoder=name)).eval()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # one rank-4 product folded into W: each weight differs by rounding only (~1e-7 relative)
        assert torch.allclose(plain(x), adapted(x), rtol=1e-4, atol=1e-4)
    merged = lora.merged_state_dict(state)
    assert set(merged) == set(plain.state_dict())
    # an adapted network of other settings refuses the checkpoint rather than compute something else
    other = lora.merge_adapters_on_load(network(1, 3, encoder=name))
    lora.add_lora(other.encoder, rank=4, alpha=4.0, targets="qkv,proj,mlp")
    with pytest.raises(ValueError, match="trained with"):
        other.load_state_dict(state)


def test_pretrained_weights_load_into_the_base_layers(fixtures):
    from nnunet_meddinov3.checkpoints import load_encoder_weights

    reference = build_encoder("meddinov3_tiny", in_channels=1)
    load_encoder_weights(reference, fixtures / "meddino_tiny_teacher.pth")
    encoder = build_encoder("meddinov3_tiny", in_channels=1)
    lora.add_lora(encoder, rank=2, alpha=2.0, targets="qkv,mlp")
    with lora.plain_view(encoder) as plain:
        load_encoder_weights(plain, fixtures / "meddino_tiny_teacher.pth")
    assert lora.adapter_layers(encoder) and encoder.lora.rank == 2
    base = lora.base_parameters(encoder)
    assert all(torch.equal(base[k], v) for k, v in reference.named_parameters())


def test_trainer_recipe_keys_on_every_variant(nnunet_folders, monkeypatch):
    assert make_trainer().lora_rank == 0
    variant = make_trainer("nnUNetTrainerMedDINOv3_LoRA")
    assert (variant.lora_rank, variant.lora_alpha, variant.lora_targets) == (8, recipe.LORA_ALPHA, "qkv,proj")
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "lora_rank=0")
    with pytest.raises(RecipeError, match="_LoRA is defined by LoRA adapters"):
        make_trainer("nnUNetTrainerMedDINOv3_LoRA")
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "lora_rank=4 lora_targets=mlp")
    trainer = make_trainer()
    assert trainer.my_init_kwargs[recipe.CHECKPOINT_KEY]["values"]["lora_rank"] == 4
    trainer.initialize()
    encoder = trainer.network.encoder
    assert encoder.lora.targets == ("mlp",)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in trainer.network.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in lora.base_parameters(encoder).values())
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "lora_rank=4")
    with pytest.raises(RecipeError, match="freeze_encoder=true trains the decoder only"):
        make_trainer("nnUNetTrainerMedDINOv3_FrozenEncoder")


def test_without_peft_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if not installed
    with pytest.raises(lora.LoRAUnavailable, match=r"pip install 'nnunet-meddinov3\[lora\]'"):
        lora.add_lora(_encoder("meddinov3_tiny"), rank=8, alpha=16.0, targets="qkv")


def test_merge_lora_refuses_a_run_without_adapters():
    from nnunet_meddinov3.training.lora_export import merged_encoder_state

    plain = MedDINOv3Net(1, 2, encoder="meddinov3_tiny").state_dict()
    with pytest.raises(ValueError, match="no LoRA adapters.*lora_rank=0"):
        merged_encoder_state(plain)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapters_and_decoder_get_gradients_the_base_none(checkpointing):
    torch.manual_seed(0)
    network = MedDINOv3Net(1, 2, encoder="meddinov3_tiny", grad_checkpointing=checkpointing).train()
    lora.add_lora(network.encoder, rank=2, alpha=2.0, targets="qkv,proj,mlp")
    for layer in lora.adapter_layers(network.encoder).values():  # B = 0 would leave A without a gradient
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    network(torch.randn(1, 1, 32, 32)).square().mean().backward()
    grads = {n: p.grad for n, p in network.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().max() > 0 for n in grads if ".lora_" in n)
    assert all(g is not None for n, g in grads.items() if n.startswith("decoder."))
    assert all(grads[n] is None for n in grads if n.startswith("encoder.") and ".lora_" not in n)
