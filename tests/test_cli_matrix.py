"""Every ``meddinov3`` subcommand against every weights layout the project reads and the mistakes users make.

Each cell runs the command (in-process through ``main``, as the console script does; a few through the console
script itself, for start-up behaviour) and asserts the exit status, a message that says what is wrong or what was
done, and that no Python traceback reaches the user. Every path here contains a space.

Layouts: Meta's hub .pth, a MedDINOv3/dinov3 teacher checkpoint with and without its heads, a dinov3 DCP folder,
Hugging Face (model.safetensors + config.json), timm, this project's format and a pretraining run folder.
Mistakes: empty, text, truncated files, a wrong extension, a folder where a file is expected, a file or path that
does not exist, a dataset name or id that does not exist.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file
from test_converters import reference_to_hf, save_dcp

from nnunet_meddinov3.cli.main import main

LAYOUTS = ["hub_pth", "teacher_with_heads", "teacher_without_heads", "dcp_folder", "hf", "timm", "ours",
           "pretrain_run"]
WEIGHT_FILES = [layout for layout in LAYOUTS if layout != "pretrain_run"]
EXPORT_HINT = "python -m pretrain export --run"


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit status (argparse's SystemExit too) and stdout + stderr; never a traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output, output
    return code, output


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on two shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, fixtures) -> dict:
    """One tiny checkpoint per layout (the 64-dim, 4-block fixtures, saved by the real libraries)."""
    from timm.models.eva import checkpoint_filter_fn

    from nnunet_meddinov3.checkpoints.conversion import convert_checkpoint

    root = tmp_path_factory.mktemp("weights") / "my weights"
    root.mkdir()
    official = torch.load(fixtures / "official_tiny.pth", weights_only=True)
    teacher = torch.load(fixtures / "meddino_tiny_teacher.pth", weights_only=True)["teacher"]
    paths = {"hub_pth": root / "dinov3 tiny hub.pth", "teacher_with_heads": root / "teacher heads.pth",
             "teacher_without_heads": root / "teacher backbone.pth", "dcp_folder": root / "dcp ckpt" / "99",
             "hf": root / "hf model" / "model.safetensors", "timm": root / "timm model" / "model.safetensors",
             "ours": root / "ours tiny.safetensors", "pretrain_run": root / "pretrain run"}
    shutil.copy(fixtures / "official_tiny.pth", paths["hub_pth"])
    shutil.copy(fixtures / "meddino_tiny_teacher.pth", paths["teacher_with_heads"])
    torch.save({"teacher": {k: v for k, v in teacher.items() if k.startswith("backbone.")}},
               paths["teacher_without_heads"])
    save_dcp({"iteration": 99, "model": {f"teacher.{k}": v for k, v in teacher.items()}}, paths["dcp_folder"])
    paths["hf"].parent.mkdir()
    save_file(reference_to_hf(official), paths["hf"])
    (paths["hf"].parent / "config.json").write_text(json.dumps({  # what a hub folder holds next to the weights
        "model_type": "dinov3_vit", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "layer_norm_eps": 1e-5, "rope_theta": 100.0}))
    import timm
    model = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, embed_dim=64, depth=4, num_heads=4,
                              num_classes=0)
    model.load_state_dict(checkpoint_filter_fn(dict(official), model), strict=True)
    paths["timm"].parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths["timm"])
    convert_checkpoint(fixtures / "meddino_tiny_teacher.pth", paths["ours"], intensity="ct-meddinov3")
    _pretrain_run(paths["pretrain_run"], root / "pretrain data")
    return paths


def write_ct_volume(path):
    """One synthetic CT volume (8 x 64 x 64, int16 HU) at ``path``, its folder created."""
    from nnunet_meddinov3.data.synthetic_ct import synthetic_case

    image, _ = synthetic_case(np.random.default_rng(0), shape=(8, 64, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(image.astype(np.int16))
    volume.SetSpacing((0.8, 0.8, 3.0))
    sitk.WriteImage(volume, str(path))
    return path


def _pretrain_run(run, data):
    """A real pretraining run folder: the tiny config for two iterations on one synthetic CT volume."""
    from pretrain.cli import main as pretrain_main

    write_ct_volume(data / "ct 0.nii.gz")
    assert pretrain_main(["train", "--config", "tiny_stage1", "--data", str(data), "--output", str(run),
                          "train.iterations=2", "train.checkpoint_every=0"]) == 0


@pytest.fixture(scope="module")
def bad(tmp_path_factory, fixtures) -> dict:
    """The files users give by mistake, in a folder whose name has a space."""
    root = tmp_path_factory.mktemp("bad") / "my files"
    root.mkdir()
    teacher = (fixtures / "meddino_tiny_teacher.pth").read_bytes()
    files = {"empty": root / "empty.pth", "text": root / "notes.pth", "truncated": root / "truncated.pth",
             "pth_named_safetensors": root / "teacher.safetensors", "folder": root / "a folder",
             "missing": root / "no such file.pth"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("hi there\n")  # 'h' makes the unpickler raise KeyError
    files["truncated"].write_bytes(teacher[: len(teacher) // 2])
    files["pth_named_safetensors"].write_bytes(teacher)
    files["folder"].mkdir()
    (files["folder"] / "readme.txt").write_text("not weights")
    return files


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> object:
    from nnunet_meddinov3.data.synthetic_ct import synthetic_case

    volume, _ = synthetic_case(np.random.default_rng(0), shape=(3, 48, 48))
    path = tmp_path_factory.mktemp("image") / "ct volume.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    return path


# ------------------------------------------------------------------------------------------- weights x layouts

@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_info(capsys, layouts, layout):
    code, out = run_cli(capsys, "weights", "info", layouts[layout])
    if layout == "pretrain_run":
        assert code == 1 and EXPORT_HINT in out
    else:
        assert code == 0, out
        assert "tensors (" in out and "MiB" in out
        assert "format: meddinov3 safetensors" in out if layout == "ours" else "named configs that fit the shapes:" in out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_convert(capsys, tmp_path, layouts, layout):
    dst = tmp_path / "out dir" / "converted.safetensors"
    dst.parent.mkdir()
    code, out = run_cli(capsys, "weights", "convert", layouts[layout], dst)
    if layout == "pretrain_run":
        assert code == 1 and EXPORT_HINT in out and not dst.exists()
    else:
        assert code == 0, out
        assert "(verified by a strict load)" in out and dst.is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_verify(capsys, layouts, layout):
    code, out = run_cli(capsys, "weights", "verify", layouts[layout])
    if layout == "ours":
        assert code == 0 and "all finite" in out
    elif layout == "pretrain_run":
        assert code == 1 and EXPORT_HINT in out
    else:  # verify checks this project's format only: the message says how to get there
        assert code == 1 and "meddinov3 weights" in out and "error:" in out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_features(capsys, tmp_path, layouts, image, layout):
    out_png = tmp_path / "out dir" / "features.png"
    code, out = run_cli(capsys, "features", "-i", image, "--checkpoint", layouts[layout], "--size", 32,
                        "-o", out_png)
    if layout == "pretrain_run":
        assert code == 1 and EXPORT_HINT in out and not out_png.exists()
    else:  # no --encoder: the architecture comes from the file, never a ViT-B guess
        assert code == 0, out
        expected = "meddinov3_tiny" if layout.startswith(("teacher", "dcp", "ours")) else "tiny"
        assert f"encoder:   {expected} (" in out and out_png.is_file()


# ------------------------------------------------------------------------------------------- bad inputs

BAD_FILE_MESSAGES = {
    "empty": "is empty (0 bytes)",
    "text": "is not a PyTorch checkpoint",
    "truncated": "truncated or corrupt",
    "pth_named_safetensors": "is a PyTorch (torch.save) checkpoint, not a safetensors file",
    "folder": "is not a torch.distributed.checkpoint directory",
    "missing": "does not exist",
}


@pytest.mark.parametrize("what", list(BAD_FILE_MESSAGES))
@pytest.mark.parametrize("command", ["info", "convert", "verify", "features"])
def test_bad_weights_files(capsys, tmp_path, bad, image, command, what):
    path = bad[what]
    if command == "features":
        code, out = run_cli(capsys, "features", "-i", image, "--checkpoint", path, "--size", 32,
                            "-o", tmp_path / "f.png")
    elif command == "convert":
        code, out = run_cli(capsys, "weights", "convert", path, tmp_path / "x.safetensors")
    else:
        code, out = run_cli(capsys, "weights", command, path)
    assert code == 1, out
    expected = BAD_FILE_MESSAGES[what]
    if command == "verify" and what == "folder":
        expected = "is a folder; give a checkpoint file"
    if command == "verify" and what in ("text", "truncated"):  # not this project's format: how to get there
        expected = "verify checks .safetensors files in this project's format. Convert a checkpoint with"
    if command == "features" and what == "missing":  # features also takes registry names
        expected = "is neither an existing file nor a registered checkpoint name"
    assert expected in out, out
    assert len([line for line in out.splitlines() if "error:" in line]) == 1


def test_safetensors_under_a_pth_name(capsys, tmp_path, layouts):
    renamed = tmp_path / "ours.pth"
    shutil.copy(layouts["ours"], renamed)
    code, out = run_cli(capsys, "weights", "info", renamed)
    assert code == 1 and "rename it to ours.safetensors" in out


def test_convert_into_a_folder_or_wrong_extension(capsys, tmp_path, layouts):
    code, out = run_cli(capsys, "weights", "convert", layouts["hub_pth"], tmp_path)
    assert code == 1 and "is a folder; give the output file's name" in out
    code, out = run_cli(capsys, "weights", "convert", layouts["hub_pth"], tmp_path / "x.pth")
    assert code == 1 and "must be a .safetensors file" in out


@pytest.mark.parametrize("what,message", [("text", "SimpleITK cannot read"), ("empty", "SimpleITK cannot read"),
                                          ("folder", "is a folder without a DICOM series"),
                                          ("missing", "does not exist")])
def test_features_bad_image(capsys, tmp_path, bad, layouts, what, message):
    code, out = run_cli(capsys, "features", "-i", bad[what], "--checkpoint", layouts["ours"], "--size", 32,
                        "-o", tmp_path / "f.png")
    assert code == 1 and message in out


def test_features_output_is_a_folder(capsys, tmp_path, layouts, image):
    code, out = run_cli(capsys, "features", "-i", image, "--checkpoint", layouts["ours"], "-o", tmp_path)
    assert code == 1 and "is a folder; give the PNG file's name" in out


# ------------------------------------------------------------------------------------------- nnU-Net commands

@pytest.fixture()
def nnunet_folders(tmp_path, monkeypatch):
    """Empty nnU-Net folders (with spaces) but for one raw dataset, Dataset501_SyntheticCT (not preprocessed)."""
    folders = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folders[name] = tmp_path / f"nnunet {name}"
        folders[name].mkdir()
        monkeypatch.setenv(name, str(folders[name]))
    (folders["nnUNet_raw"] / "Dataset501_SyntheticCT").mkdir()
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    return folders


@pytest.mark.parametrize("dataset,message", [
    ("Dataset501_Synthetic", "dataset 'Dataset501_Synthetic' not found"),
    ("Liver", "'Liver' is neither a dataset id (e.g. 501) nor a full dataset name"),
    ("999", "dataset '999' not found"),
])
def test_plan_and_preprocess_unknown_dataset(capsys, nnunet_folders, dataset, message):
    code, out = run_cli(capsys, "plan_and_preprocess", "-d", dataset, "-np", 1)
    assert code == 1 and message in out and "datasets there: Dataset501_SyntheticCT" in out


def test_plan_and_preprocess_without_nnunet_folders(capsys, nnunet_folders, monkeypatch):
    monkeypatch.delenv("nnUNet_raw")
    code, out = run_cli(capsys, "plan_and_preprocess", "-d", "501")
    assert code == 1 and "nnUNet_raw not set" in out and "meddinov3 env" in out


@pytest.mark.parametrize("dataset", ["Dataset501_Synthetic", "Liver", "999"])
def test_predict_and_compare_unknown_dataset(capsys, tmp_path, nnunet_folders, image, dataset):
    images = tmp_path / "my images"
    images.mkdir()
    shutil.copy(image, images / "case_0000.nii.gz")
    code, out = run_cli(capsys, "predict", "-i", images, "-o", tmp_path / "out", "-d", dataset, "-c", "2d",
                        "-tr", "nnUNetTrainerMedDINOv3", "-device", "cpu")
    expected = "'Liver' is neither a dataset id (e.g. 501) nor a full dataset name" if dataset == "Liver" else \
        "not found" if dataset == "999" else "model folder not found"
    assert code == 2 and expected in out and "train" in out
    code, out = run_cli(capsys, "compare", "-d", dataset, "-c", "2d", "--trainers", "nnUNetTrainer",
                        "nnUNetTrainerMedDINOv3")
    assert code == 1 and "error:" in out and (dataset != "Liver" or expected in out)


def test_predict_input_is_a_file(capsys, tmp_path, nnunet_folders, image):
    code, out = run_cli(capsys, "predict", "-i", image, "-o", tmp_path / "out", "-d", "501", "-c", "2d",
                        "-tr", "nnUNetTrainerMedDINOv3", "-device", "cpu")
    assert code == 2 and "error:" in out


# ------------------------------------------------------------------------------------------- the rest

def test_weights_list_and_env(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_CACHE", str(tmp_path / "my cache"))
    code, out = run_cli(capsys, "weights", "list")
    assert code == 0 and "meddinov3-vitb16-ct3m" in out
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    code, out = run_cli(capsys, "env")
    assert code == 1 and "nnUNet_extTrainer: NOT SET" in out and "meddinov3 env --export" in out
    code, out = run_cli(capsys, "env", "--export")
    assert code == 0 and out.startswith("export nnUNet_extTrainer=")


@pytest.mark.parametrize("argv", [[], ["weights"], ["nonsense"], ["features"], ["weights", "info"]])
def test_incomplete_command_lines(capsys, argv):
    code, out = run_cli(capsys, *argv)
    assert code == 2 and "usage: meddinov3" in out


def test_unexpected_errors_are_one_message_and_debug_shows_the_traceback(capsys, monkeypatch):
    import nnunet_meddinov3.cli.env as env_cli

    def broken(args):
        raise AssertionError("internal state")
    monkeypatch.setattr(env_cli, "run", broken)
    code, out = run_cli(capsys, "env")
    assert code == 1 and "unexpected AssertionError: internal state" in out and "MEDDINOV3_DEBUG=1" in out
    monkeypatch.setenv("MEDDINOV3_DEBUG", "1")
    with pytest.raises(AssertionError):
        main(["env"])


def test_every_option_has_help_text():
    import argparse

    from nnunet_meddinov3.cli.main import SUBCOMMANDS, build_parser

    missing = []
    for name in SUBCOMMANDS:
        parser, _ = build_parser([name])
        parsers = [(name, next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name])]
        for label, sub in list(parsers):
            for action in sub._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parsers += [(f"{label} {k}", p) for k, p in action.choices.items()]
        for label, sub in parsers:
            missing += [f"{label} {action.option_strings or action.dest}" for action in sub._actions
                        if action.help is None and not isinstance(action, argparse._SubParsersAction)]
    assert missing == []


# ------------------------------------------------------------------------------------------- console script

def console(*argv, env=None):
    return subprocess.run(["meddinov3", *map(str, argv)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "default", **(env or {})})


def test_console_script_no_traceback_no_third_party_warnings(layouts, bad, image, tmp_path):
    # PYTHONWARNINGS=default shows every warning once: only our own may reach the user
    result = console("weights", "info", layouts["teacher_with_heads"])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "FutureWarning" not in result.stderr
    result = console("features", "-i", image, "--checkpoint", bad["text"], "-o", tmp_path / "f.png")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "FutureWarning" not in result.stderr
    assert result.stderr.startswith("meddinov3 features: error:") and "is not a PyTorch checkpoint" in result.stderr


def test_python_m_pretrain_shows_no_third_party_warnings(tmp_path):
    write_ct_volume(tmp_path / "data" / "ct.nii.gz")
    result = subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "tiny_stage1", "--data",
                             str(tmp_path / "data"), "--output", str(tmp_path / "run"), "train.iterations=1",
                             "train.checkpoint_every=0"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_pretrain_data_mistakes_get_a_message(tmp_path, capsys):
    from pretrain.cli import main as pretrain_main

    def train(*arguments):
        code = pretrain_main(["train", "--config", "tiny_stage1", "--output", str(tmp_path / "run"), "train.iterations=1",
                              "train.checkpoint_every=0", *map(str, arguments)])
        return code, capsys.readouterr().err

    code, error = train("--data", tmp_path / "no such folder")
    assert code == 2 and "is not a folder" in error and "no such folder" in error
    (tmp_path / "empty").mkdir()
    code, error = train("--data", tmp_path / "empty")
    assert code == 2 and "no volumes found under" in error and "imagesTr" in error
    write_ct_volume(tmp_path / "ct" / "case_000.nii.gz")
    code, error = train("--data", tmp_path / "ct", "data.exclude_case_ids=[case_000]")
    assert code == 2 and "nothing to train on: 1 volume(s)" in error and "1 excluded by the leakage guard" in error
    code, error = train("--data", tmp_path / "ct", "data.body_threshold=5000")
    assert code == 2 and "have no slice with at least 5% of its pixels above 5000" in error


def test_console_script_debug_shows_the_traceback(bad):
    result = console("weights", "info", bad["empty"], env={"MEDDINOV3_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "is empty (0 bytes)" in result.stderr
