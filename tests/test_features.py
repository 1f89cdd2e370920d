"""``meddinov3 features``: PNG size for both fixture checkpoints, 2D and 3D inputs, and the errors."""

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from nnunet_meddinov3.cli.main import main
from nnunet_meddinov3.data.synthetic_ct import synthetic_case
from nnunet_meddinov3.visualize import features

CHECKPOINTS = [("official_tiny.pth", "tiny"), ("meddino_tiny_teacher.pth", "meddinov3_tiny")]


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory):
    image, _ = synthetic_case(np.random.default_rng(0), shape=(6, 64, 80))
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing((0.8, 0.8, 2.5))
    path = tmp_path_factory.mktemp("features") / "ct.nii.gz"
    sitk.WriteImage(itk, str(path))
    return path


@pytest.fixture(scope="module")
def png_path(tmp_path_factory):
    image, _ = synthetic_case(np.random.default_rng(1), shape=(3, 64, 64))
    gray = np.clip((image[1] + 1000) / 2000 * 255, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("features") / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(path))
    return path


def run_features(monkeypatch, *args) -> int:
    return main(["features", *map(str, args)])


def png_size(path) -> tuple[int, int]:
    height, width = imread(str(path)).shape[:2]
    return width, height


@pytest.mark.parametrize("checkpoint,encoder", CHECKPOINTS)
def test_volume_picture_has_three_size_panels(monkeypatch, tmp_path, fixtures, volume_path, checkpoint, encoder):
    out = tmp_path / "features.png"
    assert run_features(monkeypatch, "-i", volume_path, "--checkpoint", fixtures / checkpoint,
                        "--encoder", encoder, "--size", 64, "-o", out) == 0
    assert png_size(out) == (3 * 64, 64)


def test_any_multiple_of_16_slice_and_point(monkeypatch, tmp_path, fixtures, volume_path):
    out = tmp_path / "sub" / "features.png"
    assert run_features(monkeypatch, "-i", volume_path, "--slice", 0, "--point", 10, 70, "--size", 80,
                        "--checkpoint", fixtures / "official_tiny.pth", "--encoder", "tiny", "-o", out) == 0
    assert png_size(out) == (240, 80)


def test_2d_png_input(monkeypatch, tmp_path, fixtures, png_path):
    out = tmp_path / "features.png"
    assert run_features(monkeypatch, "-i", png_path, "--checkpoint", fixtures / "meddino_tiny_teacher.pth",
                        "--encoder", "meddinov3_tiny", "--intensity", "minmax", "--size", 48, "-o", out) == 0
    assert png_size(out) == (144, 48)


def test_size_must_be_a_multiple_of_16(monkeypatch, capsys, tmp_path, fixtures, volume_path):
    assert run_features(monkeypatch, "-i", volume_path, "--checkpoint", fixtures / "official_tiny.pth",
                        "--encoder", "tiny", "--size", 100, "-o", tmp_path / "x.png") == 1
    assert "--size 100 is not a positive multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_wrong_checkpoint_for_the_encoder(monkeypatch, capsys, tmp_path, fixtures, volume_path):
    assert run_features(monkeypatch, "-i", volume_path, "--checkpoint", fixtures / "official_tiny.pth",
                        "--encoder", "meddinov3_tiny", "--size", 64, "-o", tmp_path / "x.png") == 1
    err = capsys.readouterr().err
    assert "do not fit the encoder" in err and "encoder configs that would fit: tiny" in err


def test_slice_out_of_range(monkeypatch, capsys, tmp_path, fixtures, volume_path):
    assert run_features(monkeypatch, "-i", volume_path, "--slice", 6, "--checkpoint", fixtures / "official_tiny.pth",
                        "--encoder", "tiny", "--size", 64, "-o", tmp_path / "x.png") == 1
    assert "has 6 slices" in capsys.readouterr().err


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixtures):
    """Both fixtures in this project's safetensors format: the header records encoder and intensity."""
    from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint

    folder = tmp_path_factory.mktemp("converted")
    convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", folder / "meddino_tiny.safetensors",
                       encoder="meddinov3_tiny", intensity="ct-meddinov3")
    convert_checkpoint(fixtures / "official_tiny.pth", folder / "official_tiny.safetensors", encoder="tiny")
    return folder


