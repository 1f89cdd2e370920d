"""``meddinov3 predict`` on DICOM series trees and arbitrarily named image files, against a tiny model trained with
the stock nnU-Net commands (no mocks): geometry and DICOM UIDs kept, broken inputs reported and skipped, and
segmentations voxel-identical to ``nnUNetv2_predict`` on the converted files."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_meddinov3.cli.env import ext_trainer_value
from nnunet_meddinov3.cli.main import main

pytestmark = pytest.mark.e2e

DATASET = 502  # distinct from the other end-to-end tests
TINY = "nnUNetTrainerMedDINOv3_Tiny"
MODEL_ARGS = ["-d", str(DATASET), "-c", "2d", "-tr", TINY, "-f", "0", "-device", "cpu"]
STUDY_UID = "1.2.826.0.1.3680043.8.498.502"


from e2e_helpers import isolated_nnunet_env, run  # noqa: E402  (shared by the e2e tests; see tests/e2e_helpers.py)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny dataset, stock plan+preprocess, the tiny trainer's fold 0 for 1 epoch x 2 iterations."""
    root = tmp_path_factory.mktemp("predict_clinical")
    from nnunet_meddinov3.data.synthetic_ct import write_nnunet_raw_dataset
    raw = write_nnunet_raw_dataset(root / "raw", DATASET, num_train=6, num_test=2, shape=(5, 64, 64))
    env = isolated_nnunet_env(root, nnUNet_extTrainer=ext_trainer_value(), nnUNet_n_proc_DA="1",
                              MEDDINOV3_EPOCHS="1", MEDDINOV3_ITERATIONS="2", MEDDINOV3_VAL_ITERATIONS="1")
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "2d", "-npfp", "1", "-np", "1"], env, root)
    run(["nnUNetv2_train", str(DATASET), "2d", "0", "-tr", TINY, "-device", "cpu"], env, root)
    return {"root": root, "raw": raw, "env": env}


@pytest.fixture
def nnunet_env(trained, monkeypatch):
    """The trained model's environment in this process, for in-process ``meddinov3 predict`` runs."""
    for key in [k for k in os.environ if k.startswith(("nnUNet", "MEDDINOV3"))]:
        monkeypatch.delenv(key)
    for key, value in trained["env"].items():
        if key.startswith(("nnUNet", "MEDDINOV3", "OMP")):
            monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()  # -device cpu sets one thread per core, as nnUNetv2_predict does
    yield trained
    torch.set_num_threads(threads)


def oblique(image: sitk.Image, origin, angles) -> sitk.Image:
    """The image with a non-trivial origin and a proper rotation (det +1) as direction."""
    a, b = angles
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    out = sitk.Image(image)
    out.SetOrigin(origin)
    out.SetDirection(tuple((rz @ rx).flatten()))
    return out


