"""A three-stage chain end to end through the CLI, then the export: format, metadata and a strict
load into the fine-tuning encoder, by registry name."""

import pytest
import torch
from pretrain_synthetic import ct_volume, write_nifti

from nnunet_meddinov3.checkpoints import read_checkpoint, registry_entries
from nnunet_meddinov3.checkpoints import build_encoder
from pretrain.cli import main
from pretrain.data import SliceDataset
from pretrain.engine.checkpoint import list_checkpoints, read_training_checkpoint
from pretrain.engine.run_record import read_run_status
from pretrain.export import PROJECT_LICENCE, export_run
from pretrain.model import encoder_state_from_training_checkpoint

STAGES = ["tiny_stage1", "tiny_stage2_gram", "tiny_stage3_highres"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """stage 1 (6 it) -> stage 2 Gram (4 it) -> stage 3 high-res (4 it), exported as 'tiny_ct_chain'."""
    root = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        write_nifti(root / f"ct_{i}.nii.gz", ct_volume(30 + i))
    cache = tmp_path_factory.mktemp("meddinov3_cache")
    output = tmp_path_factory.mktemp("chain")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDDINOV3_CACHE", str(cache))
    code = main(["chain", "--configs", *STAGES, "--data", str(root), "--output", str(output),
                 "--export", "tiny_ct_chain", "1:train.iterations=6", "1:train.checkpoint_every=3"])
    yield {"code": code, "root": root, "cache": cache, "output": output}
    mp.undo()


def test_chain_runs_every_stage_from_the_previous_one(chain):
    assert chain["code"] == 0
    dirs = sorted(p for p in chain["output"].iterdir() if p.name[:2].isdigit())
    assert [d.name for d in dirs] == ["01_tiny_stage1", "02_tiny_stage2_gram", "03_tiny_stage3_highres"]
    assert [read_run_status(d)["status"] for d in dirs] == ["finished"] * 3
    stage2 = read_training_checkpoint(dirs[1])
    stage1_last = str(list_checkpoints(dirs[0])[-1][1])
    assert stage2["config"]["init"]["checkpoint"] == stage1_last
    assert stage2["stage_record"]["gram_teacher"] == stage1_last  # gram.teacher: previous
    stage3 = read_training_checkpoint(dirs[2])
    assert [s["name"] for s in stage3["history"]] == ["tiny_stage1", "tiny_stage2_gram"]
    assert len(list((chain["output"] / "slice_cache").glob("*/index-*.json"))) == 1  # one cache for all stages

    # --resume skips finished stages and changes nothing
    before = {d.name: [i for i, _ in list_checkpoints(d)] for d in dirs}
    assert main(["chain", "--configs", *STAGES, "--data", str(chain["root"]), "--output", str(chain["output"]),
                 "--resume", "1:train.iterations=6", "1:train.checkpoint_every=3"]) == 0
    assert {d.name: [i for i, _ in list_checkpoints(d)] for d in dirs} == before


def test_export_is_in_the_registry_and_loads_strictly(chain, monkeypatch):
    monkeypatch.setenv("MEDDINOV3_CACHE", str(chain["cache"]))
    path = chain["cache"] / "exports" / "tiny_ct_chain.safetensors"
    assert path.is_file() and "tiny_ct_chain" in registry_entries()

    encoder = build_encoder("meddinov3_tiny", checkpoint="tiny_ct_chain").eval()  # strict, by registry name
    teacher = build_encoder("meddinov3_tiny").eval()
    last_stage = sorted(p for p in chain["output"].iterdir() if p.name.startswith("03"))[0]
    teacher.load_state_dict(encoder_state_from_training_checkpoint(read_training_checkpoint(last_stage)))
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_tokens(x), teacher.forward_tokens(x), rtol=1e-5, atol=1e-5)
        # the RGB kernel of the format: a gray image repeated to 3 channels gives the same features
        rgb = build_encoder("meddinov3_tiny", in_channels=3, checkpoint=str(path)).eval()
        torch.testing.assert_close(rgb.forward_tokens(x.repeat(1, 3, 1, 1)), teacher.forward_tokens(x),
                                   rtol=1e-4, atol=1e-4)


def test_export_metadata(chain):
    metadata = read_checkpoint(chain["cache"] / "exports" / "tiny_ct_chain.safetensors").metadata
    assert metadata.architecture["embed_dim"] == 64 and metadata.architecture["depth"] == 4
    assert metadata.architecture["drop_path_rate"] == 0.0 and metadata.in_channels == 3
    assert metadata.intensity == {"kind": "ct", "window": [-1000.0, 1000.0], "mean": 65.1084, "std": 178.0166}
    assert metadata.pretraining_resolution == 128
    assert [(s["name"], s["stage"], s["iterations"]) for s in metadata.stages] == [
        ("tiny_stage1", "self_distillation", 6), ("tiny_stage2_gram", "gram_anchoring", 4),
        ("tiny_stage3_highres", "high_resolution", 4)]
    slices = SliceDataset([chain["root"]], chain["output"] / "slice_cache")
    assert metadata.data_manifest_sha256 == slices.manifest_sha256
    assert metadata.licence == PROJECT_LICENCE  # trained from scratch
    assert "MedDINOv3" in metadata.citation and "DINOv3" in metadata.citation
    assert metadata.source["run"] == "03_tiny_stage3_highres" and metadata.source["iteration"] == 4


def test_export_cli_to_a_path_and_licence_of_released_weights(chain, tmp_path):
    stage1 = chain["output"] / "01_tiny_stage1"
    out = tmp_path / "stage1.safetensors"
    assert main(["export", "--run", str(stage1), "--output", str(out)]) == 0
    assert [s["name"] for s in read_checkpoint(out).metadata.stages] == ["tiny_stage1"]

    # a run that started from released (Meta / MedDINOv3) weights inherits the DINOv3 License
    state = read_training_checkpoint(stage1)
    state["provenance"] = {"init": {"kind": "weights"}, "licence": "DINOv3 License (test)",
                           "start_weights": {"source": "dinov3_vitb16.pth", "layout": "dinov3_reference"}}
    fake = tmp_path / "run" / "checkpoints" / "checkpoint_00000006.pt"
    fake.parent.mkdir(parents=True)
    torch.save({k: v for k, v in state.items() if k != "path"}, fake)
    _, metadata = export_run(tmp_path / "run", output=tmp_path / "from_released.safetensors")
    assert metadata.licence == "DINOv3 License (test)"
    assert metadata.source["start_weights"]["source"] == "dinov3_vitb16.pth"


def test_export_cli_refuses_an_output_that_is_not_safetensors(chain, tmp_path, capsys):
    stage1 = chain["output"] / "01_tiny_stage1"
    assert main(["export", "--run", str(stage1), "--output", str(tmp_path / "stage1.pt")]) == 2
    assert "must end in '.safetensors'" in capsys.readouterr().err
    assert not list(tmp_path.glob("stage1*"))
    # a folder as the output, and an export (not a run) as --run: a message each, no traceback
    assert main(["export", "--run", str(stage1), "--output", str(tmp_path)]) == 2
    assert "is a folder; give the file's name" in capsys.readouterr().err
    exported = tmp_path / "stage1.safetensors"
    assert main(["export", "--run", str(stage1), "--output", str(exported)]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(exported), "--output", str(tmp_path / "again.safetensors")]) == 2
    assert "is not a pretraining checkpoint of this project" in capsys.readouterr().err
