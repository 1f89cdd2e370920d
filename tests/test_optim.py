import pytest
import torch

from nnunet_meddinov3.network import MedDINOv3Net
from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D
from nnunet_meddinov3.training.optim import WarmupLinearDecayLR, build_adamw, encoder_layer_id, parameter_groups


@pytest.fixture()
def net():
    return MedDINOv3Net(1, 2, encoder="tiny")


def test_two_groups_with_paper_lrs(net):
    groups = parameter_groups(net, encoder_lr=3e-5, decoder_lr=3e-4, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["decoder", "encoder_level5"]
    assert groups[0]["lr"] == 3e-4 and groups[1]["lr"] == 3e-5
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)


def test_layer_wise_decay(net):
    groups = parameter_groups(net, encoder_lr=1e-4, decoder_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    depth = 4
    assert lrs[f"encoder_level{depth + 1}"] == pytest.approx(1e-4)   # final norm
    assert lrs[f"encoder_level{depth}"] == pytest.approx(0.5e-4)     # last block
    assert lrs["encoder_level1"] == pytest.approx(1e-4 * 0.5 ** 4)   # first block
    assert lrs["encoder_level0"] == pytest.approx(1e-4 * 0.5 ** 5)   # embeddings
    assert encoder_layer_id("vit.blocks.2.attn.qkv.weight", 4) == 3
    assert encoder_layer_id("vit.patch_embed.proj.weight", 4) == 0


def test_frozen_encoder_gets_no_group_and_no_grad(net):
    groups = parameter_groups(net, encoder_lr=1e-4, decoder_lr=1e-3, weight_decay=0.05, freeze_encoder=True)
    assert [g["name"] for g in groups] == ["decoder"]
    assert not any(p.requires_grad for p in net.encoder.parameters())
    net(torch.randn(1, 1, 32, 32)).sum().backward()
    assert net.encoder.vit.cls_token.grad is None


def test_schedule_warmup_then_linear_to_zero(net):
    opt = torch.optim.AdamW(parameter_groups(net, encoder_lr=1e-4, decoder_lr=1e-3, weight_decay=0.05))
    sched = WarmupLinearDecayLR(opt, total_epochs=10, warmup_epochs=2)
    seen = []
    for epoch in range(10):
        sched.step(epoch)
        seen.append(sched.get_last_lr())
    assert seen[0] == pytest.approx([1e-3 / 3, 1e-4 / 3])
    assert seen[1] == pytest.approx([2e-3 / 3, 2e-4 / 3])
    assert seen[2] == pytest.approx([1e-3, 1e-4])
    assert seen[6] == pytest.approx([0.5e-3, 0.5e-4])
    assert seen[9][0] == pytest.approx(1e-3 / 8)
    sched.step(10)
    assert sched.get_last_lr() == [0.0, 0.0]
    no_warmup = WarmupLinearDecayLR(opt, total_epochs=4)
    assert [no_warmup.factor(e) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_fused_adamw_makes_the_same_update_as_the_plain_one():
    torch.manual_seed(0)
    nets = [MedDINOv3Net(1, 3, encoder="tiny") for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    kwargs = dict(encoder_lr=1e-3, decoder_lr=1e-2, weight_decay=0.05, layer_decay=0.8)
    fused = build_adamw(parameter_groups(nets[0], **kwargs))
    plain = torch.optim.AdamW(parameter_groups(nets[1], **kwargs), betas=(0.9, 0.98), foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(2, 1, 32, 32)
    for _ in range(3):
        for net, opt in ((nets[0], fused), (nets[1], plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_3d_networks_slice_context_trains_with_the_decoder():
    # the new parts of a network (decoder, slice context) are one group at the decoder's LR; none is left out
    network = MedDINOv3Net3D(1, 2, encoder="tiny")
    groups = parameter_groups(network, encoder_lr=1e-4, decoder_lr=1e-3, weight_decay=0.05)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in network.parameters()}
    new_parts = {id(p) for p in network.decoder.parameters()} | {id(p) for p in network.slice_context.parameters()}
    assert {id(p) for p in groups[0]["params"]} == new_parts and groups[0]["lr"] == 1e-3
