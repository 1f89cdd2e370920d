"""The trainers' environment knobs and their recipe as data (real nnU-Net trainers on a tiny plans)."""
import hashlib

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
import torch

from nnunet_meddinov3.training import recipe
from nnunet_meddinov3.training.recipe import RecipeError
from nnunet_meddinov3.training.trainer import _env, _flag, nnUNetTrainerMedDINOv3_Tiny


def test_machine_settings_unset_or_empty_give_the_default(monkeypatch):
    monkeypatch.delenv("MEDDINOV3_CPU_BF16", raising=False)
    assert _env("MEDDINOV3_CPU_BF16", _flag, False) is False
    monkeypatch.setenv("MEDDINOV3_CPU_BF16", "")
    assert _env("MEDDINOV3_CPU_BF16", _flag, False) is False
    monkeypatch.setenv("MEDDINOV3_CPU_BF16", "yes")
    assert _env("MEDDINOV3_CPU_BF16", _flag, False) is True
    monkeypatch.setenv("MEDDINOV3_CPU_BF16", "maybe")
    with pytest.raises(ValueError, match=r"MEDDINOV3_CPU_BF16='maybe' is not a valid boolean"):
        _env("MEDDINOV3_CPU_BF16", _flag, False)


def test_recipe_assignments_are_typed_and_bad_ones_say_what_is_wrong():
    assert recipe.parse_assignments(["epochs=300", "encoder_lr=5e-5", "freeze_encoder=yes"], "--recipe") == {
        "epochs": 300, "encoder_lr": 5e-5, "freeze_encoder": True}
    with pytest.raises(RecipeError, match=r"--recipe: unknown recipe key 'epoch'\. Known keys: epochs, "):
        recipe.parse_assignments(["epoch=3"], "--recipe")
    with pytest.raises(RecipeError, match=r"--recipe: epochs='ten' is not a valid integer >= 1"):
        recipe.parse_assignments(["epochs=ten"], "--recipe")
    with pytest.raises(RecipeError, match=r"layer_decay='1.5' is not a valid number in \(0, 1\]"):
        recipe.parse_assignments(["layer_decay=1.5"], "--recipe")
    with pytest.raises(RecipeError, match=r"'epochs' is not KEY=VALUE"):
        recipe.parse_assignments(["epochs"], "--recipe")
    # a plans block holds JSON values
    assert recipe.parse_plans_block({"freeze_encoder": True, "epochs": 3}, "plans") == {"freeze_encoder": True,
                                                                                       "epochs": 3}


def test_override_and_legacy_variables(monkeypatch):
    environ = {"MEDDINOV3_RECIPE_OVERRIDE": "epochs=3 encoder_lr=1e-4", "MEDDINOV3_EPOCHS": "9",
               "MEDDINOV3_ITERATIONS": "2"}
    override = recipe.EnvironmentOverride(environ)
    assert override.values() == {"epochs": 3, "iterations": 2, "encoder_lr": 1e-4}  # the explicit one wins
    assert override.source("epochs") == "MEDDINOV3_RECIPE_OVERRIDE"
    assert override.source("iterations") == "MEDDINOV3_ITERATIONS (legacy)"
    notice = override.legacy_notice()
    assert "MEDDINOV3_EPOCHS, MEDDINOV3_ITERATIONS are replaced by" in notice
    assert "MEDDINOV3_RECIPE_OVERRIDE='iterations=2'" in notice and "--recipe" in notice
    with pytest.raises(RecipeError, match="MEDDINOV3_RECIPE_OVERRIDE: unknown recipe key 'lr'"):
        recipe.EnvironmentOverride({"MEDDINOV3_RECIPE_OVERRIDE": "lr=1"})
    with pytest.raises(RecipeError, match="MEDDINOV3_FREEZE_ENCODER: freeze_encoder='maybe' is not a valid boolean"):
        recipe.EnvironmentOverride({"MEDDINOV3_FREEZE_ENCODER": "maybe"})


# --- real nnU-Net trainers on a tiny hand-written plans (no data is read: initialize() only needs the
# preprocessed folder to exist with one file, to pick nnU-Net's dataset class) ---------------------------------

DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
                "file_ending": ".nii.gz"}


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    for variable in ["MEDDINOV3_RECIPE_OVERRIDE", "MEDDINOV3_WEIGHTS", *recipe.LEGACY_ENV]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    data = tmp_path / "preprocessed" / "Dataset999_Tiny" / "nnUNetPlans_2d"
    data.mkdir(parents=True)
    (data / "case_000.b2nd").touch()
    return tmp_path


