"""Stage configs: every packaged YAML loads, carries the recipe's numbers, and bad input is refused."""

import math
import re

import pytest

from pretrain.configs import ConfigError, available_configs, load_config
from pretrain.optim import scaled_lr

STAGES = ("stage1", "stage2_gram", "stage3_highres")


def test_all_packaged_configs_load():
    names = available_configs()
    for size in ("tiny", "vits16", "vitb16"):
        assert {f"{size}_{stage}" for stage in STAGES} <= set(names)
    for name in names:
        config = load_config(name)
        assert config.name == name


def test_vitb16_stage1_is_the_recipe():
    c = load_config("vitb16_stage1")
    assert c.model.encoder == "meddinov3_vitb16" and c.model.drop_path_rate == 0.3
    for head in (c.model.dino_head, c.model.ibot_head):
        assert (head.prototypes, head.hidden_dim, head.bottleneck_dim, head.layers) == (65536, 2048, 256, 3)
    assert (c.crops.global_sizes, c.crops.local_sizes, c.crops.n_local) == ([224], [96], 8)
    assert (c.crops.global_scale, c.crops.local_scale) == ((0.32, 1.0), (0.05, 0.32))
    assert (c.masking.probability, c.masking.ratio) == (0.5, (0.1, 0.5))
    assert (c.loss.dino_weight, c.loss.ibot_weight, c.loss.koleo_weight, c.loss.student_temp) == (1.0, 1.0, 0.1, 0.1)
    assert (c.loss.teacher_temp_start, c.loss.teacher_temp_end) == (0.04, 0.07)
    o = c.optim
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad, o.layerwise_decay, o.patch_embed_lr_mult) == (
        0.04, 0.4, 3.0, 0.9, 0.2)
    assert (o.momentum_start, o.momentum_end, o.betas, o.min_lr) == (0.992, 1.0, (0.9, 0.999), 1e-6)
    assert o.global_batch_size == 512
    assert math.isclose(scaled_lr(o, 512), 1e-3 * 4 * math.sqrt(0.5))


def test_stage3_crop_triples_are_the_recipe_table():
    c = load_config("vitb16_stage3_highres")
    triples = list(zip(c.crops.global_sizes, c.crops.local_sizes, c.gram_sizes, c.crops.probabilities))
    assert triples == [(512, 112, 768, 0.3), (768, 112, 1152, 0.3), (768, 168, 1152, 0.3),
                       (768, 224, 1152, 0.05), (768, 336, 1152, 0.05)]
    assert (c.gram.enabled, c.gram.weight, c.gram.refresh_every) == (True, 1.5, 0)
    assert (c.loss.local_dino_weight_start, c.loss.teacher_temp_start, c.optim.momentum_start) == (0.5, 0.07, 0.999)
    assert c.optim.lr_schedule == "cosine_rise_constant"
    assert c.loss.koleo_group_size == 16 and load_config("vitb16_stage1").loss.koleo_group_size is None


def test_stage2_gram_and_base_inheritance():
    c = load_config("vitb16_stage2_gram")
    assert c.gram.enabled and c.gram.weight == 2.0 and c.gram.refresh_every == 10000
    assert c.gram_sizes == [448]
    assert (c.loss.local_dino_weight_start, c.loss.local_dino_weight_end) == (1.0, 0.5)
    assert c.model.dino_head.prototypes == 65536  # inherited from stage 1
    s = load_config("vits16_stage2_gram")
    assert s.model.encoder == "meddinov3_vits16" and s.gram.weight == 2.0


def test_rope_rescaling_follows_metas_stage_configs():
    """Off in the ViT-L recipe MedDINOv3's stage 1 used (vitl_im1k_lin834), 2 in the Gram and
    high-resolution stages (Meta's dinov3_vit7b16_gram_anchor / _high_res_adapt)."""
    rescale = {name: load_config(name).model.rope_rescale_coords for name in
               ("vitb16_stage1", "vitb16_stage2_gram", "vitb16_stage3_highres", "vits16_stage3_highres")}
    assert rescale == {"vitb16_stage1": None, "vitb16_stage2_gram": 2.0, "vitb16_stage3_highres": 2.0,
                       "vits16_stage3_highres": 2.0}


def test_overrides_apply_and_parse_yaml_values():
    c = load_config("tiny_stage1", ["optim.lr=1e-4", "data.batch_size=8", "data.roots=[/a, /b]",
                                    "crops.global_scale=[0.4, 1.0]", "monitor.max_koleo=null"])
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert c.data.batch_size == 8 and c.data.roots == ["/a", "/b"]
    assert c.crops.global_scale == (0.4, 1.0) and c.monitor.max_koleo is None


