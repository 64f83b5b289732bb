"""The VAE's fused channels-last path: the norm/SiLU kernel that writes straight into the stacked-taps
layout, and the causal convs run as one 2D conv over stacked taps (`CausalConv3d.tap_mode = "stacked"`).

References: F.conv3d over the explicitly time-padded, normalised stream, and the VAE's plain (contiguous,
unfused) path, which tests/test_vae_conformance.py checks against diffusers.

CPU: `test_cpu_kernels_in_interpreter` reruns this file's CPU tests in the shared Triton-interpreter process
(fp32 there). GPU (`on_gpu`): fp32 and bf16 at the decoder's real 96-channel width on fresh inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from bench.random_models import random_vae  # noqa: E402
from tests.kernel_support import check_interpreter_run, on_cpu, on_gpu, rel_err  # noqa: E402
from turbodiffusion_core.models.vae import (  # noqa: E402
    TAP_MODES,
    CausalCache,
    CausalConv3d,
    RMSNorm,
    VAEConfig,
)


def test_cpu_kernels_in_interpreter():
    """This file's CPU tests, run in the shared Triton-interpreter process (see tests/kernel_support.py)."""
    check_interpreter_run(__file__)


def normed_stream(norm: RMSNorm, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(norm(x + bias)) with plain PyTorch ops, in fp32."""
    return F.silu(norm(x.float() + bias.float().view(-1, 1, 1, 1)))


def chunked_stacked_conv(conv: CausalConv3d, norm: RMSNorm, x: torch.Tensor, bias: torch.Tensor,
                         sizes: list[int]) -> tuple[torch.Tensor, CausalCache]:
    """conv.forward_normed over x split into chunks of `sizes` frames (channels-last), one cache across them."""
    cache = CausalCache()
    outs, start = [], 0
    for n in sizes:
        chunk = x[:, :, start:start + n].contiguous(memory_format=torch.channels_last_3d)
        outs.append(conv.forward_normed(norm, chunk, cache, bias))
        start += n
    return torch.cat(outs, dim=2), cache


def reference_conv(conv: CausalConv3d, norm: RMSNorm, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The causal conv over [2 zero frames, silu(norm(x + bias))] as one fp32 Conv3d."""
    s = normed_stream(norm, x, bias)
    padded = torch.cat([torch.zeros_like(s[:, :, :2]), s], dim=2)
    return F.conv3d(padded, conv.weight.float(), conv.bias.float(), padding=(0, 1, 1))


def make_conv(c_in: int, c_out: int, device: str, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    conv = CausalConv3d(c_in, c_out, 3, padding=1)
    norm = RMSNorm(c_in)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    bias = torch.randn(c_in) * 0.3
    return conv.to(device, dtype), norm.to(device, dtype), bias.to(device, dtype)


@on_cpu
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("sizes", [[1, 4, 4], [1, 1, 1, 2], [3], [1, 2, 1, 4]])
def test_normed_conv_equals_conv3d_over_the_stream(sizes, split):
    """Chunk after chunk, the history (zeros first, then the previous chunk's last frames) and the kernel's
    writes make the same output as one Conv3d over the whole padded stream: with the taps stacked on the
    channels (split), and as one Conv3d over the buffer the kernel writes behind the history."""
    conv, norm, bias = make_conv(6, 5, "cpu", torch.float32, seed=len(sizes))
    conv.tap_split_max_channels = 96 if split else 0
    x = torch.randn(1, 6, sum(sizes), 5, 7) * 2
    with torch.no_grad():
        got, cache = chunked_stacked_conv(conv, norm, x, bias, sizes)
        expected = reference_conv(conv, norm, x, bias)
    if split:
        assert (conv, "stacked") in cache.tails and conv not in cache.tails  # the stacked path ran
        assert cache.tails[(conv, "stacked")].shape == (5, 7, 2 * 6)  # the last two frames of the stream
    else:
        assert conv in cache.tails and (conv, "stacked") not in cache.tails
        assert cache.tails[conv].shape == (1, 6, 2, 5, 7)
    assert got.shape == expected.shape == (1, 5, sum(sizes), 5, 7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@on_cpu
def test_stacked_weight_follows_weight_changes():
    conv, norm, bias = make_conv(4, 3, "cpu", torch.float32, seed=3)
    x = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        first, _ = chunked_stacked_conv(conv, norm, x, bias, [3])
        conv.weight.mul_(2)
        doubled, _ = chunked_stacked_conv(conv, norm, x, bias, [3])
    b = conv.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(doubled - b, 2 * (first - b), rtol=1e-5, atol=1e-5)


@on_cpu
def test_switching_paths_within_a_clip_is_an_error():
    conv, norm, bias = make_conv(4, 3, "cpu", torch.float32, seed=4)
    cache = CausalCache()
    x = torch.randn(1, 4, 2, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        conv(x, cache)  # the per-tap path leaves its own tail
        with pytest.raises(RuntimeError, match="switched"):
            conv.forward_normed(norm, x, cache, bias)


@on_cpu
@pytest.mark.parametrize("mode, max_channels", [("stacked", 96), ("stacked", 8), ("in_place", 96), ("concat", 96)])
def test_fused_decode_and_encode_equal_the_plain_path(mode, max_channels):
    """A small VAE (channels 8-32) on the fused path in every tap mode, all or some convs tap-split, decodes
    and encodes what the plain path does."""
    plain = random_vae(VAEConfig(dim=8), seed=7)
    fused = random_vae(VAEConfig(dim=8), seed=7).use_channels_last()
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    before = CausalConv3d.tap_mode, CausalConv3d.tap_split_max_channels
    CausalConv3d.tap_mode, CausalConv3d.tap_split_max_channels = mode, max_channels
    try:
        fused.decode_chunk_frames = 2
        out, lat = fused.decode(latent), fused.encode(video)
    finally:
        CausalConv3d.tap_mode, CausalConv3d.tap_split_max_channels = before
    assert rel_err(out, plain.decode(latent)) < 1e-5
    assert rel_err(lat, plain.encode(video)) < 1e-5


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_conv_on_gpu_at_the_decoder_width(dtype):
    """96 channels (the full-resolution decoder stage), chunks of 1 and 4 frames; fp32 reference."""
    torch.backends.cudnn.allow_tf32 = False
    conv, norm, bias = make_conv(96, 96, "cuda", dtype, seed=11)
    x = torch.randn(1, 96, 9, 48, 80, device="cuda", dtype=dtype)
    assert CausalConv3d.tap_mode in TAP_MODES
    with torch.no_grad():
        got, cache = chunked_stacked_conv(conv, norm, x, bias, [1, 4, 4])
        expected = reference_conv(conv.float(), norm.float(), x.float(), bias.float())
    assert (conv, "stacked") in cache.tails
    err = rel_err(got, expected)
    print(f"stacked conv {dtype}: rel err {err:.2e}")
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)
