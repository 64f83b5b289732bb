"""Memory profiles: exact weight sizes from meta builds, the quant=auto rule, what each preset becomes on a
16 / 24 / 48 / 80 / 141 GB card, `turbodiffusion plan`, and --quant auto through the real loader on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from turbodiffusion.cli import main
from turbodiffusion_core.memory_plan import GIB, choose_quant, dit_bytes, plan
from turbodiffusion_core.pipeline import LoadPlan, load_pipeline


def test_weight_bytes_are_those_of_the_built_model():
    from turbodiffusion_core.models.dit import WanModel

    torch.manual_seed(0)
    for quant in (None, "fp8", "int8"):
        model = WanModel("tiny-t2v", with_sla_proj=True, quant=quant).set_dtype(torch.bfloat16)
        real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert dit_bytes("tiny-t2v", quant) == real, quant
    bf16, fp8, int8 = (dit_bytes("wan2.1-t2v-1.3b", q) for q in (None, "fp8", "int8"))
    assert 2.5 * GIB < bf16 < 3.2 * GIB  # 1.4B parameters, bf16 (a few float32 tables)
    assert 0.5 < fp8 / bf16 < 0.6 and 0.5 < int8 / bf16 < 0.6  # block linears at one byte, the rest bf16


def test_quant_auto_rule():
    gb = GIB
    common = dict(expert_bf16=28 * gb, expert_quantized=14 * gb, text_encoder=11 * gb, reserve_bytes=16 * gb)
    assert choose_quant("auto", free_bytes=80 * gb, fp8_ok=True, **common)[0] is None  # 55 GB fit in bf16
    quant, why = choose_quant("auto", free_bytes=40 * gb, fp8_ok=True, **common)
    assert quant == "fp8" and "28.0 -> 14.0 GiB" in why
    assert choose_quant("auto", free_bytes=40 * gb, fp8_ok=False, **common)[0] == "int8"  # no fp8 before Ada
    assert choose_quant("auto", free_bytes=80 * gb, fp8_ok=True, experts=2, **common)[0] == "fp8"  # 83 > 80
    assert choose_quant("auto", free_bytes=None, fp8_ok=True, **common) == (None, "not a GPU")
    assert choose_quant("int8", free_bytes=None, fp8_ok=True, **common) == ("int8", "configured")
    assert choose_quant("none", free_bytes=1, fp8_ok=True, **common)[0] is None
    with pytest.raises(ValueError, match="auto, none, int8, fp8"):
        choose_quant("int4", free_bytes=None, fp8_ok=True, **common)


@pytest.mark.parametrize("model, gpu_gb, quant, text_encoder, experts, fits", [
    ("turbowan2.1-t2v-1.3b-480p", 16, "fp8", "cpu", "resident", True),
    ("turbowan2.1-t2v-1.3b-480p", 24, None, "gpu", "resident", True),
    ("turbowan2.2-i2v-a14b-720p", 24, "fp8", "cpu", "swap", False),
    ("turbowan2.2-i2v-a14b-720p", 48, "fp8", "gpu", "swap", True),
    ("turbowan2.2-i2v-a14b-720p", 80, "fp8", "gpu", "resident", True),
    ("turbowan2.2-i2v-a14b-720p", 141, None, "gpu", "resident", True),
])
def test_profiles(model, gpu_gb, quant, text_encoder, experts, fits):
    p = plan(model, gpu_gb)
    assert (p.quant, p.text_encoder, p.expert_residency, p.fits) == (quant, text_encoder, experts, fits), p
    assert p.peak_gb == pytest.approx(p.weights_gb + p.reserve_gb, abs=0.02)
    assert (p.peak_gb <= gpu_gb) == p.fits
    forced = plan(model, gpu_gb, quant="none", text_encoder="cpu")
    assert forced.quant is None and forced.text_encoder == "cpu" and "configured" in forced.notes


def test_plan_command_prints_json_and_a_table(capsys):
    assert main(["plan", "--gpu-gb", "16,80", "--model", "turbowan2.1-t2v-1.3b-480p", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["gpu_gb"], r["quant"], r["text_encoder"]) for r in rows] == [(16.0, "fp8", "cpu"), (80.0, None, "gpu")]
    assert main(["plan", "--gpu-gb", "24", "--model", "turbowan2.1-t2v-1.3b-480p", "--no-fp8"]) == 0
    out = capsys.readouterr().out
    assert "peak GB (est.)" in out and "turbowan2.1-t2v-1.3b-480p" in out
    assert main(["plan", "--gpu-gb", "16", "--model", "turbowan2.1-t2v-1.3b-480p", "--text-encoder", "gpu-fp8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["text_encoder"] == "gpu-fp8"
    assert main(["plan", "--gpu-gb", "lots"]) == 2


def test_quant_auto_through_the_loader_on_cpu(tmp_path):
    plan_ = LoadPlan.prepare("tiny-t2v", tmp_path, torch.device("cpu"), quant="auto")
    assert (plan_.quant, plan_.quant_reason) == (None, "not a GPU")
    pipe = load_pipeline("tiny-t2v", models_dir=tmp_path, device="cpu", quant="auto")
    info = pipe.info()
    assert (info["quant"], info["quant_reason"]) == ("none", "not a GPU")
    assert load_pipeline("tiny-t2v", models_dir=tmp_path, device="cpu", quant="fp8").info()["quant_reason"] == \
        "configured"


def test_quant_auto_is_refused_for_several_gpus(tmp_path):
    from turbodiffusion_core.parallel.runtime import load_experts

    with pytest.raises(ValueError, match="quant=auto is not available with several GPUs"):
        load_experts("tiny-t2v", models_dir=tmp_path, device=torch.device("cpu"), quant="auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_quantizes_to_the_faster_format_of_the_device():
    """Where the Gluon int8 GEMM runs (Hopper), "auto" quantizes to int8 (faster and closer to bf16 there);
    on other GPUs fp8 from Ada on, int8 before."""
    from turbodiffusion_core.pipeline import quantized_format_for
    from turbodiffusion_core.quant import wgmma_int8

    device = torch.device("cuda")
    chosen = quantized_format_for(device)
    if wgmma_int8.available(device):
        assert torch.cuda.get_device_capability(device)[0] == 9 and chosen == "int8"
    else:
        assert chosen == ("fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "int8")
