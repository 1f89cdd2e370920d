"""``meddinov3 bench``: the tiny configuration end to end through the console script, plus its parts.

The MedDINOv3 reference comparison (``--reference-repo``) runs against tests/fixtures/reference_standin,
a tiny stand-in written for these tests in the reference repository's layout (CI has no checkout of
the reference, and this repository may not carry its code).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nnunet_meddinov3.benchmark.bench import (
    BASELINE,
    OURS,
    REFERENCE,
    REFERENCE_PACKAGE_PARENT,
    BenchConfig,
    ReferenceRepoError,
    add_reference_ratios,
    build_configs,
    format_table,
    grad_scaler_report,
    measure,
    nnunet_2d_arch_kwargs,
    plan_2d,
    plan_3d,
    reference_parameter_groups,
    resolve_reference_repo,
)
from nnunet_meddinov3.benchmark.baseline import NNUNetParts
from nnunet_meddinov3.benchmark.factories import build_meddinov3_network, build_nnunet_network
from nnunet_meddinov3.network.volumetric import MedDINOv3Net3D
from nnunet_meddinov3.cli.main import main

TINY = ["--encoders", "tiny", "--patch-sizes", "64", "--batch-size", "1", "--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="session")
def standin(fixtures):
    """The stand-in reference checkout, repository-root layout."""
    return fixtures / "reference_standin"


def _console_script() -> list[str]:
    script = shutil.which("meddinov3")
    return [script] if script else [sys.executable, "-m", "nnunet_meddinov3.cli.main"]


def test_tiny_bench_via_console_script(tmp_path, standin):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "MEDDINOV3_REFERENCE_REPO"}
    # each configuration is a worker process that imports torch and nnU-Net: a decoder without a reference
    # (bottleneck) is left to the interleaved run below, which has all of them in one process
    proc = subprocess.run([*_console_script(), "bench", *TINY, "--device", "cpu", "--decoders", "multiscale",
                           "--reference-repo", str(standin), "-o", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "nnU-Net PlainConvUNet" in proc.stdout and "reference tiny+multiscale" in proc.stdout
    assert "x ref" in proc.stdout

    report = json.loads(out.read_text())
    results = report["results"]
    # per patch: the baseline, then per encoder x decoder ours followed by the reference of that decoder
    assert [r["label"] for r in results] == ["nnU-Net PlainConvUNet", "tiny+multiscale", "reference tiny+multiscale"]
    assert [r["config"]["network"] for r in results] == [BASELINE, OURS, REFERENCE]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["parameters"] > 0
        assert r["effective_dtype"] == "fp32"  # CPU
        for phase in ("training", "inference"):
            assert r[phase]["images_per_s"] > 0
            assert len(r[phase]["step_times_s"]) == 2
            assert r[phase]["peak_memory_bytes"] >= 0
            assert r[phase]["flops_per_step"] > 0
            assert "grad_scaler" not in r[phase]  # the reference's GradScaler is CUDA only
        # a training step (forward + backward) costs more FLOPs than a forward
        assert r["training"]["flops_per_step"] > r["inference"]["flops_per_step"]
    baseline, ours, reference = results
    assert reference["config"]["reference_repo"] == str(standin / REFERENCE_PACKAGE_PARENT)
    assert "ratios_to_baseline" not in baseline
    for r in results[1:]:
        ratios = r["ratios_to_baseline"]
        assert set(ratios) == {f"{phase}_{what}" for phase in ("training", "inference")
                               for what in ("throughput", "step_time", "memory")}
        assert ratios["training_throughput"] > 0 and ratios["inference_throughput"] > 0
        assert ratios["training_step_time"] == pytest.approx(1 / ratios["training_throughput"])
    ratios = ours["ratios_to_reference"]
    assert set(ratios) == {"training_throughput", "training_step_time", "training_memory", "inference_throughput",
                           "inference_memory"}
    assert ratios["training_throughput"] == pytest.approx(
        ours["training"]["images_per_s"] / reference["training"]["images_per_s"])
    assert ratios["training_step_time"] == pytest.approx(1 / ratios["training_throughput"])
    assert ratios["inference_throughput"] > 0
    for r in (baseline, reference):
        assert "ratios_to_reference" not in r
    assert report["meta"]["device"] == "cpu" and report["meta"]["complete"] is True
    assert "loss" in report["meta"]["method"] and "reference" in report["meta"]["method"]
    assert report["meta"]["reference"]["import_root"] == str(standin / REFERENCE_PACKAGE_PARENT)


def test_interleaved_bench_times_all_training_steps_in_one_process(tmp_path, standin):
    """--interleave: round-robin training steps; --plain-decoder-too adds ours with the decoder's plain path;
    a decoder the reference does not have (bottleneck) is measured, with a note and without a reference."""
    out = tmp_path / "interleaved.json"
    env = {k: v for k, v in os.environ.items() if k != "MEDDINOV3_REFERENCE_REPO"}
    proc = subprocess.run([*_console_script(), "bench", *TINY, "--device", "cpu", "--dtype", "fp32",
                           "--decoders", "multiscale", "bottleneck", "--interleave", "--plain-decoder-too",
                           "--reference-repo", str(standin), "-o", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "round 3/3" in proc.stderr  # 1 warm-up + 2 timed rounds
    assert "no reference configuration for the bottleneck decoder" in proc.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    # ours followed by the reference of that decoder; the reference has no bottleneck decoder
    assert [r["label"] for r in results] == ["nnU-Net PlainConvUNet", "tiny+multiscale",
                                             "tiny+multiscale plain-decoder", "reference tiny+multiscale",
                                             "tiny+bottleneck", "tiny+bottleneck plain-decoder"]
    assert [r["config"]["network"] for r in results] == [BASELINE, OURS, OURS, REFERENCE, OURS, OURS]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["interleaved"] is True and "inference" not in r
        assert len(r["training"]["step_times_s"]) == 2 and r["training"]["peak_memory_bytes"] is None
    ours, plain = results[1], results[2]
    assert plain["config"]["plain_decoder"] is True and ours["config"]["plain_decoder"] is False
    for r in (ours, plain):
        assert r["ratios_to_reference"]["training_step_time"] == pytest.approx(
            r["training"]["median_step_s"] / results[3]["training"]["median_step_s"])
    for r in results[4:]:
        assert "ratios_to_reference" not in r and r["ratios_to_baseline"]["training_throughput"] > 0
    assert "interleaved" in report["meta"]["method"] and report["meta"]["complete"] is True
    assert "median training step (s):" in proc.stdout
    assert "tiny+multiscale plain-decoder:" in proc.stdout and "x the reference's" in proc.stdout


def test_profile_lists_the_ops_with_the_most_self_time(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDDINOV3_REFERENCE_REPO", raising=False)
    out = tmp_path / "profile.json"
    assert main(["bench", *TINY, "--device", "cpu", "--no-baseline", "--decoders", "single", "--profile",
                 "-o", str(out)]) == 0
    profile = json.loads(out.read_text())["results"][0]["training"]["profile"]
    assert profile["clock"] == "cpu" and 0 < len(profile["top"]) <= 15
    self_ms = [entry["self_ms"] for entry in profile["top"]]
    assert self_ms == sorted(self_ms, reverse=True) and sum(self_ms) <= profile["total_self_ms"] + 1e-6
    assert any(entry["name"] in ("aten::mm", "aten::addmm") for entry in profile["top"])  # the GEMMs show
    stdout = capsys.readouterr().out
    assert "tiny+single: one training step" in stdout and profile["top"][0]["name"][:40] in stdout
    # each configuration is profiled in its own process, which --interleave does not have
    assert main(["bench", *TINY, "--device", "cpu", "--interleave", "--profile"]) == 2
    assert "without --interleave" in capsys.readouterr().err


def test_wrong_reference_repo_exits_2_naming_both_layouts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDDINOV3_REFERENCE_REPO", raising=False)
    assert main(["bench", *TINY, "--device", "cpu", "--reference-repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / REFERENCE_PACKAGE_PARENT / "dinov3" / "models") in err
    assert str(tmp_path / "dinov3" / "models") in err and "vision_transformer" in err and "primus" in err
    assert "git clone https://github.com/ricklisz/MedDINOv3" in err
    # the environment variable is the default, and is checked the same way
    monkeypatch.setenv("MEDDINOV3_REFERENCE_REPO", str(tmp_path / "missing"))
    assert main(["bench", *TINY, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "MEDDINOV3_REFERENCE_REPO" in err and str(tmp_path / "missing") in err


def test_reference_repo_accepts_both_layouts(standin, tmp_path):
    package_parent = standin / REFERENCE_PACKAGE_PARENT
    assert resolve_reference_repo(standin) == str(package_parent)
    assert resolve_reference_repo(package_parent) == str(package_parent)
    (tmp_path / "dinov3" / "models").mkdir(parents=True)
    (tmp_path / "dinov3" / "models" / "vision_transformer.py").write_text("")
    with pytest.raises(ReferenceRepoError, match="primus"):  # half a checkout is refused too
        resolve_reference_repo(tmp_path)


def test_configs_one_per_variant_with_baseline_first(standin):
    configs = build_configs(["tiny", "vits16"], ["multiscale", "single", "bottleneck"], [64, 128],
                            reference_repo=str(standin), batch_size=1, grad_checkpointing=True)
    # per patch: baseline + per encoder (3 of ours + references for multiscale and single)
    assert len(configs) == 2 * (1 + 2 * (3 + 2))
    assert configs[0].is_baseline and configs[11].is_baseline and configs[11].patch_size == 128
    assert [c.label for c in configs[:6]] == [
        "nnU-Net PlainConvUNet", "tiny+multiscale ckpt", "reference tiny+multiscale", "tiny+single ckpt",
        "reference tiny+single", "tiny+bottleneck ckpt"]
    references = [c for c in configs if c.is_reference]
    assert len(references) == 8 and {c.decoder for c in references} == {"multiscale", "single"}
    # the reference has no activation checkpointing; it gets the resolved package folder
    assert not any(c.grad_checkpointing for c in references)
    assert {c.reference_repo for c in references} == {str(standin / REFERENCE_PACKAGE_PARENT)}
    assert all(c.reference_repo is None for c in configs if not c.is_reference)
    assert len({(c.label, c.patch_size) for c in configs}) == len(configs)
    assert BenchConfig.from_json(configs[2].to_json()) == configs[2]
    assert not any(c.is_reference for c in build_configs(["tiny"], ["multiscale"], [64]))


def test_reference_refuses_other_channel_counts(standin):
    with pytest.raises(ValueError, match="1 input channel"):
        build_configs(["tiny"], ["multiscale"], [64], reference_repo=str(standin), input_channels=3)


def test_reference_optimizer_groups_split_on_dino_encoder():
    model = torch.nn.Module()
    model.dino_encoder = torch.nn.Linear(4, 4)
    model.up_projection = torch.nn.Conv2d(4, 2, 1)
    encoder, decoder = reference_parameter_groups(model)
    assert [p.shape for p in encoder["params"]] == [p.shape for p in model.dino_encoder.parameters()]
    assert [p.shape for p in decoder["params"]] == [p.shape for p in model.up_projection.parameters()]
    assert (encoder["lr"], decoder["lr"]) == (3e-5, 3e-4)
    assert encoder["weight_decay"] == decoder["weight_decay"] == 0.05


def _entry(network, decoder, images_per_s, memory, encoder="tiny"):
    config = {"network": network, "encoder": encoder, "decoder": decoder, "patch_size": 64, "batch_size": 2,
              "device": "cuda", "dtype": "bf16"}
    phase = {"images_per_s": images_per_s, "median_step_s": 2 / images_per_s, "peak_memory_bytes": memory}
    return {"label": f"{network} {decoder}", "config": config, "training": dict(phase), "inference": dict(phase)}


def test_reference_ratios_pair_ours_with_the_same_encoder_and_decoder():
    results = [_entry(OURS, "multiscale", 30.0, 2 ** 30), _entry(REFERENCE, "multiscale", 20.0, 2 ** 31),
               _entry(OURS, "bottleneck", 40.0, 2 ** 29), _entry(OURS, "multiscale", 10.0, 2 ** 30, encoder="vits16")]
    add_reference_ratios(results)
    ratios = results[0]["ratios_to_reference"]
    assert ratios["training_throughput"] == pytest.approx(1.5)
    assert ratios["training_step_time"] == pytest.approx(2 / 3)
    assert ratios["training_memory"] == pytest.approx(0.5) and ratios["inference_memory"] == pytest.approx(0.5)
    assert ratios["inference_throughput"] == pytest.approx(1.5)
    assert all("ratios_to_reference" not in r for r in results[1:])
    table = format_table(results)
    assert "x ref" in table.splitlines()[0] and "x ref:" in table
    assert " 1.50 " in table.splitlines()[2]


def test_grad_scaler_report_counts_halvings():
    assert grad_scaler_report(65536.0, 16384.0)["skipped_timed_steps"] == 2
    assert grad_scaler_report(65536.0, 65536.0)["skipped_timed_steps"] == 0


def test_baseline_is_nnunets_2d_plan():
    arch = nnunet_2d_arch_kwargs(512)["arch_kwargs"]
    # 512 -> 4: seven poolings, eight stages, 32 features doubling up to 512 (lists, as in plans.json)
    assert arch["n_stages"] == 8
    assert arch["features_per_stage"] == [32, 64, 128, 256, 512, 512, 512, 512]
    assert arch["strides"] == [[1, 1]] + [[2, 2]] * 7
    assert arch["n_conv_per_stage"] == [2] * 8 and arch["n_conv_per_stage_decoder"] == [2] * 7
    assert arch["norm_op"].endswith("InstanceNorm2d") and arch["nonlin"] == "torch.nn.LeakyReLU"
    with pytest.raises(ValueError, match="nnU-Net would plan"):
        nnunet_2d_arch_kwargs(144)  # nnU-Net's topology would grow it to 160
    # a large patch is kept: the planner's VRAM loop does not shrink it
    assert plan_2d(896)["plans"]["configurations"]["2d"]["patch_size"] == [896, 896]


def test_baseline_is_built_like_get_network_from_plans():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = nnunet_2d_arch_kwargs(64)
    parts = NNUNetParts.build(plan_2d(64, num_classes=3), torch.device("cpu"))
    torch.manual_seed(0)
    ours = build_nnunet_network(BenchConfig(network=BASELINE, patch_size=64, num_classes=3), parts)
    torch.manual_seed(0)
    nnunets = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, 3, allow_init=True, deep_supervision=True)
    assert str(ours) == str(nnunets)
    for a, b in zip(ours.state_dict().values(), nnunets.state_dict().values()):
        assert torch.equal(a, b)
    # nnU-Net's loss: deep-supervision weights 1/2^i, the lowest resolution 0, normalised
    weights = parts.loss.weight_factors
    assert len(weights) == 4 and weights[-1] == 0 and sum(weights) == pytest.approx(1)
    assert weights[0] == pytest.approx(2 * weights[1])
    optimizer = parts.build_optimizer(ours)
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["momentum"] == 0.99
    assert optimizer.defaults["nesterov"] and optimizer.defaults["lr"] == 1e-2


def test_deep_supervision_targets_match_the_outputs():
    config = BenchConfig(network=BASELINE, patch_size=64, num_classes=3)
    parts = NNUNetParts.build(plan_2d(64, num_classes=3), torch.device("cpu"))
    model = build_nnunet_network(config, parts)
    outputs = model(torch.zeros(2, 1, 64, 64))
    labels = torch.randint(0, 3, (2, 1, 64, 64))
    targets = parts.deep_supervision_targets(labels)
    assert [t.shape for t in targets] == [(2, 1, *o.shape[-2:]) for o in outputs]
    assert torch.equal(targets[0], labels) and targets[1].dtype == labels.dtype
    # nnU-Net's data loader downsamples with 'nearest-exact': the centre pixel of each 2x2 block
    assert torch.equal(targets[1], labels[..., 1::2, 1::2])
    # our network is trained without deep supervision, with nnU-Net's loss on its one output
    single = NNUNetParts.build(plan_2d(64, num_classes=3), torch.device("cpu"), deep_supervision=False)
    assert type(single.loss).__name__ == "DC_and_CE_loss"


def test_bad_patch_size_is_refused(capsys):
    assert main(["bench", *TINY[:2], "--patch-sizes", "72", "--device", "cpu"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["bench", *TINY[:2], "--patch-sizes", "144", "--device", "cpu"]) == 2
    assert "would plan a (160, 160) patch" in capsys.readouterr().err


def test_cpu_bf16_runs_ours_in_bf16_and_leaves_the_baseline_and_reference_fp32(standin, monkeypatch):
    monkeypatch.setattr("nnunet_meddinov3.network.meddinov3_net.cpu_has_native_bf16", lambda: True)
    configs = build_configs(["tiny"], ["multiscale"], [64], reference_repo=str(standin), batch_size=1,
                            warmup=0, repeats=1, cpu_bf16=True)
    assert [(c.label, c.runs_cpu_bf16) for c in configs] == [
        ("nnU-Net PlainConvUNet", False), ("tiny+multiscale bf16", True), ("reference tiny+multiscale", False)]
    on_cuda = dataclasses.replace(configs[1], device="cuda", dtype="fp32")  # --cpu-bf16 means nothing there
    assert not on_cuda.runs_cpu_bf16 and on_cuda.label == "tiny+multiscale"
    assert build_meddinov3_network(on_cuda).autocast_dtype is None
    assert build_meddinov3_network(configs[1]).cpu_autocast
    assert not build_meddinov3_network(dataclasses.replace(configs[1], cpu_bf16=False)).cpu_autocast
    result = measure(configs[1])
    assert result["effective_dtype"] == "bf16" and result["training"]["images_per_s"] > 0


TINY_3D = ["--encoders", "tiny", "--decoders", "multiscale", "--patch-3d", "4", "32", "32", "--batch-size", "1",
           "--repeats", "2", "--warmup", "1", "--device", "cpu"]


def test_3d_bench_measures_meddinov3net3d_per_context_against_nnunet_3d_fullres(tmp_path, capsys, monkeypatch):
    """--patch-3d: each configuration in its own worker process, nnU-Net's 3d_fullres network first."""
    monkeypatch.delenv("MEDDINOV3_REFERENCE_REPO", raising=False)
    out = tmp_path / "bench3d.json"
    assert main(["bench", *TINY_3D, "--contexts", "slice_attention", "-o", str(out)]) == 0  # one worker each
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == ["nnU-Net 3d_fullres PlainConvUNet", "tiny+multiscale 3D slice_attention"]
    baseline, *ours = results
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["config"]["patch_size"] == [4, 32, 32]  # no 2D patch when only --patch-3d is given
        for phase in ("training", "inference"):
            assert r[phase]["images_per_s"] > 0 and len(r[phase]["step_times_s"]) == 2
            assert r[phase]["peak_memory_bytes"] > 0 and r[phase]["flops_per_step"] > 0
    assert "ratios_to_baseline" not in baseline and "context_parameters" not in baseline
    for r in ours:
        assert r["config"]["network"] == OURS and r["context_parameters"] > 0
        ratios = r["ratios_to_baseline"]
        for phase in ("training", "inference"):
            assert ratios[f"{phase}_step_time"] == pytest.approx(
                r[phase]["median_step_s"] / baseline[phase]["median_step_s"])
            assert ratios[f"{phase}_memory"] == pytest.approx(
                r[phase]["peak_memory_bytes"] / baseline[phase]["peak_memory_bytes"])
    stdout = capsys.readouterr().out
    assert "4x32x32" in stdout and "ratios to the nnU-Net network" in stdout
    assert "tiny+multiscale 3D slice_attention @ 4x32x32: training step" in stdout and "context parameters" in stdout


