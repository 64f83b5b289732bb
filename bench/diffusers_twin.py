"""diffusers' WanTransformer3DModel holding the same weights as one of our WanModels.

diffusers is an independent port of the official Wan model, so it is both our conformance reference
(tests/test_dit_conformance.py) and the speed baseline (bench/bench_dit.py). Keys are renamed through the
verified official -> diffusers map in tests/data/keys/. diffusers is imported only when called.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KEY_MAP = Path(__file__).resolve().parent.parent / "tests" / "data" / "keys" / "wan-to-diffusers-transformer-map.json"


def diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    """Our model's weights under diffusers' key names (proj_l, which diffusers lacks, is left out)."""
    cfg = model.cfg
    rules = json.loads(KEY_MAP.read_text())["rename_rules_in_order"]
    renamed = {}
    for key, tensor in model.state_dict().items():
        if "proj_l" in key:
            continue
        if key == "patch_embedding.weight":  # ours is the Linear layout; diffusers keeps the Conv3d
            tensor = tensor.reshape(cfg.dim, cfg.in_dim, *cfg.patch_size)
        for old, new in rules.items():
            key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


def diffusers_twin(model, device="cpu", dtype=torch.float32):
    """A WanTransformer3DModel with `model`'s config and weights (strict load), built on `device` in `dtype`."""
    from diffusers import WanTransformer3DModel

    cfg = model.cfg
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            twin = WanTransformer3DModel(
                patch_size=cfg.patch_size,
                num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim,
                out_channels=cfg.out_dim,
                text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim,
                num_layers=cfg.num_layers,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                eps=cfg.eps,
            )
    finally:
        torch.set_default_dtype(previous)
    twin.load_state_dict(diffusers_state_dict(model), strict=True)
    return twin.eval()
