"""Seeded random-weight modules at the real shapes, for the GPU benchmarks (no weights can be downloaded).

The DiT is built directly in the run dtype (a 14B expert never exists in float32, 57 GB); modulation tables and
SLA projections get small random values so every path carries signal; the VAE gets gains around one and small
biases so its activations stay in a realistic range.
"""

from __future__ import annotations

import torch


def random_dit(arch: str, device: str, dtype: torch.dtype, seed: int):
    from turbodiffusion_core.models.dit import WanModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run dtype: a 14B expert never exists in float32 (57 GB)
    try:
        with torch.device(device):
            model = WanModel(arch, with_sla_proj=True)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0.0, 0.05)
            elif "proj_l" in name:
                p.normal_(0.0, 0.02)
    return model.set_dtype(dtype).eval().requires_grad_(False)


def random_vae(config, device: str = "cpu", seed: int = 0):
    """Our WanVAE in float32 with lively random weights: RMS gains away from 1 (so a mis-mapped gamma
    shows), small biases, and an output head scaled so that decoded pixels mostly stay inside [-1, 1]
    (so the clamp does not hide differences). `config`: a VAE_CONFIGS name or a VAEConfig."""
    from turbodiffusion_core.models.vae import VAE_CONFIGS, WanVAE

    torch.manual_seed(seed)
    with torch.device(device):
        vae = WanVAE(VAE_CONFIGS[config] if isinstance(config, str) else config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
        vae.decoder.head[2].weight.mul_(0.3)
    return vae.requires_grad_(False)