def test_3d_baseline_is_nnunets_3d_fullres_plan_with_the_slice_axis_first():
    plan = plan_3d((8, 64, 64))
    assert plan["configuration"] == "3d_fullres" and plan["plans"]["transpose_forward"] == [0, 1, 2]
    arch = plan["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["conv_op"].endswith("Conv3d") and arch["norm_op"].endswith("InstanceNorm3d")
    # CT-like spacing: the thick-slice axis is not pooled, nor convolved across, at full resolution
    assert arch["kernel_sizes"][0] == [1, 3, 3] and arch["strides"][1] == [1, 2, 2]
    parts = NNUNetParts.build(plan_3d((4, 32, 32), num_classes=3), torch.device("cpu"))
    model = build_nnunet_network(BenchConfig(network=BASELINE, patch_size=(4, 32, 32), num_classes=3), parts)
    outputs = model(torch.zeros(1, 1, 4, 32, 32))
    targets = parts.deep_supervision_targets(torch.randint(0, 3, (1, 1, 4, 32, 32)))
    assert [t.shape for t in targets] == [(1, 1, *o.shape[2:]) for o in outputs]


def test_3d_patch_nnunet_would_change_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("MEDDINOV3_REFERENCE_REPO", raising=False)
    with pytest.raises(ValueError, match=r"would plan a \(8, 160, 160\) 3d_fullres patch"):
        plan_3d((8, 144, 144))  # nnU-Net's topology pads 144 to 160
    with pytest.raises(ValueError, match="slice axis .first. must have the largest spacing"):
        plan_3d((8, 64, 64), spacing=(0.8, 0.8, 2.5))  # nnU-Net would transpose the slice axis first
    assert main(["bench", *TINY_3D[:4], "--patch-3d", "8", "144", "144", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "would plan a (8, 160, 160)" in err and "--no-baseline" in err
    assert main(["bench", *TINY_3D[:4], "--patch-3d", "8", "72", "72", "--device", "cpu"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["bench", *TINY_3D[:4], "--patch-3d", "1", "32", "32", "--device", "cpu"]) == 2
    assert "S >= 2" in capsys.readouterr().err
    assert main(["bench", *TINY_3D, "--contexts", "slice_conv"]) == 2
    assert "unknown ['slice_conv']" in capsys.readouterr().err


def test_3d_configs_one_per_context_and_no_reference(standin):
    configs = build_configs(["tiny"], ["multiscale"], [64, (8, 64, 64)], reference_repo=str(standin),
                            contexts=("slice_attention", "none"), batch_size=1)
    assert [(c.label, c.patch_size) for c in configs] == [
        ("nnU-Net PlainConvUNet", 64), ("tiny+multiscale", 64), ("reference tiny+multiscale", 64),
        ("nnU-Net 3d_fullres PlainConvUNet", (8, 64, 64)), ("tiny+multiscale 3D slice_attention", (8, 64, 64)),
        ("tiny+multiscale 3D none", (8, 64, 64))]
    assert BenchConfig.from_json(configs[4].to_json()) == configs[4]  # the JSON list comes back a tuple
    assert configs[4].spatial_shape == (8, 64, 64) and configs[1].spatial_shape == (64, 64)
    network = build_meddinov3_network(configs[4])
    assert isinstance(network, MedDINOv3Net3D) and network.context == "slice_attention"


def test_interleaved_3d_run_times_inference_steps_too(tmp_path, capsys, monkeypatch):
    """--interleave-inference: each round's training step is followed by a timed inference step, so inference
    ratios to nnU-Net's 3d_fullres network come from the same rounds."""
    monkeypatch.delenv("MEDDINOV3_REFERENCE_REPO", raising=False)
    out = tmp_path / "interleaved3d.json"
    assert main(["bench", *TINY_3D, "--contexts", "none", "--interleave", "--interleave-inference",
                 "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    baseline, ours = report["results"]
    for r in (baseline, ours):
        assert r["interleaved"] is True and "error" not in r, r.get("error")
        for phase in ("training", "inference"):
            assert len(r[phase]["step_times_s"]) == 2 and r[phase]["peak_memory_bytes"] is None
    assert ours["ratios_to_baseline"]["inference_step_time"] == pytest.approx(
        ours["inference"]["median_step_s"] / baseline["inference"]["median_step_s"])
    assert ours["context_parameters"] == 0 and "interleaved_inference" in report["meta"]["method"]
    assert "inference step" in capsys.readouterr().out
    assert main(["bench", *TINY_3D, "--interleave-inference"]) == 2
    assert "add --interleave" in capsys.readouterr().err