def tiny_plans(block=None, plans_name="nnUNetPlans", continue_training=False):
    configuration = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": 2, "patch_size": [32, 32], "median_image_size_in_voxels": [64, 64],
                     "spacing": [1.0, 1.0], "normalization_schemes": ["CTNormalization"],
                     "use_mask_for_norm": [False], "architecture": STOCK_ARCHITECTURE, "batch_dice": True}
    if block is not None:
        configuration[recipe.PLANS_KEY] = block
    return {"dataset_name": "Dataset999_Tiny", "plans_name": plans_name, "configurations": {"2d": configuration},
            "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [5, 64, 64],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
            "continue_training": continue_training}


def make_trainer(cls_name="nnUNetTrainerMedDINOv3_Tiny", block=None, **kwargs):
    from nnunet_meddinov3.training import trainer as trainers

    return getattr(trainers, cls_name)(tiny_plans(block, **kwargs), "2d", 0, dict(DATASET_JSON),
                                       device=torch.device("cpu"))


def test_recipe_from_class_then_plans_then_override(nnunet_folders, monkeypatch):
    stock = make_trainer()  # stock plans: the class defaults
    assert (stock.num_epochs, stock.num_iterations_per_epoch, stock.encoder_lr) == (20, 25, 3e-4)
    assert set(stock.recipe_sources.values()) == {"trainer nnUNetTrainerMedDINOv3_Tiny"}
    planned = make_trainer(block={"epochs": 7, "encoder_lr": 5e-5}, plans_name="nnUNetPlansMedDINOv3_short")
    assert (planned.num_epochs, planned.encoder_lr, planned.decoder_lr) == (7, 5e-5, 1e-3)
    assert planned.recipe_sources["epochs"] == "plans nnUNetPlansMedDINOv3_short/2d"
    assert planned.output_folder_base.endswith("nnUNetTrainerMedDINOv3_Tiny__nnUNetPlansMedDINOv3_short__2d")
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "epochs=3")
    overridden = make_trainer(block={"epochs": 7})
    assert overridden.num_epochs == 3 and overridden.recipe_sources["epochs"] == "MEDDINOV3_RECIPE_OVERRIDE"
    # recorded where nnU-Net's save_checkpoint takes it from
    assert overridden.my_init_kwargs[recipe.CHECKPOINT_KEY]["values"]["epochs"] == 3
    baseline = make_trainer("nnUNetTrainerShortSchedule")
    assert (baseline.num_epochs, baseline.num_iterations_per_epoch) == (3, 25)
    with pytest.raises(RecipeError, match=r"unknown recipe key 'encoder_lr'.*Known keys: epochs, iterations, "
                                          r"val_iterations"):
        make_trainer("nnUNetTrainerShortSchedule", block={"encoder_lr": 1e-4})


def test_a_variant_cannot_be_overridden_into_its_opposite(nnunet_folders, monkeypatch):
    with pytest.raises(RecipeError, match=r"nnUNetTrainerMedDINOv3_FrozenEncoder is defined by a frozen encoder.*"
                                          r"freeze_encoder=false from plans nnUNetPlans/2d"):
        make_trainer("nnUNetTrainerMedDINOv3_FrozenEncoder", block={"freeze_encoder": False})
    monkeypatch.setenv("MEDDINOV3_FREEZE_ENCODER", "0")  # the example, through the legacy variable
    with pytest.raises(RecipeError, match=r"freeze_encoder=false from MEDDINOV3_FREEZE_ENCODER \(legacy\)"):
        make_trainer("nnUNetTrainerMedDINOv3_FrozenEncoder")
    monkeypatch.delenv("MEDDINOV3_FREEZE_ENCODER")
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "layer_decay=1")
    with pytest.raises(RecipeError, match=r"_LLRD is defined by layer-wise LR decay"):
        make_trainer("nnUNetTrainerMedDINOv3_LLRD")
    monkeypatch.delenv("MEDDINOV3_RECIPE_OVERRIDE")
    assert make_trainer("nnUNetTrainerMedDINOv3_FrozenEncoder", block={"freeze_encoder": True}).freeze_encoder
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", "meddinov3-vitb16-ct3m")
    scratch = make_trainer("nnUNetTrainerMedDINOv3_Scratch")
    with pytest.raises(RecipeError, match=r"_Scratch trains from random initialisation, but MEDDINOV3_WEIGHTS"):
        scratch.weights_source()


