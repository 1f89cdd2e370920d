"""The trainers' environment knobs: bad values name the variable and the expected type."""
import pytest

from nnunet_meddinov3.training.trainer import _env, _flag


def test_unset_or_empty_gives_the_default(monkeypatch):
    monkeypatch.delenv("MEDDINOV3_EPOCHS", raising=False)
    assert _env("MEDDINOV3_EPOCHS", int, 7) == 7
    monkeypatch.setenv("MEDDINOV3_EPOCHS", "")
    assert _env("MEDDINOV3_EPOCHS", int, 7) == 7
    monkeypatch.setenv("MEDDINOV3_EPOCHS", "3")
    assert _env("MEDDINOV3_EPOCHS", int, 7) == 3


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("MEDDINOV3_EPOCHS", "ten")
    with pytest.raises(ValueError, match=r"MEDDINOV3_EPOCHS='ten' is not a valid int"):
        _env("MEDDINOV3_EPOCHS", int, 7)
    monkeypatch.setenv("MEDDINOV3_FREEZE_ENCODER", "maybe")
    with pytest.raises(ValueError, match=r"MEDDINOV3_FREEZE_ENCODER='maybe' is not a valid boolean"):
        _env("MEDDINOV3_FREEZE_ENCODER", _flag, False)
    monkeypatch.setenv("MEDDINOV3_FREEZE_ENCODER", "yes")
    assert _env("MEDDINOV3_FREEZE_ENCODER", _flag, False) is True


def _configuration(architecture: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    return ConfigurationManager({"architecture": architecture, "patch_size": [64, 64], "batch_size": 2})


# stock nnUNetPlans: a CNN the MedDINOv3 trainers replace with their class defaults
STOCK_ARCHITECTURE = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                      "arch_kwargs": {}, "_kw_requires_import": []}


@pytest.mark.parametrize("plans", ["ours", "stock"])
def test_a_variant_trains_the_network_its_name_says_on_any_plans(plans):
    from nnunet_meddinov3.network.decoders import BottleneckDecoder, MultiScaleAggregationDecoder
    from nnunet_meddinov3.network.meddinov3_net import NETWORK_CLASS_NAME
    from nnunet_meddinov3.training.planner import nnUNetPlannerMedDINOv3
    from nnunet_meddinov3.training.trainer import nnUNetTrainerMedDINOv3_Tiny, nnUNetTrainerMedDINOv3_TinyBottleneck

    if plans == "ours":  # what meddinov3 plan_and_preprocess writes (multi-scale decoder)
        architecture = nnUNetPlannerMedDINOv3.architecture(nnUNetPlannerMedDINOv3.__new__(nnUNetPlannerMedDINOv3))
        assert architecture["network_class_name"] == NETWORK_CLASS_NAME
    else:
        architecture = STOCK_ARCHITECTURE
    for trainer, decoder in ((nnUNetTrainerMedDINOv3_Tiny, MultiScaleAggregationDecoder),
                             (nnUNetTrainerMedDINOv3_TinyBottleneck, BottleneckDecoder)):
        net = trainer.build_network_architecture(None, _configuration(architecture), 1, 3)
        assert type(net.decoder) is decoder and net.encoder.embed_dim == 64


def test_activation_checkpointing_from_the_plans_or_the_environment(monkeypatch):
    """The planner's --grad-checkpointing lands in the plans; MEDDINOV3_GRAD_CHECKPOINTING overrides
    them either way (also on stock plans). Parameters are the same, so prediction is unaffected."""
    import torch

    from nnunet_meddinov3.training.planner import nnUNetPlannerMedDINOv3
    from nnunet_meddinov3.training.trainer import nnUNetTrainerMedDINOv3_Tiny

    planner = nnUNetPlannerMedDINOv3.__new__(nnUNetPlannerMedDINOv3)
    planner.grad_checkpointing = True
    ours = _configuration(planner.architecture())
    stock = _configuration(STOCK_ARCHITECTURE)

    def checkpointing(configuration):
        return nnUNetTrainerMedDINOv3_Tiny.build_network_architecture(None, configuration, 1, 3).encoder.vit.grad_checkpointing

    monkeypatch.delenv("MEDDINOV3_GRAD_CHECKPOINTING", raising=False)
    assert checkpointing(ours) is True and checkpointing(stock) is False
    monkeypatch.setenv("MEDDINOV3_GRAD_CHECKPOINTING", "0")
    assert checkpointing(ours) is False
    monkeypatch.setenv("MEDDINOV3_GRAD_CHECKPOINTING", "1")
    assert checkpointing(stock) is True

    torch.manual_seed(0)
    with_ckpt = nnUNetTrainerMedDINOv3_Tiny.build_network_architecture(None, stock, 1, 3)
    monkeypatch.setenv("MEDDINOV3_GRAD_CHECKPOINTING", "0")
    plain = nnUNetTrainerMedDINOv3_Tiny.build_network_architecture(None, stock, 1, 3)
    plain.load_state_dict(with_ckpt.state_dict())  # strict: the same parameters
    x = torch.randn(2, 1, 32, 32)
    for net in (with_ckpt, plain):
        net.eval()  # no drop path: both runs compute the same function
        net(x).square().mean().backward()
    for (name, a), (_, b) in zip(with_ckpt.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_cpu_bf16_knob_reaches_the_network(monkeypatch):
    from nnunet_meddinov3.training.trainer import nnUNetTrainerMedDINOv3_Tiny

    stock = _configuration(STOCK_ARCHITECTURE)
    monkeypatch.delenv("MEDDINOV3_CPU_BF16", raising=False)
    assert not nnUNetTrainerMedDINOv3_Tiny.build_network_architecture(None, stock, 1, 3).cpu_autocast
    monkeypatch.setenv("MEDDINOV3_CPU_BF16", "1")
    monkeypatch.setattr("nnunet_meddinov3.network.meddinov3_net.cpu_has_native_bf16", lambda: True)
    assert nnUNetTrainerMedDINOv3_Tiny.build_network_architecture(None, stock, 1, 3).cpu_autocast
