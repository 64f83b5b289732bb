"""Reading and writing DiT checkpoints in the official file formats, with mismatch errors that say why.

Formats accepted unchanged (reference/wan.md §1.6-1.7, turbodiffusion.md §2):
- official Wan: `diffusion_pytorch_model.safetensors`, or shards + `*.safetensors.index.json`; float32;
  Conv3d patch embedding [dim, in_dim, 1, 2, 2];
- TurboDiffusion `.pth` (torch.save of a flat state dict): bf16 with float32 norm weights, Linear patch
  embedding [dim, in_dim*4], SLA `proj_l` per block; its `-quant` variant replaces the block linears'
  `weight` by `int8_weight` + `scale` (tile int8, see quant/tile_int8.py);
- either with a `_checkpoint_wrapped_module.` segment anywhere in the keys or a leading
  `model.diffusion_model.` (ComfyUI repackagings); both are stripped.

Loading never holds a second full copy of the weights: files are memory-mapped (`.pth` via
torch.load(mmap=True), safetensors tensor by tensor), the module is built on the meta device, and each
tensor is cast on the CPU and then moved before being assigned, so a float32 14B file becomes a bf16
model on the GPU with one tensor of overhead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from torch import nn

from turbodiffusion_core.errors import CheckpointMismatch
from turbodiffusion_core.models.configs import DIT_CONFIGS, DiTConfig, get_dit_config
from turbodiffusion_core.models.dit import WanModel, runtime_dtype

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
WRAPPER_SEGMENT = "_checkpoint_wrapped_module."
LEADING_PREFIX = "model.diffusion_model."
SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
_LIST_LIMIT = 10

# File dtypes of TurboDiffusion .pth files (tests/data/keys/SOURCES.md): everything bf16 except the
# norm weights its FastNorm modules re-create as float32 buffers, and the int8 payloads/scales.
_TURBO_FP32_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm3.weight", "norm3.bias", ".scale", ".weight_scale")


def normalize_key(key: str) -> str:
    """Strip activation-checkpoint wrapper segments and a leading `model.diffusion_model.`."""
    key = key.replace(WRAPPER_SEGMENT, "")
    return key[len(LEADING_PREFIX):] if key.startswith(LEADING_PREFIX) else key


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def checkpoint_files(path_or_paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Expand a file, an index json, a folder, or a list of them into the weight files to read.

    A folder means: the shards named by its `*.safetensors.index.json` if there is one, else all its
    `*.safetensors`, else its single `.pth`/`.pt` file.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        path_or_paths = [path_or_paths]
    files: list[Path] = []
    for entry in map(Path, path_or_paths):
        if entry.is_dir():
            files.extend(_files_in_folder(entry))
        elif entry.name.endswith(SAFETENSORS_INDEX_SUFFIX):
            files.extend(_shards_of_index(entry))
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"checkpoint path does not exist: {entry}")
    return files


def _shards_of_index(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _files_in_folder(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*" + SAFETENSORS_INDEX_SUFFIX))
    if len(indexes) == 1:
        return _shards_of_index(indexes[0])
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted([*folder.glob("*.pth"), *folder.glob("*.pt")])
    if len(pickles) == 1:
        return pickles
    found = ", ".join(p.name for p in [*indexes, *pickles]) or "no .safetensors/.pth files"
    raise FileNotFoundError(f"cannot tell which checkpoint to read in {folder}: {found}")


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The tensors of one or more checkpoint files under normalised key names, read on access.

    safetensors files are opened once and each tensor is read when asked for; `.pth` files are
    memory-mapped, so their tensors are paged in on use. Iterating keys reads nothing.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self._readers: dict[str, Callable[[], torch.Tensor]] = {}
        self._handles: list[object] = []
        for path in files:
            if path.suffix == ".safetensors":
                self._add_safetensors(path)
            else:
                self._add_pickle(path)

    def _add(self, raw_key: str, reader: Callable[[], torch.Tensor], path: Path) -> None:
        key = normalize_key(raw_key)
        if key in self._readers:
            raise CheckpointMismatch(f"key {key!r} appears twice (after prefix stripping); last seen in {path}")
        self._readers[key] = reader

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt", device="cpu")
        self._handles.append(handle)
        for raw in handle.keys():
            self._add(raw, lambda raw=raw, handle=handle: handle.get_tensor(raw), path)

    def _add_pickle(self, path: Path) -> None:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CheckpointMismatch(f"{path} is not a flat state dict of tensors")
        for raw, tensor in data.items():
            self._add(raw, lambda tensor=tensor: tensor, path)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._readers[key]()

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def read_state_dict(path_or_paths: PathLike | Sequence[PathLike]) -> CheckpointTensors:
    """All tensors of a checkpoint (file, shards, index json or folder), keys normalised, read lazily."""
    return CheckpointTensors(checkpoint_files(path_or_paths))


# ------------------------------------------------------------------------------------------------
# Format detection and mismatch diagnosis
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTFileFormat:
    """What a DiT state dict looks like, as far as building the module for it is concerned."""

    conv_patch: bool  # official Wan Conv3d patch embedding (5-D weight)
    sla_proj: bool  # TurboDiffusion SLA proj_l keys
    quant: Optional[str]  # "int8" (-quant files), "fp8" (ours) or None


def detect_dit_format(state_dict: Mapping[str, torch.Tensor]) -> DiTFileFormat:
    keys = list(state_dict)
    quant = None
    if any(k.endswith(".int8_weight") for k in keys):
        quant = "int8"
    elif any(k.endswith(".weight_scale") for k in keys):
        quant = "fp8"
    conv = "patch_embedding.weight" in state_dict and state_dict["patch_embedding.weight"].ndim == 5
    return DiTFileFormat(conv_patch=conv, sla_proj=any(".proj_l." in k for k in keys), quant=quant)


def _arch_name(cfg: DiTConfig) -> str:
    return next((name for name, known in DIT_CONFIGS.items() if known == cfg), "custom")


def _likely_causes(
    cfg: DiTConfig, state_dict: Mapping[str, torch.Tensor], fmt: DiTFileFormat, quant: Optional[str], sla_proj: bool
) -> list[str]:
    """Plain-language guesses at why a checkpoint does not fit, most specific first."""
    causes = []
    if fmt.quant == "int8" and quant != "int8":
        causes.append("this is a -quant checkpoint (int8_weight/scale keys): load it with quant='int8'")
    if fmt.quant == "fp8" and quant != "fp8":
        causes.append("this checkpoint holds fp8 weights (weight_scale keys): load it with quant='fp8'")
    if fmt.sla_proj and not sla_proj:
        causes.append("proj_l keys present: this is a TurboDiffusion checkpoint; build the model with SLA projections")
    if sla_proj and not fmt.sla_proj:
        causes.append("no proj_l keys: this is not a TurboDiffusion SLA checkpoint (an official Wan file?)")
    if any(k.startswith("img_emb.") for k in state_dict):
        causes.append("img_emb keys: a Wan2.1 I2V/FLF2V checkpoint with a CLIP branch, which is not supported")
    patch = state_dict["patch_embedding.weight"] if "patch_embedding.weight" in state_dict else None
    if patch is not None:
        file_dim = patch.shape[0]
        file_in = patch.shape[1] if patch.ndim == 5 else patch.shape[1] // cfg.patch_volume
        if file_dim != cfg.dim:
            causes.append(f"hidden size {file_dim} in the file vs {cfg.dim} for this arch: a different model size")
        if file_in != cfg.in_dim:
            kind = {36: "an image-to-video expert", 16: "a text-to-video model"}.get(file_in, "another model")
            causes.append(f"in_dim {file_in}: this is {kind}, but the arch expects in_dim {cfg.in_dim}")
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers and len(layers) != cfg.num_layers:
        causes.append(f"{len(layers)} blocks in the file vs {cfg.num_layers} for this arch")
    return causes


def _listing(title: str, items: list[str]) -> str:
    more = f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return f"  {title} ({len(items)}): {', '.join(items[:_LIST_LIMIT])}{more}"


def _mismatch_message(
    cfg: DiTConfig,
    causes: list[str],
    missing: list[str],
    unexpected: list[str],
    shapes: list[str],
    options: str,
) -> str:
    lines = [f"checkpoint does not fit DiT {_arch_name(cfg)!r} ({options}):"]
    lines += [f"  likely cause: {cause}" for cause in causes]
    if missing:
        lines.append(_listing("missing keys", missing))
    if unexpected:
        lines.append(_listing("unexpected keys", unexpected))
    if shapes:
        lines.append(_listing("shape mismatches", shapes))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Building a model from a state dict
# ------------------------------------------------------------------------------------------------
def _normalize_quant(quant: Optional[str]) -> Optional[str]:
    if quant in (None, "none"):
        return None
    if quant not in ("int8", "fp8"):
        raise ValueError(f"quant must be None, 'int8' or 'fp8', got {quant!r}")
    return quant


def build_dit(
    cfg: DiTConfig | str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quant: Optional[str] = None,
    strict: bool = True,
    sla_proj: Optional[bool] = None,
    attention: str = "auto",
    sla_topk: float = 0.1,
) -> WanModel:
    """A WanModel holding the tensors of `state_dict` (see `load_dit`; this is its in-memory half)."""
    cfg = get_dit_config(cfg)
    quant = _normalize_quant(quant)
    fmt = detect_dit_format(state_dict)
    sla_proj = fmt.sla_proj if sla_proj is None else sla_proj
    stored_quant = fmt.quant if fmt.quant == quant else None
    model = WanModel.on_meta(cfg, attention=attention, sla_topk=sla_topk, with_sla_proj=sla_proj, quant=stored_quant)
    expected = model.state_dict()

    loaded: dict[str, torch.Tensor] = {}
    unexpected, shapes = [], []
    for key in state_dict:
        if key not in expected:
            unexpected.append(key)
            continue
        tensor = state_dict[key]
        if key == "patch_embedding.weight" and tensor.ndim == 5:
            tensor = tensor.reshape(tensor.shape[0], -1)  # Conv3d [dim, c, kt, kh, kw] -> Linear, (c,kt,kh,kw) order
        if tensor.shape != expected[key].shape:
            shapes.append(f"{key}: file {list(tensor.shape)} vs model {list(expected[key].shape)}")
            continue
        loaded[key] = tensor.to(runtime_dtype(key, tensor.dtype, dtype)).to(device)
    missing = [key for key in expected if key not in state_dict]
    quant_conflict = fmt.quant is not None and fmt.quant != quant
    if missing or shapes or quant_conflict or (unexpected and strict):
        options = f"sla_proj={sla_proj}, quant={quant}"
        causes = _likely_causes(cfg, state_dict, fmt, quant, sla_proj)
        raise CheckpointMismatch(_mismatch_message(cfg, causes, missing, unexpected, shapes, options))
    if unexpected:
        log.warning("ignoring %d unexpected checkpoint keys, e.g. %s", len(unexpected), unexpected[:3])

    model.load_state_dict(loaded, strict=True, assign=True)
    if quant is not None and stored_quant is None:
        from turbodiffusion_core.quant import quantize_model_linears

        quantize_model_linears(model, quant)
        model.quant = quant
    return model.requires_grad_(False).eval()


def load_dit(
    cfg: DiTConfig | str,
    paths: PathLike | Sequence[PathLike],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quant: Optional[str] = None,
    strict: bool = True,
    sla_proj: Optional[bool] = None,
    attention: str = "auto",
    sla_topk: float = 0.1,
) -> WanModel:
    """Load a DiT checkpoint in any supported format into a ready-to-run WanModel (eval, no grad).

    Args:
        cfg: arch name or DiTConfig; every shape in the file is checked against it.
        paths: a file, shards, an index json or a folder (see `checkpoint_files`).
        device, dtype: where the model lives and its matmul dtype (norms/modulation stay float32).
        quant: None, "int8" or "fp8". A pre-quantized file (int8_weight/scale keys) needs its own mode;
            a float file is quantized at load time.
        strict: unexpected keys are an error (else they are ignored with a warning). Missing keys and
            shape mismatches are always an error: CheckpointMismatch lists them with the likely cause.
        sla_proj: build SLA proj_l layers; None follows the file (TurboDiffusion files have them).
        attention, sla_topk: the model's default attention backend and SLA top-k.
    """
    return build_dit(
        cfg, read_state_dict(paths), device=device, dtype=dtype, quant=quant, strict=strict,
        sla_proj=sla_proj, attention=attention, sla_topk=sla_topk,
    )


# ------------------------------------------------------------------------------------------------
# Writing (tiny checkpoints in the official layouts)
# ------------------------------------------------------------------------------------------------
def _block_linear_prefixes(model: WanModel) -> list[str]:
    """Key prefixes of the float linears quantization applies to (quant/__init__.py says which)."""
    from turbodiffusion_core.quant import SKIPPED_LINEAR

    return [
        f"blocks.{name}"
        for name, module in model.blocks.named_modules()
        if type(module) is nn.Linear and not name.endswith(SKIPPED_LINEAR)
    ]


def _quantized_entries(prefix: str, weight: torch.Tensor, quant: str) -> dict[str, torch.Tensor]:
    from turbodiffusion_core.quant import quantize_fp8_rowwise, quantize_tile_int8

    if quant == "int8":
        q, scale = quantize_tile_int8(weight)
        return {f"{prefix}.int8_weight": q, f"{prefix}.scale": scale}
    q, scale = quantize_fp8_rowwise(weight)
    return {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale}


def dit_state_dict_for_file(
    model: WanModel, fmt: Literal["turbo", "wan"] = "turbo", quant: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """The model's weights laid out exactly as an official file of that format (CPU tensors).

    "turbo": TurboDiffusion .pth layout: bf16, float32 norm weights, Linear patch embedding, proj_l if
    the model has it; with quant="int8" the `-quant` layout (quantizing float block linears on the way
    if the model holds float ones). "wan": official Wan layout: float32, Conv3d patch embedding.
    """
    quant = _normalize_quant(quant)
    state = {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    if fmt == "wan":
        if quant or model.quant or model.with_sla_proj:
            raise ValueError("the official Wan format holds float weights and no SLA proj_l")
        cfg = model.cfg
        state["patch_embedding.weight"] = state["patch_embedding.weight"].reshape(cfg.dim, cfg.in_dim, *cfg.patch_size)
        return {key: tensor.float() for key, tensor in state.items()}
    if fmt != "turbo":
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'turbo' or 'wan'")
    if model.quant != quant and model.quant is not None:
        raise ValueError(f"the model holds {model.quant} weights; it cannot be written as quant={quant}")
    if quant is not None and model.quant is None:
        for prefix in _block_linear_prefixes(model):
            state.update(_quantized_entries(prefix, state.pop(f"{prefix}.weight"), quant))
    return {key: _turbo_file_tensor(key, tensor) for key, tensor in state.items()}


def _turbo_file_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn:
        return tensor
    return tensor.float() if key.endswith(_TURBO_FP32_SUFFIXES) else tensor.to(torch.bfloat16)


def write_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike, *, shards: int = 1) -> list[Path]:
    """Write a state dict as `.pth` (torch.save) or `.safetensors`; returns the files written.

    With `shards > 1` and a `.safetensors` path the tensors are split like the official Wan repos:
    `<stem>-0000k-of-0000N.safetensors` plus `<stem>.safetensors.index.json` mapping every key to its shard.
    """
    path = Path(path)
    tensors = {key: tensor.contiguous() for key, tensor in state_dict.items()}
    if path.suffix != ".safetensors":
        if shards != 1:
            raise ValueError("only safetensors checkpoints can be sharded")
        torch.save(tensors, path)
        return [path]
    from safetensors.torch import save_file

    if shards == 1:
        save_file(tensors, str(path))
        return [path]
    keys = list(tensors)
    per_shard = -(-len(keys) // shards)
    written, weight_map = [], {}
    for index in range(shards):
        shard = path.with_name(f"{path.stem}-{index + 1:05d}-of-{shards:05d}.safetensors")
        part = {key: tensors[key] for key in keys[index * per_shard : (index + 1) * per_shard]}
        save_file(part, str(shard))
        weight_map.update(dict.fromkeys(part, shard.name))
        written.append(shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_path = path.with_name(path.name + ".index.json")
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return [*written, index_path]
