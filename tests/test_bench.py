"""``meddinov3 bench``: the tiny configuration end to end through the console script, plus its parts."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from nnunet_meddinov3.benchmark.bench import (
    BASELINE,
    OURS,
    BenchConfig,
    build_configs,
    build_meddinov3_network,
    build_nnunet_network,
    deep_supervision_targets,
    nnunet_2d_arch_kwargs,
    use_reference_layernorm,
)
from nnunet_meddinov3.cli.main import main

TINY = ["--encoders", "tiny", "--patch-sizes", "64", "--batch-size", "1", "--repeats", "2", "--warmup", "1"]


def _console_script() -> list[str]:
    script = shutil.which("meddinov3")
    return [script] if script else [sys.executable, "-m", "nnunet_meddinov3.cli.main"]


def test_tiny_bench_via_console_script(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([*_console_script(), "bench", *TINY, "--device", "cpu", "--decoders", "multiscale",
                           "--reference-layernorm", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "nnU-Net PlainConvUNet" in proc.stdout and "tiny+multiscale refLN" in proc.stdout

    report = json.loads(out.read_text())
    results = report["results"]
    # one entry per configuration: the baseline, ours, ours with the reference LayerNorm
    assert [r["label"] for r in results] == ["nnU-Net PlainConvUNet", "tiny+multiscale", "tiny+multiscale refLN"]
    assert [r["config"]["network"] for r in results] == [BASELINE, OURS, OURS]
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["parameters"] > 0
        for phase in ("training", "inference"):
            assert r[phase]["images_per_s"] > 0
            assert len(r[phase]["step_times_s"]) == 2
            assert r[phase]["peak_memory_bytes"] >= 0
            assert r[phase]["flops_per_step"] > 0
        # a training step (forward + backward) costs more FLOPs than a forward
        assert r["training"]["flops_per_step"] > r["inference"]["flops_per_step"]
    assert "ratios_to_baseline" not in results[0]
    for r in results[1:]:
        ratios = r["ratios_to_baseline"]
        assert set(ratios) == {"training_throughput", "training_memory", "inference_throughput", "inference_memory"}
        assert ratios["training_throughput"] > 0 and ratios["inference_throughput"] > 0
    assert report["meta"]["device"] == "cpu" and report["meta"]["complete"] is True
    assert "loss" in report["meta"]["method"]


def test_configs_one_per_variant_with_baseline_first():
    configs = build_configs(["tiny", "vits16"], ["multiscale", "bottleneck"], [64, 128], reference_layernorm=True,
                            batch_size=1)
    assert len(configs) == 2 * (1 + 2 * 2 * 2)
    assert configs[0].is_baseline and configs[9].is_baseline and configs[9].patch_size == 128
    assert len({(c.label, c.patch_size) for c in configs}) == len(configs)
    assert BenchConfig.from_json(configs[3].to_json()) == configs[3]


def test_baseline_is_nnunets_2d_plan():
    arch = nnunet_2d_arch_kwargs(512)["arch_kwargs"]
    # 512 -> 4: seven poolings, eight stages, 32 features doubling up to 512
    assert arch["n_stages"] == 8
    assert arch["features_per_stage"] == (32, 64, 128, 256, 512, 512, 512, 512)
    assert [list(s) for s in arch["strides"]] == [[1, 1]] + [[2, 2]] * 7
    assert arch["n_conv_per_stage"] == (2,) * 8 and arch["n_conv_per_stage_decoder"] == (2,) * 7
    assert arch["norm_op"].endswith("InstanceNorm2d") and arch["nonlin"] == "torch.nn.LeakyReLU"
    with pytest.raises(ValueError, match="nnU-Net would plan"):
        nnunet_2d_arch_kwargs(144)  # nnU-Net's topology would grow it to 160


def test_baseline_is_built_like_get_network_from_plans():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = nnunet_2d_arch_kwargs(64)
    torch.manual_seed(0)
    ours = build_nnunet_network(BenchConfig(network=BASELINE, patch_size=64, num_classes=3))
    torch.manual_seed(0)
    nnunets = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, 3, allow_init=True, deep_supervision=True)
    assert str(ours) == str(nnunets)
    for a, b in zip(ours.state_dict().values(), nnunets.state_dict().values()):
        assert torch.equal(a, b)


def test_deep_supervision_targets_match_the_outputs():
    config = BenchConfig(network=BASELINE, patch_size=64, num_classes=3)
    model = build_nnunet_network(config)
    outputs = model(torch.zeros(1, 1, 64, 64))
    labels = torch.randint(0, 3, (1, 1, 64, 64))
    targets = deep_supervision_targets(labels, nnunet_2d_arch_kwargs(64)["arch_kwargs"]["strides"])
    assert [t.shape[-2:] for t in targets] == [o.shape[-2:] for o in outputs]
    assert targets[0] is labels


@pytest.mark.parametrize("decoder,expected", [("multiscale", 4), ("bottleneck", 5)])
def test_reference_layernorm_is_the_same_function(decoder, expected):
    config = BenchConfig(network=OURS, patch_size=64, encoder="tiny", decoder=decoder, num_classes=3, dtype="fp32")
    model = build_meddinov3_network(config).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        fused = model(x)
        assert use_reference_layernorm(model) == expected
        reference = model(x)
    torch.testing.assert_close(reference, fused, rtol=1e-4, atol=1e-4)


def test_bad_patch_size_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["meddinov3"])
    assert main(["bench", *TINY[:2], "--patch-sizes", "72", "--device", "cpu"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["bench", *TINY[:2], "--patch-sizes", "144", "--device", "cpu"]) == 2
    assert "would plan a (160, 160) patch" in capsys.readouterr().err
