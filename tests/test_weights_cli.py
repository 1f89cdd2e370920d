"""`meddinov3 weights list | info | convert | verify | fetch`.

The console script runs in a subprocess for list, fetch and verify (list and fetch import no torch,
so they stay quick); the other cases call the same entry point in-process to keep the file fast.
"""
import os
import subprocess

import pytest

from nnunet_meddinov3.cli.main import main


def weights_cli(*args, env=None, timeout=120):
    return subprocess.run(["meddinov3", "weights", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture()
def run_main(monkeypatch, capsys):
    def run(*args):
        code = main(["weights", *map(str, args)])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("MEDDINOV3_CACHE", str(folder))
    return folder


@pytest.fixture()
def converted(fixtures, tmp_path, run_main):
    dst = tmp_path / "meddino.safetensors"
    code, out, err = run_main("convert", fixtures / "meddino_tiny_teacher.pth", dst, "--intensity", "ct-meddinov3",
                              "--resolution", "256")
    assert code == 0, err
    assert "dinov3_training" in out and "norm_eps=1e-06" in out and "rope_dtype=bf16" in out
    return dst


def test_list_shows_the_registry_and_what_is_cached(cache):
    (cache / "meddinov3-vitb16-ct3m.safetensors").write_bytes(b"")
    result = weights_cli("list", env={"MEDDINOV3_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    table, _, note = result.stdout.partition("\n\n")
    lines = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert str(cache / "meddinov3-vitb16-ct3m.safetensors") in lines["meddinov3-vitb16-ct3m"]
    assert "meddinov3_vitb16" in lines["meddinov3-vitb16-ct3m"] and "DINOv3 License" in lines["meddinov3-vitb16-ct3m"]
    assert lines["dinov3-vitb16-lvd1689m"].split()[-1] == "no" and "gated" in lines["dinov3-vitb16-lvd1689m"]
    # the licence is never cut, and every official ViT has an encoder this version builds
    assert "model card declares apache-2.0" in lines["meddinov3-vitb16-ct3m"]
    assert "vits16plus" in lines["dinov3-vits16plus-lvd1689m"] and "vit7b16" in lines["dinov3-vit7b16-lvd1689m"]
    assert "ENCODER (none)" not in note


def test_fetch_offline_is_a_clear_error(cache, tmp_path):
    env = {"MEDDINOV3_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = weights_cli("fetch", "meddinov3-vitb16-ct3m", env=env)
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE is set and the file is not in the local Hugging Face cache" in result.stderr
    assert "ricklisz123/MedDINOv3-ViTB-16-CT-3M" in result.stderr and "Traceback" not in result.stderr

    env = {"MEDDINOV3_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env_no_offline = {k: v for k, v in {**os.environ, **env}.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run(["meddinov3", "weights", "fetch", "meddinov3-vitb16-ct3m"], capture_output=True,
                            text=True, env=env_no_offline, timeout=60)
    assert result.returncode == 1
    assert "http://127.0.0.1:9 is unreachable" in result.stderr and "you seem to be offline" in result.stderr
    assert not list(cache.iterdir())


def test_verify_rebuilds_and_runs_the_encoder(converted):
    result = weights_cli("verify", converted)
    assert result.returncode == 0, result.stderr
    assert "tensor and metadata sha256 match" in result.stdout
    assert "rope_dtype=bf16" in result.stdout and "all finite" in result.stdout


def test_verify_refuses_what_is_not_in_the_format(fixtures, run_main):
    code, _, err = run_main("verify", fixtures / "official_tiny.pth")
    assert code == 1 and "PyTorch (torch.save) checkpoint" in err and "meddinov3 weights convert" in err


def test_verify_reports_tampering(converted, run_main):
    data = bytearray(converted.read_bytes())
    data[-1] ^= 0xFF
    converted.write_bytes(bytes(data))
    code, _, err = run_main("verify", converted)
    assert code == 1 and "tensor sha256 mismatch" in err


def test_info_of_our_format(converted, run_main):
    code, out, _ = run_main("info", converted)
    assert code == 0
    assert "format: meddinov3 safetensors v1" in out and "norm_eps: 1e-06" in out and "rope_dtype: bf16" in out
    assert "'kind': 'ct'" in out and "pretraining resolution: 256" in out
    assert "meddino_tiny_teacher.pth" in out  # the source file name and its sha256
    assert "vit.blocks.*.attn.qkv.weight" in out and "x4" in out


def test_info_of_a_foreign_layout(fixtures, run_main):
    code, out, _ = run_main("info", fixtures / "official_tiny.pth")
    assert code == 0
    assert "layout: dinov3_reference" in out and "named configs that fit the shapes: tiny" in out
    assert "'norm_eps': 1e-05" in out and "blocks.*.attn.qkv.bias_mask" in out


def test_convert_choices_and_refusals(fixtures, tmp_path, run_main):
    dst = tmp_path / "official.safetensors"
    code, out, _ = run_main("convert", fixtures / "official_tiny.pth", dst, "--encoder", "tiny", "--licence", "test")
    assert code == 0 and "licence: test" in out
    code, _, err = run_main("convert", fixtures / "official_tiny.pth", dst)
    assert code == 1 and "--force" in err
    code, _, err = run_main("convert", fixtures / "official_tiny.pth", tmp_path / "x.safetensors",
                            "--encoder", "meddinov3_tiny")
    assert code == 1 and "unexpected in checkpoint" in err and "official DINOv3 layout" in err
    code, _, err = run_main("convert", fixtures / "official_tiny.pth", tmp_path / "x.pth")
    assert code == 1 and ".safetensors" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_fetch_explains_what_cannot_be_fetched(cache, run_main):
    code, _, err = run_main("fetch", "dinov3-vitl16plus-lvd1689m")  # no download source
    assert code == 1 and "cannot be fetched automatically" in err
    code, _, err = run_main("fetch", "no-such-model")
    assert code == 1 and "not registered" in err and "meddinov3-vitb16-ct3m" in err


def test_fetch_checks_the_sha256_and_converts_into_the_cache(fixtures, cache, tmp_path, run_main, monkeypatch):
    # The download itself needs the network; everything after it runs here on a stand-in file.
    import nnunet_meddinov3.checkpoints.registry as registry_module
    import nnunet_meddinov3.cli.weights as weights_module
    from nnunet_meddinov3.checkpoints import read_checkpoint
    from nnunet_meddinov3.checkpoints.format import file_sha256

    downloaded = tmp_path / "model.pth"
    downloaded.write_bytes((fixtures / "meddino_tiny_teacher.pth").read_bytes())
    entry = {"name": "tiny-ct", "hf_repo": "someone/tiny-ct", "hf_filename": "model.pth", "file": "tiny-ct.pth",
             "sha256": "0" * 64, "encoder": "meddinov3_tiny", "licence": "DINOv3 License (derived)",
             "intensity": {"kind": "ct", "window": [-1000, 1000], "mean": 65.1084, "std": 178.0166}}
    monkeypatch.setattr(registry_module, "registry_entries", lambda: {"tiny-ct": entry})
    monkeypatch.setattr(weights_module, "download_from_hub", lambda repo, filename, revision=None: downloaded)

    code, _, err = run_main("fetch", "tiny-ct")
    assert code == 1 and "refusing to convert" in err and not (cache / "tiny-ct.safetensors").exists()

    entry["sha256"] = file_sha256(downloaded)
    code, out, err = run_main("fetch", "tiny-ct")
    assert code == 0, err
    assert "matches the registry" in out and str(cache / "tiny-ct.safetensors") in out
    md = read_checkpoint(cache / "tiny-ct.safetensors").metadata
    assert md.source["hf_repo"] == "someone/tiny-ct" and md.source["sha256"] == entry["sha256"]
    assert md.intensity["kind"] == "ct" and md.licence == "DINOv3 License (derived)"
    code, out, _ = run_main("fetch", "tiny-ct")
    assert code == 0 and "already converted" in out