def _trained_checkpoint(tmp_path, block=None, epoch=2):
    """A real checkpoint written by nnU-Net's save_checkpoint, as after ``epoch`` epochs."""
    trainer = make_trainer(block=block)
    trainer.initialize()
    trainer.current_epoch = epoch - 1
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    return path


def test_resume_restores_the_recipe_and_refuses_a_changed_one(nnunet_folders, monkeypatch):
    checkpoint = _trained_checkpoint(nnunet_folders, block={"epochs": 7})
    stored = torch.load(checkpoint, weights_only=False)["init_args"][recipe.CHECKPOINT_KEY]
    assert stored["values"]["epochs"] == 7 and stored["sources"]["epochs"] == "plans nnUNetPlans/2d"

    resumed = make_trainer(block={"epochs": 7}, continue_training=True)
    resumed.load_checkpoint(checkpoint)
    assert resumed.num_epochs == 7 and resumed.current_epoch == 2

    changed = make_trainer(block={"epochs": 9, "encoder_lr": 1e-4}, continue_training=True)
    with pytest.raises(RecipeError) as refused:
        changed.load_checkpoint(checkpoint)
    message = str(refused.value)
    assert "epochs: checkpoint epochs=7 (plans nnUNetPlans/2d), now epochs=9 (plans nnUNetPlans/2d)" in message
    assert "encoder_lr: checkpoint encoder_lr=0.0003 (trainer nnUNetTrainerMedDINOv3_Tiny), now encoder_lr=0.0001" \
        in message
    assert "MEDDINOV3_RECIPE_OVERRIDE='epochs=9 encoder_lr=0.0001'" in message

    monkeypatch.setenv("MEDDINOV3_EPOCHS", "9")  # a legacy variable cannot change a recorded value
    with pytest.raises(RecipeError, match=r"now epochs=9 \(MEDDINOV3_EPOCHS \(legacy\)\)"):
        make_trainer(block={"epochs": 7}, continue_training=True).load_checkpoint(checkpoint)
    monkeypatch.delenv("MEDDINOV3_EPOCHS")

    # the explicit override forces the change, into the values, the optimizer and the record
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "epochs=9 encoder_lr=1e-4")
    forced = make_trainer(block={"epochs": 9, "encoder_lr": 1e-4}, continue_training=True)
    forced.load_checkpoint(checkpoint)
    assert forced.num_epochs == 9 and forced.lr_scheduler.total_epochs == 9
    encoder_groups = [g for g in forced.optimizer.param_groups if g["name"].startswith("encoder")]
    assert encoder_groups and all(g["base_lr"] == 1e-4 for g in encoder_groups)
    record = forced.my_init_kwargs[recipe.CHECKPOINT_KEY]
    assert record["sources"]["epochs"] == "MEDDINOV3_RECIPE_OVERRIDE"
    assert record["history"] == [{"epoch": 2, "by": "MEDDINOV3_RECIPE_OVERRIDE",
                                  "changed": {"epochs": [7, 9], "encoder_lr": [3e-4, 1e-4]}}]

    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "freeze_encoder=true")
    with pytest.raises(RecipeError, match=r"freeze_encoder cannot change in a resumed run"):
        make_trainer(block={"epochs": 7}, continue_training=True).load_checkpoint(checkpoint)


