"""Which files a preset needs from the Hugging Face Hub, and fetching them (with resume).

The plan is pure data (tested offline); `download` performs it with huggingface_hub, which resumes
interrupted transfers and verifies sizes. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import spec


@dataclass(frozen=True)
class DownloadItem:
    repo: str
    repo_path: str  # a file, or a folder prefix when `folder`
    local_path: Path
    root: Path  # the preset folder; local_path == root / repo_path
    folder: bool = False


def download_plan(preset: spec.Preset, models_dir: Path, *, quant: bool = False, bf16: bool = True) -> list[DownloadItem]:
    """The exact files to fetch for a preset.

    bf16: the full-precision DiT checkpoint(s) (the default: H100-class GPUs run them fastest with load-time
    fp8); quant: the released `-quant` int8 checkpoint(s) (for 24-32 GB GPUs). At least one is needed.
    Tiny presets have nothing to download (they write their own weights)."""
    if preset.tiny:
        return []
    if not (quant or bf16):
        raise ValueError("choose at least one of the bf16 and quant checkpoints")
    items = []
    for f in preset.files:
        is_dit = f.role.startswith("dit") and f.role != "dit_config"
        is_quant = f.role.endswith("_quant")
        if is_dit and is_quant and not quant:
            continue
        if is_dit and not is_quant and f.role != "dit_config" and not bf16:
            continue
        local = preset.local_path(models_dir, f)
        items.append(DownloadItem(f.repo, f.repo_path, local, Path(models_dir) / (f.shared or preset.local_folder), f.folder))
    return items


def download(
    preset: spec.Preset,
    models_dir: Path,
    *,
    quant: bool = False,
    bf16: bool = True,
    token: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Fetch every planned file into models_dir/<preset>/ (skipping files already complete)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    done = []
    for item in download_plan(preset, models_dir, quant=quant, bf16=bf16):
        # Local names equal the repo paths, so the Hub client writes straight into the preset folder and
        # resumes partial files it finds there.
        root = item.root
        root.mkdir(parents=True, exist_ok=True)
        log(f"fetching {item.repo}:{item.repo_path}{'/' if item.folder else ''} -> {item.local_path}")
        if item.folder:
            snapshot_download(item.repo, allow_patterns=[f"{item.repo_path}/*"], token=token, local_dir=root)
        else:
            hf_hub_download(item.repo, item.repo_path, token=token, local_dir=root)
        done.append(item.local_path)
    return done
