"""Tiny random-weight models written in the official file formats and key names.

No weights can be downloaded where tests and the no-GPU demo run, so the `tiny-*` presets write their own
files the first time they are used: a TurboDiffusion-style `.pth` DiT (and its `-quant` twin), a
`Wan2.1_VAE.pth`, a `models_t5_umt5-xxl-enc-bf16.pth` under Wan's T5 key names, and a small multilingual
tokenizer. The pipeline then loads them through exactly the same loaders as the real checkpoints.
Weights are seeded, so every machine writes the same files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import spec

log = logging.getLogger("turbodiffusion.tiny")

TINY_SEED = 20251216


def _write_dit(arch: str, path: Path, seed: int, quant_path: Path | None = None) -> None:
    from .checkpoints import dit_state_dict_for_file
    from .models.configs import DIT_CONFIGS
    from .models.dit import WanModel

    torch.manual_seed(seed)
    model = WanModel(DIT_CONFIGS[arch], with_sla_proj=True)
    _liven_dit(model)
    torch.save(dit_state_dict_for_file(model, fmt="turbo"), path)
    if quant_path is not None:
        torch.save(dit_state_dict_for_file(model, fmt="turbo", quant="int8"), quant_path)


def _liven_dit(model: torch.nn.Module) -> None:
    """Default init leaves the modulation tables at zero-ish scale; give them and the SLA projection
    small random values so every code path (gates, proj_l) carries signal in tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation") or "proj_l" in name:
                p.normal_(0.0, 0.1)


def _write_vae(path: Path, seed: int) -> None:
    from .models.vae import VAE_CONFIGS, WanVAE

    torch.manual_seed(seed)
    vae = WanVAE(VAE_CONFIGS["tiny"])
    with torch.no_grad():  # RMS-norm gains start at one; keep them, but make the convs a little livelier
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    torch.save({k: v.float() for k, v in vae.state_dict().items()}, path)


def _write_text_encoder(t5_path: Path, tokenizer_dir: Path, seed: int) -> None:
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from .models.text_encoder import T5_CONFIGS, hf_t5_to_wan
    from .models.tokenizer_builder import build_tiny_tokenizer

    build_tiny_tokenizer(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = dict(T5_CONFIGS["tiny"])
    cfg["vocab_size"] = len(tok)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**cfg))
    sd = hf_t5_to_wan(model.state_dict())
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, t5_path)


def tiny_files_present(preset: spec.Preset, models_dir: Path) -> bool:
    return all(preset.local_path(models_dir, f).exists() for f in preset.files)


def ensure_tiny_files(preset: spec.Preset, models_dir: Path) -> Path:
    """Write the preset's tiny checkpoints under models_dir/<preset> unless they are already there.

    Safe against several processes starting at once: one writes into a temporary folder under a file
    lock and renames it into place; the others wait on the lock and find the files."""
    if not preset.tiny:
        raise ValueError(f"{preset.id} is not a tiny preset")
    models_dir = Path(models_dir)
    root = models_dir / preset.local_folder
    if tiny_files_present(preset, models_dir):
        return root
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{preset.local_folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tiny_files_present(preset, models_dir):
            return root
        log.info("writing tiny random-weight checkpoints for %s to %s", preset.id, root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{preset.local_folder}-", dir=models_dir))
        try:
            with torch.random.fork_rng(devices=[]):
                files = {f.role: tmp / f.path for f in preset.files}
                if preset.task == "i2v":
                    _write_dit(preset.arch, files["dit_high"], TINY_SEED + 1)
                    _write_dit(preset.arch, files["dit_low"], TINY_SEED + 2)
                else:
                    _write_dit(preset.arch, files["dit"], TINY_SEED, quant_path=files.get("dit_quant"))
                _write_vae(files["vae"], TINY_SEED + 3)
                _write_text_encoder(files["t5"], files["tokenizer"], TINY_SEED + 4)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root
