"""The umT5 encoder with fp8 block weights (placement "gpu-fp8"): which linears change, what it weighs, and
that its prompt embeddings stay close to the float encoder's (weight-only: activations are not quantized)."""

from __future__ import annotations

import torch

from tests.kernel_support import rel_err
from turbodiffusion_core.memory_plan import GIB, plan, text_encoder_bytes
from turbodiffusion_core.models.text_encoder import FP8_LINEARS, TextEncoder, quantize_umt5_fp8
from turbodiffusion_core.pipeline import choose_text_encoder
from turbodiffusion_core.quant.fp8 import Fp8WeightOnlyLinear
from turbodiffusion_core.spec import get_preset, preset_paths
from turbodiffusion_core.tiny import ensure_tiny_files

PROMPTS = ["a red fox runs through fresh snow at dawn", "一只橙色的猫在花园里追逐蝴蝶"]


def tiny_encoder(models_dir, fp8: bool) -> TextEncoder:
    preset = get_preset("tiny-t2v")
    ensure_tiny_files(preset, models_dir)
    paths = preset_paths(preset, models_dir)
    return TextEncoder.from_files(paths["t5"], paths["tokenizer"], config="tiny", dtype=torch.float32, fp8=fp8)


def test_fp8_encoder_is_close_to_the_float_one(tmp_path):
    plain, fp8 = tiny_encoder(tmp_path, False), tiny_encoder(tmp_path, True)
    assert not plain.fp8 and fp8.fp8
    blocks = len(fp8.model.encoder.block)
    quantized = [n for n, m in fp8.model.named_modules() if isinstance(m, Fp8WeightOnlyLinear)]
    assert len(quantized) == blocks * len(FP8_LINEARS)
    assert all(n.rsplit(".", 1)[-1] in FP8_LINEARS for n in quantized)
    assert all(fp8.model.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in quantized)
    assert isinstance(fp8.model.encoder.block[0].layer[1].DenseReluDense.wo, torch.nn.Linear)  # kept in float
    for a, b in zip(plain.encode(PROMPTS), fp8.encode(PROMPTS)):
        assert a.shape == b.shape
        err = rel_err(b, a)
        assert 0 < err < 5e-2, err  # e4m3 weights: a few percent; activations untouched


def test_fp8_placement_sizes_and_choice():
    full, fp8 = text_encoder_bytes("umt5-xxl"), text_encoder_bytes("umt5-xxl", fp8=True)
    assert 10 * GIB < full < 11 * GIB and 7 * GIB < fp8 < 7.5 * GIB  # 5.7B parameters; 3.6B of them to 1 byte
    cuda = torch.device("cuda")
    assert choose_text_encoder("gpu-fp8", cuda, encoder_bytes=full, free_bytes=0, reserve_bytes=0) == \
        ("gpu-fp8", "configured")
    assert choose_text_encoder("gpu-fp8", torch.device("cpu"), encoder_bytes=full, free_bytes=None,
                               reserve_bytes=0)[0] == "cpu"
    bf16 = plan("turbowan2.1-t2v-1.3b-480p", 24, text_encoder="gpu")
    small = plan("turbowan2.1-t2v-1.3b-480p", 24, text_encoder="gpu-fp8")
    assert small.text_encoder == "gpu-fp8"
    assert abs((bf16.weights_gb - small.weights_gb) - (full - fp8) / GIB) < 0.02


def test_quantize_on_meta_builds_empty_fp8_modules():
    from turbodiffusion_core.models.text_encoder import build_umt5_on_meta

    model = build_umt5_on_meta("tiny")
    assert quantize_umt5_fp8(model) == len(model.encoder.block) * len(FP8_LINEARS)
    assert all(t.is_meta for t in model.buffers())
