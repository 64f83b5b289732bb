"""Our Wan2.1 VAE against diffusers' AutoencoderKLWan (an independent implementation of the same
reference) with identical random weights, and our module names against the official key list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.random_models import random_vae
from turbodiffusion_core.errors import CheckpointMismatch
from turbodiffusion_core.models.vae import VAE_CONFIGS, VAEConfig, WanVAE, load_vae

KEYS = Path(__file__).parent / "data" / "keys"
OFFICIAL = json.loads((KEYS / "wan2.1-vae.json").read_text())["tensors"]
_MAP = json.loads((KEYS / "wan-to-diffusers-vae-map.json").read_text())["tensors"]
TO_DIFFUSERS = {official: entry["to"] for official, entry in _MAP.items()}

# Real structure, channels / 6: every layer type, every cache path, but fast on a CPU.
SMALL = VAEConfig(dim=16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[WanVAE, torch.nn.Module]:
    from diffusers import AutoencoderKLWan

    ours = random_vae(SMALL)
    theirs = AutoencoderKLWan(base_dim=SMALL.dim, z_dim=SMALL.z_dim).eval()
    theirs.load_state_dict({TO_DIFFUSERS[k]: v for k, v in ours.state_dict().items()}, strict=True)
    return ours, theirs


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, 9).view(1, 1, 9, 1, 1)
    y = torch.linspace(-1, 1, 32).view(1, 1, 1, 32, 1)
    x = torch.linspace(-1, 1, 48).view(1, 1, 1, 1, 48)
    moving = torch.sin(3 * (x + y) + 4 * t) * torch.tensor([1.0, 0.5, -0.7]).view(1, 3, 1, 1, 1)
    return (moving + 0.2 * torch.randn(1, 3, 9, 32, 48, generator=g)).clamp(-1, 1)


def test_encode_matches_diffusers(pair, video):
    ours, theirs = pair
    mean = torch.tensor(SMALL.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(SMALL.latent_std).view(1, -1, 1, 1, 1)
    latent = ours.encode(video)
    with torch.no_grad():
        expected = (theirs.encode(video).latent_dist.mode() - mean) / std
    assert latent.shape == (1, 16, 3, 4, 6)
    assert latent.dtype == torch.float32
    assert rel_err(latent, expected) < 1e-4


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_decode_matches_diffusers(pair, frames):
    ours, theirs = pair
    latent = torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(frames))
    mean = torch.tensor(SMALL.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(SMALL.latent_std).view(1, -1, 1, 1, 1)
    done: list[tuple[int, int]] = []
    video = ours.decode(latent, on_frame=lambda i, n: done.append((i, n)))
    with torch.no_grad():
        expected = theirs.decode(latent * std + mean).sample
    assert video.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48)
    assert float((expected.abs() < 0.999).float().mean()) > 0.5, "test weights saturate the output"
    assert rel_err(video, expected) < 1e-4
    assert video.abs().max() <= 1.0
    assert done == [(i + 1, frames) for i in range(frames)]


def test_decode_iter_chunks_equal_decode(pair):
    ours, _ = pair
    latent = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(7))
    chunks = list(ours.decode_iter(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert all(c.shape[:2] == (2, 3) and c.shape[3:] == (32, 48) for c in chunks)
    torch.testing.assert_close(torch.cat(chunks, dim=2), ours.decode(latent), rtol=0, atol=0)


@pytest.mark.parametrize("per_chunk", [2, 3, 5])
def test_larger_decode_chunks_give_the_same_video(pair, per_chunk):
    """Several latent frames per decoder pass (the GPU's faster setting) decode to the video one frame per
    pass gives, and to diffusers' decode; progress still counts latent frames."""
    ours, theirs = pair
    latent = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(per_chunk))
    one = torch.cat(list(ours.decode_iter(latent, frames_per_chunk=1)), dim=2)
    chunks = list(ours.decode_iter(latent, frames_per_chunk=per_chunk))
    expected_sizes = {2: [1, 8, 8, 4], 3: [1, 12, 4, 4], 5: [1, 16, 4]}[per_chunk]  # last latent frame alone
    assert [c.shape[2] for c in chunks] == expected_sizes
    torch.testing.assert_close(torch.cat(chunks, dim=2), one, rtol=1e-5, atol=1e-5)
    mean = torch.tensor(SMALL.latent_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(SMALL.latent_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = theirs.decode(latent * std + mean).sample
    done: list[int] = []
    previous = ours.decode_chunk_frames
    ours.decode_chunk_frames = per_chunk
    try:
        video = ours.decode(latent, on_frame=lambda i, n: done.append(i))
    finally:
        ours.decode_chunk_frames = previous
    assert rel_err(video, expected) < 1e-4
    assert done == {2: [1, 3, 5, 6], 3: [1, 4, 5, 6], 5: [1, 5, 6]}[per_chunk]
    with pytest.raises(ValueError, match="at least 1"):
        next(ours.decode_iter(latent, frames_per_chunk=0))


@pytest.mark.parametrize("frames", [1, 3, 6])
def test_tap_split_conv_equals_the_conv3d(frames):
    """The GPU path's causal conv as a sum of 2D convs over its temporal taps (on a channels-last batch of
    frames) equals the Conv3d over the same time-padded input; checked here on CPU tensors."""
    from turbodiffusion_core.models.vae import CausalConv3d

    torch.manual_seed(frames)
    conv = CausalConv3d(6, 5, 3, padding=1)
    padded = torch.randn(1, 6, frames + 2, 7, 9).contiguous(memory_format=torch.channels_last_3d)
    expected = F.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    with torch.no_grad():
        got = conv._conv_by_taps(padded, conv.bias)
    assert got.shape == expected.shape == (1, 5, frames, 7, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames, history_frames", [(4, None), (4, 2), (1, 1), (1, 2), (3, 1), (1, None), (2, 2)])
def test_tap_split_conv_reads_history_and_chunk_in_place(frames, history_frames):
    """The GPU path's in-place version (history and chunk kept apart, no concatenation) equals the Conv3d
    over [zeros, history, chunk] concatenated, whatever part of the history a chunk has; checked on CPU."""
    from turbodiffusion_core.models.vae import CausalConv3d

    torch.manual_seed(frames * 10 + (history_frames or 0))
    conv = CausalConv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, frames, 7, 9).contiguous(memory_format=torch.channels_last_3d)
    history = None if history_frames is None else torch.randn(1, 6, history_frames, 7, 9)
    missing = 2 - (history_frames or 0)
    padded = torch.cat([torch.zeros(1, 6, missing, 7, 9)] + ([history] if history is not None else []) + [x], dim=2)
    expected = F.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    hist_cl = None if history is None else history.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        got = conv._conv_by_taps_in_place(x, hist_cl, missing, conv.bias)
        again = conv._conv_by_taps_in_place(x, hist_cl, missing, conv.bias)  # the cached tap weights
        conv.weight.mul_(2)  # a changed weight must not reuse the cached taps
        doubled = conv._conv_by_taps_in_place(x, hist_cl, missing, None)
    assert got.shape == expected.shape == (1, 5, frames, 7, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, again)
    bias = conv.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(doubled, 2 * (expected - bias), rtol=1e-5, atol=1e-5)


def test_decode_chunks_cover_the_latent_once():
    from turbodiffusion_core.models.vae import decode_chunks

    assert decode_chunks(21, 1) == [(i, i + 1) for i in range(21)]
    assert decode_chunks(21, 5) == [(0, 1), (1, 6), (6, 11), (11, 16), (16, 20), (20, 21)]
    assert decode_chunks(2, 4) == [(0, 1), (1, 2)] and decode_chunks(1, 3) == [(0, 1)]
    for frames in range(1, 12):
        for n in range(1, 6):
            chunks = decode_chunks(frames, n)
            assert [s for s, _ in chunks] == [0] + [e for _, e in chunks[:-1]] and chunks[-1][1] == frames
            assert all(1 <= e - s <= n for s, e in chunks) and chunks[0] == (0, 1)


def test_decode_is_causal(pair):
    """A prefix of the latent decodes to the same prefix of the video (what the cache guarantees)."""
    ours, _ = pair
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    full = ours.decode(latent)
    prefix = ours.decode(latent[:, :, :2])
    torch.testing.assert_close(prefix, full[:, :, :5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:, :, 5:], full[:, :, 1:5])


def test_tiny_roundtrip_shapes_and_bf16():
    vae = random_vae(VAE_CONFIGS["tiny"], seed=5)
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (1, 16, 2, 2, 3)
    out32 = vae.decode(latent)
    assert out32.shape == (1, 3, 5, 16, 24)
    out16 = vae.to(torch.bfloat16).decode(latent)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16.float(), out32) < 0.05


def test_bad_input_shapes_are_rejected():
    vae = random_vae(VAE_CONFIGS["tiny"])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_module_names_are_the_official_keys():
    with torch.device("meta"):
        vae = WanVAE(VAE_CONFIGS["wan2.1"])
    state = vae.state_dict()
    assert len(OFFICIAL) == 194
    assert set(state) == set(OFFICIAL)
    for key, tensor in state.items():
        assert list(tensor.shape) == OFFICIAL[key]["shape"], key
    assert sum(t.numel() for t in state.values()) == 126_892_531


def _write_official_layout(path: Path, drop: str = "", extra: str = "") -> Path:
    """The official key list as a checkpoint of meta tensors (names and shapes, no data)."""
    state = {k: torch.empty(v["shape"], device="meta") for k, v in OFFICIAL.items() if k != drop}
    if extra:
        state[extra] = torch.empty(1, device="meta")
    torch.save(state, path)
    return path


def test_official_layout_loads_strictly(tmp_path):
    vae = load_vae(_write_official_layout(tmp_path / "Wan2.1_VAE.pth"), "wan2.1", device="meta")
    assert isinstance(vae, WanVAE) and not vae.training
    assert vae.decoder.upsamples[3].time_conv.weight.shape == (768, 384, 3, 1, 1)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = _write_official_layout(tmp_path / "a.pth", drop="decoder.middle.1.to_qkv.bias", extra="encoder.extra")
    with pytest.raises(CheckpointMismatch) as err:
        load_vae(path, "wan2.1", device="meta")
    assert "missing: decoder.middle.1.to_qkv.bias" in str(err.value)
    assert "unexpected: encoder.extra" in str(err.value)


def test_wrong_config_reports_shapes(tmp_path):
    path = _write_official_layout(tmp_path / "b.pth")
    with pytest.raises(CheckpointMismatch, match=r"shape of encoder\.conv1\.weight: file \[96, 3, 3, 3, 3\]"):
        load_vae(path, "tiny", device="meta")


def test_tiny_file_loads_with_real_values(tmp_path):
    vae = random_vae(VAE_CONFIGS["tiny"], seed=2)
    path = tmp_path / "tiny_vae.pth"
    torch.save(vae.state_dict(), path)
    loaded = load_vae(path, "tiny", dtype=torch.float32)
    assert loaded.memory_format == torch.contiguous_format  # channels-last is the CUDA default only
    latent = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.decode(latent), vae.decode(latent), rtol=0, atol=0)
    # the channels-last layout (the GPU path's) computes the same function
    channels_last = load_vae(path, "tiny", channels_last=True)
    assert channels_last.decoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(channels_last.decode(latent), vae.decode(latent)) < 1e-5
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert rel_err(channels_last.encode(video), vae.encode(video)) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channels_last_fused_path_matches_reference(dtype):
    """The GPU fast path (channels-last, fused norm/SiLU/bias/residual kernels, tap-split convs) computes
    the same function as the plain path; real channel widths so every kernel variant runs."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref_vae = random_vae(VAE_CONFIGS["wan2.1"], seed=11).cuda()
    fast = random_vae(VAE_CONFIGS["wan2.1"], seed=11).cuda().to(dtype).use_channels_last()
    latent = torch.randn(1, 16, 3, 8, 12, device="cuda")
    video = torch.rand(1, 3, 5, 64, 96, device="cuda") * 2 - 1
    ref_out, ref_lat = ref_vae.decode(latent), ref_vae.encode(video)
    out, lat = fast.decode(latent), fast.encode(video)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and out.is_contiguous()
    assert rel_err(out.float(), ref_out) < tol
    assert rel_err(lat, ref_lat) < tol
    fast.decode_chunk_frames = 2  # two latent frames per pass: the same video on the fused path too
    assert rel_err(fast.decode(latent).float(), ref_out) < tol
    from turbodiffusion_core.models.vae import CausalConv3d

    fast.decode_chunk_frames = 1
    for mode in ("in_place", "concat"):  # the per-tap versions give the same video
        CausalConv3d.tap_mode = mode
        try:
            other = fast.decode(latent)
        finally:
            CausalConv3d.tap_mode = "stacked"
        # bf16: they sum the taps in another order, each partial sum rounded to bf16 (1.1e-2 apart at 480p 81f)
        assert rel_err(other.float(), out.float()) < (1e-5 if dtype == torch.float32 else tol), mode
