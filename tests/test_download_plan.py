"""`turbodiffusion download` selects exactly the files a preset needs (checked offline)."""

from pathlib import Path

from turbodiffusion.cli import main
from turbodiffusion_core import spec
from turbodiffusion_core.download import download_plan


def _names(items):
    return sorted((i.repo, i.repo_path) for i in items)


def test_turbo_1_3b_plan_bf16_and_quant(tmp_path):
    preset = spec.get_preset("turbowan2.1-t2v-1.3b-480p")
    bf16 = download_plan(preset, tmp_path)
    assert _names(bf16) == sorted([
        ("TurboDiffusion/TurboWan2.1-T2V-1.3B-480P", "TurboWan2.1-T2V-1.3B-480P.pth"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "models_t5_umt5-xxl-enc-bf16.pth"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl"),
    ])
    quant_only = download_plan(preset, tmp_path, quant=True, bf16=False)
    assert ("TurboDiffusion/TurboWan2.1-T2V-1.3B-480P", "TurboWan2.1-T2V-1.3B-480P-quant.pth") in _names(quant_only)
    assert ("TurboDiffusion/TurboWan2.1-T2V-1.3B-480P", "TurboWan2.1-T2V-1.3B-480P.pth") not in _names(quant_only)
    both = download_plan(preset, tmp_path, quant=True)
    assert len(both) == len(bf16) + 1


def test_shared_files_are_stored_once_for_all_presets(tmp_path):
    a = download_plan(spec.get_preset("turbowan2.1-t2v-1.3b-480p"), tmp_path)
    b = download_plan(spec.get_preset("turbowan2.1-t2v-14b-720p"), tmp_path)
    vae_a = [i.local_path for i in a if i.repo_path == "Wan2.1_VAE.pth"]
    vae_b = [i.local_path for i in b if i.repo_path == "Wan2.1_VAE.pth"]
    assert vae_a == vae_b == [tmp_path / "wan2.1-common" / "Wan2.1_VAE.pth"]
    for item in a:
        assert item.local_path == item.root / item.repo_path


def test_i2v_plan_has_both_experts_and_original_wan_has_its_config(tmp_path):
    i2v = _names(download_plan(spec.get_preset("turbowan2.2-i2v-a14b-720p"), tmp_path, quant=True, bf16=False))
    assert [p for _, p in i2v if "A14B" in p] == [
        "TurboWan2.2-I2V-A14B-high-720P-quant.pth", "TurboWan2.2-I2V-A14B-low-720P-quant.pth"]
    wan = _names(download_plan(spec.get_preset("wan2.1-t2v-1.3b"), tmp_path))
    assert ("Wan-AI/Wan2.1-T2V-1.3B", "diffusion_pytorch_model.safetensors") in wan
    assert ("Wan-AI/Wan2.1-T2V-1.3B", "config.json") in wan


def test_tiny_presets_download_nothing(tmp_path):
    assert download_plan(spec.get_preset("tiny-t2v"), tmp_path) == []


def test_cli_dry_run_prints_the_plan(tmp_path, capsys):
    assert main(["download", "turbowan2.1-t2v-14b-480p", "--quant", "--dry-run", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TurboWan2.1-T2V-14B-480P-quant.pth" in out and "models_t5_umt5-xxl-enc-bf16.pth" in out
    assert not any(Path(tmp_path).iterdir())  # a dry run writes nothing