@pytest.mark.parametrize("override, words", [
    ("optim.learning_rate=1", ["optim.learning_rate", "valid keys in optim", "lr", "warmup_iterations"]),
    ("nonsense=1", ["nonsense", "valid keys", "optim", "crops"]),
    ("data.batch_size=many", ["data.batch_size", "int"]),
    ("optim.lr", ["dotted.key=value"]),
    ("crops.local_sizes=[32, 32]", ["crops.local_sizes", "2 entries"]),
    ("crops.global_sizes=[60]", ["multiples of the patch size"]),
    ("model.encoder=vit_huge", ["vit_huge", "meddinov3_vitb16"]),
    ("model.rope_rescale_coords=0.5", ["model.rope_rescale_coords", ">= 1", "0.5"]),
    ("loss.koleo_group_size=1", ["loss.koleo_group_size", ">= 2"]),
])
def test_bad_overrides_are_errors_that_say_what_is_valid(override, words):
    with pytest.raises(ConfigError) as error:
        load_config("tiny_stage1", [override])
    for word in words:
        assert word in str(error.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny_stage1\ntrain:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match="train.iteratons.*valid keys in train.*iterations"):
        load_config(path)
    path.write_text("base: tiny_stage1\ntrain:\n  iterations: 5\n")
    assert load_config(path).train.iterations == 5 and load_config(path).name == "bad"


@pytest.mark.parametrize("override, words", [
    ("data.intensity={kind: ct, window: [-1000, 1000], mean: 0, std: 0}", ["data.intensity", "std must be a positive"]),
    ("data.intensity={kind: ct, window: [1000, -1000], mean: 0, std: 1}", ["data.intensity", "low < high"]),
    ("data.intensity.mean=null", ["data.intensity", "mean must be a number"]),
    ("data.intensity.percentiles=[1, 99]", ["the ct preset has no field(s) ['percentiles']", "window, mean, std"]),
    ("data.intensity.kind=pet", ["data.intensity.kind", "('ct', 'mri')", "pet"]),
    ("data.intensity={kind: mri, percentiles: [99, 1]}", ["data.intensity", "percentiles"]),
    ("data.intensity={kind: imagenet, mean: 0, std: 1}", ["data.intensity", "('ct', 'mri')", "imagenet"]),
])
def test_bad_intensity_is_refused_when_the_config_is_read(override, words):
    """The rule of the exported checkpoint's metadata, checked before training rather than at export."""
    with pytest.raises(ConfigError) as error:
        load_config("tiny_stage1", [override])
    for word in words:
        assert word in str(error.value)
    mri = load_config("tiny_stage1", ["data.intensity={kind: mri, percentiles: [1, 99]}"])
    assert mri.data.intensity == {"kind": "mri", "percentiles": [1, 99]}


def test_one_dotted_key_selects_the_mri_preset_with_its_defaults(tmp_path):
    from nnunet_meddinov3.data.intensity import MRIntensity

    assert load_config("tiny_stage1", ["data.intensity.kind=mri"]).data.intensity == MRIntensity().to_dict()
    # a field of the chosen kind after the kind, in one command line
    mri = load_config("tiny_stage1", ["data.intensity.kind=mri", "data.intensity.percentiles=[1, 99]"])
    assert mri.data.intensity == {"kind": "mri", "percentiles": [1, 99]}
    # a field of the current kind keeps the others (the CT window alone, mean and std stay MedDINOv3's)
    ct = load_config("tiny_stage1", ["data.intensity.window=[-200, 300]"]).data.intensity
    assert ct["window"] == [-200, 300] and ct["mean"] == 65.1084 and ct["std"] == 178.0166
    # the same in a YAML file that starts from a CT config
    path = tmp_path / "mri.yaml"
    path.write_text("base: tiny_stage1\ndata:\n  intensity: {kind: mri}\n")
    assert load_config(path).data.intensity == MRIntensity().to_dict()


def test_crop_sizes_are_checked_against_the_encoders_patch_size(monkeypatch):
    from nnunet_meddinov3.network.configs import ENCODER_CONFIGS

    monkeypatch.setitem(ENCODER_CONFIGS, "tiny_patch8", ENCODER_CONFIGS["meddinov3_tiny"].replace(patch_size=8))
    patch8 = load_config("tiny_stage1", ["model.encoder=tiny_patch8", "crops.global_sizes=[40]"])
    assert patch8.crops.global_sizes == [40]
    with pytest.raises(ConfigError, match="multiples of the patch size 16"):
        load_config("tiny_stage1", ["crops.global_sizes=[40]"])
    with pytest.raises(ConfigError, match="multiples of the patch size 8"):
        load_config("tiny_stage1", ["model.encoder=tiny_patch8", "crops.global_sizes=[36]"])


def test_augmentation_is_configurable_and_checked():
    from pretrain.engine.data import build_augmentations

    augmentation = build_augmentations(load_config("tiny_stage1"))[0]
    # the tiny recipe: crops only (tiny_stage1.yaml says why)
    assert augmentation.flip_p == augmentation.window_p == augmentation.contrast_p == augmentation.solarize_p == 0
    assert tuple(augmentation.blur_p) == (0, 0, 0) and augmentation.global_scale == (0.6, 1.0)
    config = load_config("tiny_stage1", ["augment.window_p=0.8", "augment.window_width=[0.5, 1.0]",
                                         "augment.contrast=[0.8, 1.2]"])
    augmentation = build_augmentations(config)[0]
    assert augmentation.window_p == 0.8 and augmentation.window_width == (0.5, 1.0)
    assert augmentation.contrast == (0.8, 1.2)
    for override, words in (("augment.window_p=1.5", "augment probabilities must be in [0, 1]"),
                            ("augment.window_width=[0, 1]", "augment.window_width"),
                            ("augment.blur_p=[1, 0.1]", "augment.blur_p must have 3 entries")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config("tiny_stage1", [override])
