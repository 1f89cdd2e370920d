import pytest
import torch
import torch.nn.functional as F

from nnunet_meddinov3.network import ChannelLayerNorm2d, MedDINOv3Net


@pytest.mark.parametrize("decoder", ["multiscale", "single", "bottleneck"])
@pytest.mark.parametrize("hw", [(64, 64), (40, 70), (17, 33)])
def test_any_input_size_gives_full_resolution_logits(decoder, hw):
    net = MedDINOv3Net(1, 4, encoder="tiny", decoder=decoder)
    out = net(torch.randn(2, 1, *hw))
    assert out.shape == (2, 4, *hw) and out.dtype == torch.float32


def test_padding_does_not_leak_into_the_crop_shape_only():
    net = MedDINOv3Net(1, 2, encoder="tiny").eval()
    x = torch.randn(1, 1, 40, 40)
    padded = F.pad(x, (0, 8, 0, 8))
    with torch.no_grad():
        assert torch.equal(net(x), net(padded)[..., :40, :40])


def test_decoder_widths_follow_the_paper():
    net = MedDINOv3Net(1, 3, encoder="vitb16")
    stack = net.decoder.upsample.stages
    assert [s[0].in_channels for s in stack] == [3072, 1536, 768, 384]
    assert net.decoder.upsample.seg_head.in_channels == 192
    assert net.feature_layers == (2, 5, 8, 11)
    assert 24e6 < sum(p.numel() for p in net.decoder.parameters()) < 26e6
    single = MedDINOv3Net(1, 3, encoder="vitb16", decoder="single")
    assert single.feature_layers == (11,) and single.decoder.upsample.seg_head.in_channels == 48
    bottleneck = MedDINOv3Net(1, 3, encoder="vitb16", decoder="bottleneck")
    assert sum(p.numel() for p in bottleneck.decoder.parameters()) < 4e6


def test_channel_layernorm_equals_layernorm_over_channels():
    x = torch.randn(2, 8, 5, 7)
    norm = ChannelLayerNorm2d(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        ref = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None] + norm.bias[:, None, None]
        assert torch.allclose(norm(x), ref, atol=1e-5)


def test_multichannel_input_and_training_step():
    net = MedDINOv3Net(3, 2, encoder="tiny", feature_layers=[1, 3], drop_path_rate=0.1)
    out = net(torch.randn(2, 3, 32, 48))
    out.mean().backward()
    assert net.encoder.vit.patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError, match="expects 3 input channel"):
        net(torch.randn(1, 1, 32, 32))


def test_invalid_hyperparameters_are_explained():
    with pytest.raises(ValueError, match="no deep supervision"):
        MedDINOv3Net(1, 2, encoder="tiny", deep_supervision=True)
    with pytest.raises(ValueError, match="unknown decoder"):
        MedDINOv3Net(1, 2, encoder="tiny", decoder="unet")
    with pytest.raises(ValueError, match="out of range"):
        MedDINOv3Net(1, 2, encoder="tiny", feature_layers=[7])


def test_network_is_built_from_hyperparameters_only():
    a, b = MedDINOv3Net(1, 2, encoder="tiny"), MedDINOv3Net(1, 2, encoder="tiny")
    b.load_state_dict(a.state_dict(), strict=True)  # same parameter set whatever the seed