def write_dicom_series(image: sitk.Image, folder, patient_id, description, series_uid) -> list[str]:
    """One int16 CT slice file per z, with the geometry tags SimpleITK/GDCM read back; returns the SOP UIDs."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    sop_uids = []
    for z in range(image.GetDepth()):
        slice_ = sitk.Cast(image[:, :, z], sitk.sitkInt16)
        sop_uids.append(f"{series_uid}.{z + 1}")
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": sop_uids[-1],
                "0010|0020": patient_id, "0008|103e": description, "0020|000d": STUDY_UID, "0020|000e": series_uid,
                "0020|0013": str(z + 1), "0018|0050": str(image.GetSpacing()[2]),
                "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))),
                "0020|0037": "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))}
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        # Shuffled file names: the slice order must come from the slice positions.
        writer.SetFileName(str(folder / f"IM{(7 * z + 3) % 11:04d}.dcm"))
        writer.Execute(slice_)
    return sop_uids


def read_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    # NIfTI stores geometry in float32
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


@pytest.fixture(scope="module")
def dicom_run(trained):
    """``meddinov3 predict`` (the console script) on a nested tree: two good series, two broken files and a series
    with a missing slice."""
    root, raw = trained["root"], trained["raw"]
    tree = root / "dicom_tree"
    volume_a = oblique(sitk.ReadImage(str(raw / "imagesTs" / "case_006_0000.nii.gz")), (-120.5, 33.25, 410.0),
                       (0.3, 0.2))
    volume_b = oblique(sitk.ReadImage(str(raw / "imagesTs" / "case_007_0000.nii.gz")), (10.0, -250.75, -80.5),
                       (-0.5, 0.0))
    series = {
        "a": (tree / "patient1" / "study" / "series_a", "PAT-01", "Abdomen 5mm", f"{STUDY_UID}.1"),
        "b": (tree / "patient2" / "deeper" / "series_b", "PAT 02/x", "", f"{STUDY_UID}.2"),
    }
    sop = {key: write_dicom_series(volume, *series[key]) for key, volume in (("a", volume_a), ("b", volume_b))}
    broken = tree / "patient3" / "broken"
    broken.mkdir(parents=True)
    (broken / "IM0001.dcm").write_text("not a DICOM file")
    first_slice = next((series["a"][0]).iterdir()).read_bytes()
    (broken / "IM0002.dcm").write_bytes(first_slice[: len(first_slice) // 3])  # truncated header
    gap = tree / "patient3" / "gap"  # readable, but a middle slice is missing: the geometry would be wrong
    shutil.copytree(series["a"][0], gap)
    (gap / "IM0002.dcm").unlink()  # z = 3 (the file names are shuffled)

    out, staged = root / "dicom_out", root / "dicom_staged"
    proc = run(["meddinov3", "predict", "-i", str(tree), "-o", str(out), *MODEL_ARGS, "-npp", "1", "-nps", "1",
                "--keep-staged", str(staged)], trained["env"], root)
    return {"proc": proc, "out": out, "staged": staged, "series": series, "sop": sop}


def test_dicom_series_are_predicted_with_their_geometry_and_uids(dicom_run):
    out, series = dicom_run["out"], dicom_run["series"]
    names = {"a": "PAT-01_Abdomen_5mm", "b": "PAT_02_x"}  # PatientID_SeriesDescription, file-name safe
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{e}" for n in names.values() for e in (".nii.gz",
                                                                                                        ".json"))
    for key, name in names.items():
        folder, patient_id, description, series_uid = series[key]
        seg, source = sitk.ReadImage(str(out / f"{name}.nii.gz")), read_series(folder)
        assert_same_geometry(seg, source)
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}
        sidecar = json.loads((out / f"{name}.json").read_text())
        assert sidecar["StudyInstanceUID"] == STUDY_UID and sidecar["SeriesInstanceUID"] == series_uid
        assert sidecar["SOPInstanceUIDs"] == dicom_run["sop"][key]  # slice order, not file-name order
        assert sidecar["source_folder"] == str(folder.resolve()) and len(sidecar["files"]) == 5
        assert sidecar["PatientID"] == patient_id and sidecar["output"] == f"{name}.nii.gz"


def test_broken_series_and_files_are_reported_and_skipped(dicom_run):
    stdout = dicom_run["proc"].stdout
    assert "SKIPPED patient3/broken/IM0001.dcm" in stdout and "SKIPPED patient3/broken/IM0002.dcm" in stdout
    assert f"SKIPPED patient3/gap (series {STUDY_UID}.1): cannot read: missing slices" in stdout
    assert stdout.rstrip().endswith("meddinov3 predict: 2 predicted, 3 skipped")


def test_equals_nnunet_predict_on_the_converted_files(trained, dicom_run):
    staged, out = dicom_run["staged"], dicom_run["out"]
    stock = trained["root"] / "stock_out"
    # nnU-Net's sequential mode here, its multiprocessing mode in ours: the same predictor code either way.
    run(["nnUNetv2_predict", "-i", str(staged / "imagesTs"), "-o", str(stock), *MODEL_ARGS, "-npp", "0", "-nps", "0"],
        trained["env"], trained["root"])
    cases = json.loads((staged / "cases.json").read_text())
    assert len(cases) == 2
    for staged_name, case in cases.items():
        ours, theirs = sitk.ReadImage(str(out / case["output"])), sitk.ReadImage(str(stock / f"{staged_name}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
        assert_same_geometry(ours, theirs)


def test_arbitrarily_named_images_keep_their_names(nnunet_env, tmp_path, capsys):
    images = nnunet_env["raw"] / "imagesTs"
    inputs = tmp_path / "scans"
    (inputs / "followup").mkdir(parents=True)
    shutil.copy(images / "case_006_0000.nii.gz", inputs / "Patient A scan.nii.gz")
    shutil.copy(images / "case_007_0000.nii.gz", inputs / "case_007_0000.nii.gz")  # nnU-Net naming: case_007
    source = oblique(sitk.ReadImage(str(images / "case_007_0000.nii.gz")), (5.5, -7.0, 12.0), (0.7, -0.4))
    sitk.WriteImage(source, str(inputs / "followup" / "liver.v2.nrrd"))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inputs), "-o", str(out), *MODEL_ARGS, "-npp", "0", "-nps", "0"]) == 0
    assert "3 predicted, 0 skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Patient A scan.nii.gz", "case_007.nii.gz", "liver.v2.nii.gz"]
    assert_same_geometry(sitk.ReadImage(str(out / "liver.v2.nii.gz")), source)
    assert_same_geometry(sitk.ReadImage(str(out / "Patient A scan.nii.gz")),
                         sitk.ReadImage(str(images / "case_006_0000.nii.gz")))


def test_unknown_trainer_names_the_folder_and_the_train_command(nnunet_env, tmp_path, capsys):
    args = ["predict", "-i", str(nnunet_env["raw"] / "imagesTs"), "-o", str(tmp_path / "out"), "-d", str(DATASET),
            "-c", "2d", "-tr", "nnUNetTrainerNoSuchThing"]
    assert main(args) == 2
    err = capsys.readouterr().err
    searched = nnunet_env["root"] / "res" / "Dataset502_SyntheticCT" / "nnUNetTrainerNoSuchThing__nnUNetPlans__2d"
    assert f"model folder not found: {searched}" in err
    assert f"nnUNetv2_train {DATASET} 2d FOLD -tr nnUNetTrainerNoSuchThing -p nnUNetPlans" in err
    assert f"{TINY}__nnUNetPlans__2d" in err  # what is trained instead


def test_setup_and_input_errors(nnunet_env, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["predict", "-o", str(tmp_path / "out"), *MODEL_ARGS]
    assert main([*base, "-i", str(empty)]) == 2
    assert f"no inputs found in {empty}" in capsys.readouterr().err

    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "scan.nii.gz").write_bytes(b"not gzip")
    assert main([*base, "-i", str(only_broken)]) == 1
    assert "SKIPPED scan.nii.gz: cannot read" in capsys.readouterr().out

    monkeypatch.delenv("nnUNet_results")
    assert main([*base, "-i", str(empty)]) == 2
    assert "nnUNet_results is not set" in capsys.readouterr().err


def test_a_short_series_with_truncated_first_files_is_skipped_or_predicted_partially(nnunet_env, tmp_path, capsys):
    # The first three of five slices (in position order) truncated: the two readable ones show no gap.
    volume = sitk.ReadImage(str(nnunet_env["raw"] / "imagesTs" / "case_006_0000.nii.gz"))
    tree = tmp_path / "short"
    write_dicom_series(volume, tree / "series", "PAT-03", "short", f"{STUDY_UID}.3")
    by_position = sorted(tree.joinpath("series").iterdir(), key=lambda p: sitk.ReadImage(str(p)).GetOrigin()[2])
    truncated = sorted(p.name for p in by_position[:3])
    for path in by_position[:3]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    base = ["predict", "-i", str(tree), *MODEL_ARGS, "-npp", "0", "-nps", "0"]

    assert main([*base, "-o", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"SKIPPED series (series {STUDY_UID}.3): 3 of its files cannot be read ({', '.join(truncated)})" in out
    assert all(f"SKIPPED series/{name}: unreadable DICOM file" in out for name in truncated)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    assert main([*base, "-o", str(tmp_path / "partial"), "--allow-partial-series"]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL: 3 unreadable file(s) left out" in out
    sidecar = json.loads((tmp_path / "partial" / "PAT-03_short.json").read_text())
    assert sidecar["unreadable_files"] == truncated and len(sidecar["files"]) == 2
    assert sitk.ReadImage(str(tmp_path / "partial" / "PAT-03_short.nii.gz")).GetSize()[2] == 2


def test_non_finite_voxels_are_replaced_with_a_warning(nnunet_env, tmp_path, capsys):
    image = sitk.Cast(sitk.ReadImage(str(nnunet_env["raw"] / "imagesTs" / "case_006_0000.nii.gz")), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(image)
    low, high = values.min(), values.max()
    values[0, :2, :3], values[1, 5, 5], values[2, 7, 7] = np.nan, np.inf, -np.inf
    holes = sitk.GetImageFromArray(values)
    holes.CopyInformation(image)
    inputs = tmp_path / "scans"
    inputs.mkdir()
    sitk.WriteImage(holes, str(inputs / "holes.nii.gz"))
    sitk.WriteImage(holes * np.nan, str(inputs / "all_nan.nii.gz"))
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), *MODEL_ARGS, "-npp", "0", "-nps", "0"]) == 0
    out = capsys.readouterr().out
    assert (f"WARNING holes.nii.gz: non-finite voxels replaced before predicting (6 NaN -> {low:.6g}, 1 -Inf -> "
            f"{low:.6g}, 1 +Inf -> {high:.6g})") in out
    assert "SKIPPED all_nan.nii.gz: cannot read: no finite voxel (all NaN or Inf)" in out
    assert "1 predicted, 1 skipped" in out
    assert_same_geometry(sitk.ReadImage(str(tmp_path / "out" / "holes.nii.gz")), image)


def test_replace_non_finite_per_channel_and_only_where_needed():
    from nnunet_meddinov3.inference.non_finite import replace_non_finite
    clean = sitk.GetImageFromArray(np.arange(12, dtype=np.float32).reshape(3, 4))
    ints = sitk.GetImageFromArray(np.arange(12, dtype=np.int16).reshape(3, 4))
    assert replace_non_finite([clean, ints]) == ([clean, ints], None)
    holes = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    holes[0, 0], holes[2, 3] = -np.inf, np.inf
    fixed, note = replace_non_finite([clean, sitk.GetImageFromArray(holes)])
    assert fixed[0] is clean and note.startswith("non-finite voxels replaced before predicting (channel 1: "
                                                 "1 -Inf -> -4, 1 +Inf -> 5)")
    repaired = sitk.GetArrayFromImage(fixed[1])
    assert repaired[0, 0] == -4 and repaired[2, 3] == 5 and np.isfinite(repaired).all()