@pytest.mark.parametrize("name,encoder,kind", [("meddino_tiny", "meddinov3_tiny", "ct"),
                                               ("official_tiny", "tiny", "imagenet")])
def test_safetensors_checkpoint_brings_its_conventions(monkeypatch, capsys, tmp_path, converted, volume_path,
                                                       name, encoder, kind):
    out = tmp_path / "features.png"
    # --encoder and --intensity are wrong on purpose: the recorded ones must win
    assert run_features(monkeypatch, "-i", volume_path, "--checkpoint", converted / f"{name}.safetensors",
                        "--encoder", "vitb16", "--intensity", "zscore", "--size", 64, "-o", out) == 0
    printed = capsys.readouterr()
    assert f"encoder:   {encoder} (metadata of {name}.safetensors)" in printed.out
    assert f"'kind': '{kind}'" in printed.out
    assert "--encoder vitb16 not used" in printed.err and "--intensity zscore not used" in printed.err
    assert png_size(out) == (192, 64)


def test_recorded_conventions_win_over_options(monkeypatch):
    recorded = {"encoder": "tiny", "intensity": {"kind": "zscore"}}
    monkeypatch.setattr(features, "recorded_metadata", lambda checkpoint: (recorded, "metadata of x.safetensors"))
    used = features.resolve_conventions("x.safetensors", encoder="vitb16", intensity="ct-meddinov3")
    assert (used.encoder, used.intensity) == ("tiny", {"kind": "zscore"})
    assert used.encoder_source == used.intensity_source == "metadata of x.safetensors"

    monkeypatch.setattr(features, "recorded_metadata", lambda checkpoint: ({}, ""))
    used = features.resolve_conventions("x.pth", encoder="vitb16", intensity=None)
    assert (used.encoder, used.encoder_source) == ("vitb16", "--encoder")
    assert used.intensity == features.INTENSITY_PRESETS["ct-meddinov3"]


@pytest.mark.parametrize("checkpoint,encoder", CHECKPOINTS)
def test_raw_checkpoint_architecture_is_inferred_from_the_file(monkeypatch, capsys, tmp_path, fixtures, volume_path,
                                                              checkpoint, encoder):
    # no --encoder: the tiny fixtures must not be built as the ViT-B a guess would give
    out = tmp_path / "features.png"
    assert run_features(monkeypatch, "-i", volume_path, "--checkpoint", fixtures / checkpoint, "--size", 32,
                        "-o", out) == 0
    printed = capsys.readouterr().out
    assert f"encoder:   {encoder} (inferred from {checkpoint}, layout " in printed
    assert png_size(out) == (96, 32)


def test_ct_convention_is_meddinov3s():
    hu = np.array([[-3000.0, 65.1084, 3000.0]], dtype=np.float32)
    out = features.normalize(hu, hu, features.INTENSITY_PRESETS["ct-meddinov3"])
    np.testing.assert_allclose(out, (np.clip(hu, -1000, 1000) - 65.1084) / 178.0166, rtol=1e-6)


def test_pca_background_black_and_similarity_one_at_the_point():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(8, 4, 4)).astype(np.float32)
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:4] = True
    rgb = features.pca_rgb(feats, mask)
    assert rgb.shape == (4, 4, 3) and np.all(rgb[~mask] == 0) and rgb.max() <= 1
    similarity = features.cosine_similarity_map(feats, (2, 3))
    assert similarity[2, 3] == pytest.approx(1.0) and np.all(np.abs(similarity) <= 1 + 1e-9)