def test_an_override_stays_with_the_run_it_changed(nnunet_folders, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_RECIPE_OVERRIDE", "epochs=2 iterations=3")
    checkpoint = _trained_checkpoint(nnunet_folders)
    monkeypatch.delenv("MEDDINOV3_RECIPE_OVERRIDE")
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", "somewhere/else.safetensors")  # not read when resuming: said so
    resumed = make_trainer(continue_training=True)  # the class says 20 x 25; the run was 2 x 3
    resumed.load_checkpoint(checkpoint)
    assert (resumed.num_epochs, resumed.num_iterations_per_epoch) == (2, 3)
    assert "MEDDINOV3_WEIGHTS=somewhere/else.safetensors is not read by --c / --val" in open(resumed.log_file).read()


def test_the_weights_source_is_recorded(nnunet_folders, monkeypatch, fixtures, tmp_path):
    from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint

    converted = tmp_path / "tiny.safetensors"
    convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", converted, encoder="meddinov3_tiny")
    for source in (fixtures / "meddino_tiny_teacher.pth", converted):
        monkeypatch.setenv("MEDDINOV3_WEIGHTS", str(source))
        trainer = make_trainer()
        trainer.initialize()
        trainer.load_pretrained_encoder()
        record = trainer.my_init_kwargs[recipe.CHECKPOINT_KEY]["weights"]
        assert record["from"] == "MEDDINOV3_WEIGHTS" and record["path"] == str(source.resolve())
        assert record["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["layout"] == "meddinov3"
    assert record["provenance"]["source"]["sha256"] == hashlib.sha256(
        (fixtures / "meddino_tiny_teacher.pth").read_bytes()).hexdigest()
    log = open(trainer.log_file).read()
    assert "Encoder weights source: requested " in log and "provenance" in log


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


def test_the_demo_gives_every_trainer_its_budget_as_the_recorded_override(monkeypatch, tmp_path):
    import argparse

    from nnunet_meddinov3.cli.demo import _environment

    monkeypatch.setenv("MEDDINOV3_EPOCHS", "99")  # a stale legacy variable of the calling shell
    env = _environment(tmp_path, argparse.Namespace(epochs=30, iterations=25))
    assert "MEDDINOV3_EPOCHS" not in env
    assert recipe.EnvironmentOverride(env).values() == {"epochs": 30, "iterations": 25, "val_iterations": 5}


def test_the_log_says_whether_the_plans_normalise_as_the_weights_were_pretrained(nnunet_folders, monkeypatch,
                                                                                   fixtures, tmp_path):
    from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint
    from nnunet_meddinov3.data.intensity import MEDDINOV3_CT, nnunet_ct_properties
    from nnunet_meddinov3.training import trainer as trainers

    converted = tmp_path / "tiny_ct.safetensors"
    convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", converted, encoder="meddinov3_tiny",
                       intensity="ct-meddinov3")
    monkeypatch.setenv("MEDDINOV3_WEIGHTS", str(converted))
    dataset_statistics = {"percentile_00_5": 17.0, "percentile_99_5": 176.0, "mean": 70.0, "std": 31.4}
    for properties, same in ((nnunet_ct_properties(MEDDINOV3_CT), True), (dataset_statistics, False)):
        plans = tiny_plans()
        plans["foreground_intensity_properties_per_channel"] = {"0": properties}
        trainer = trainers.nnUNetTrainerMedDINOv3_Tiny(plans, "2d", 0, dict(DATASET_JSON), device=torch.device("cpu"))
        trainer.initialize()
        trainer.load_pretrained_encoder()
        channel = trainer.my_init_kwargs[recipe.CHECKPOINT_KEY]["weights"]["intensity"]["channels"]
        assert [c["same"] for c in channel.values()] == [same]
        log = open(trainer.log_file).read()
        if same:
            assert "the same as the weights' pretraining" in log
        else:
            assert "window [17, 176]" in log and "pretrained with window [-1000, 1000]" in log
            assert "--intensity-from" in log and "data.intensity.kind=nnunet" in log


def test_3d_configurations_the_network_cannot_take_get_one_line_saying_what_to_do():
    def configuration(patch, ours=False):
        architecture = ({"network_class_name": "nnunet_meddinov3.network.volumetric.MedDINOv3Net3D",
                         "arch_kwargs": {"encoder": "tiny", "context": "slice_attention"}, "_kw_requires_import": []}
                        if ours else {"network_class_name": "some.CNN", "arch_kwargs": {}, "_kw_requires_import": []})
        return ConfigurationManager({"patch_size": patch, "architecture": architecture})

    nnUNetTrainerMedDINOv3_Tiny.check_configuration(configuration([5, 64, 64]), "3d_fullres")  # fine
    with pytest.raises(ValueError, match="has 1 slice, too few for the cross-slice context 'slice_attention' "
                                         r"\(a 2D dataset\?\): train its 2d configuration"):
        nnUNetTrainerMedDINOv3_Tiny.check_configuration(configuration([1, 64, 64]), "3d_fullres")
    with pytest.raises(ValueError, match=r"in-plane patch \[64, 72\] .* plan again with `meddinov3 plan_and_preprocess`"):
        nnUNetTrainerMedDINOv3_Tiny.check_configuration(configuration([8, 64, 72], ours=True), "3d_fullres")
    # stock plans: the network pads a patch that is no multiple of 16, as in 2D
    nnUNetTrainerMedDINOv3_Tiny.check_configuration(configuration([8, 64, 72]), "3d_fullres")
