"""Checkpoint loading against the exact key lists of the official files (meta tensors, no memory), the
mismatch messages, and a write/read round trip of a tiny model through every file layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from turbodiffusion_core.checkpoints import (
    build_dit,
    detect_dit_format,
    dit_state_dict_for_file,
    load_dit,
    normalize_key,
    read_state_dict,
    write_state_dict,
)
from turbodiffusion_core.errors import CheckpointMismatch
from turbodiffusion_core.models.dit import WanModel
from turbodiffusion_core.quant import quantize_model_linears

KEYS = Path(__file__).parent / "data" / "keys"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}

# key-list file -> (arch, quant to load it with)
OFFICIAL_FILES = {
    "wan2.1-t2v-1.3b.dit": ("wan2.1-t2v-1.3b", None),
    "wan2.1-t2v-14b.dit": ("wan2.1-t2v-14b", None),
    "wan2.2-a14b-expert.dit": ("wan2.2-i2v-a14b", None),
    "turbowan2.1-t2v-1.3b-480p": ("wan2.1-t2v-1.3b", None),
    "turbowan2.1-t2v-1.3b-480p-quant": ("wan2.1-t2v-1.3b", "int8"),
    "turbowan2.1-t2v-14b": ("wan2.1-t2v-14b", None),
    "turbowan2.1-t2v-14b-quant": ("wan2.1-t2v-14b", "int8"),
    "turbowan2.2-i2v-a14b-expert": ("wan2.2-i2v-a14b", None),
    "turbowan2.2-i2v-a14b-expert-quant": ("wan2.2-i2v-a14b", "int8"),
}


def meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Meta tensors with exactly the keys, shapes and dtypes of an official checkpoint file."""
    tensors = json.loads((KEYS / f"{name}.json").read_text())["tensors"]
    return {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta") for k, v in tensors.items()}


@pytest.mark.parametrize("name", list(OFFICIAL_FILES))
def test_official_layout_loads_strictly(name: str) -> None:
    arch, quant = OFFICIAL_FILES[name]
    state = meta_state_dict(name)
    model = build_dit(arch, state, device="meta", quant=quant)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert model.with_sla_proj == name.startswith("turbo")
    block = model.blocks[0]
    assert block.modulation.dtype == torch.float32 and block.norm3.weight.dtype == torch.float32
    if quant == "int8":
        assert block.ffn[0].int8_weight.dtype == torch.int8 and block.ffn[0].scale.dtype == torch.float32
    else:
        assert block.ffn[0].weight.dtype == torch.bfloat16


def test_missing_key_is_named() -> None:
    state = meta_state_dict("wan2.1-t2v-1.3b.dit")
    del state["blocks.7.cross_attn.norm_k.weight"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys \(1\): blocks\.7\.cross_attn\.norm_k\.weight"):
        build_dit("wan2.1-t2v-1.3b", state, device="meta")


def test_quant_file_without_quant_gives_the_hint() -> None:
    state = meta_state_dict("turbowan2.1-t2v-1.3b-480p-quant")
    with pytest.raises(CheckpointMismatch) as info:
        build_dit("wan2.1-t2v-1.3b", state, device="meta")
    message = str(info.value)
    assert "load it with quant='int8'" in message
    assert "blocks.0.self_attn.q.int8_weight" in message and "(+" in message  # lists the first ones, counts the rest


def test_wrong_arch_and_sla_options_explain_themselves() -> None:
    with pytest.raises(CheckpointMismatch, match="in_dim 36: this is an image-to-video expert"):
        build_dit("wan2.1-t2v-14b", meta_state_dict("wan2.2-a14b-expert.dit"), device="meta")
    with pytest.raises(CheckpointMismatch, match="hidden size 5120 in the file vs 1536"):
        build_dit("wan2.1-t2v-1.3b", meta_state_dict("wan2.1-t2v-14b.dit"), device="meta")
    turbo = meta_state_dict("turbowan2.1-t2v-1.3b-480p")
    with pytest.raises(CheckpointMismatch, match="proj_l keys present: this is a TurboDiffusion checkpoint"):
        build_dit("wan2.1-t2v-1.3b", turbo, device="meta", sla_proj=False)
    relaxed = build_dit("wan2.1-t2v-1.3b", turbo, device="meta", sla_proj=False, strict=False)
    assert not relaxed.with_sla_proj


def test_key_normalisation() -> None:
    assert normalize_key("blocks.3._checkpoint_wrapped_module.ffn.0.weight") == "blocks.3.ffn.0.weight"
    assert normalize_key("model.diffusion_model.head.head.bias") == "head.head.bias"
    assert normalize_key("head.modulation") == "head.modulation"


# ------------------------------------------------------------------------------------------------
# Round trip through real files
# ------------------------------------------------------------------------------------------------
def bf16_exact_model(arch: str, **kwargs: object) -> WanModel:
    """A random fp32 model whose values are bf16-representable, so every file layout is lossless."""
    torch.manual_seed(0)
    model = WanModel(arch, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param).mul_(0.2).bfloat16().float())
    return model


def run(model: WanModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    cfg = model.cfg
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=gen)
    context = torch.randn(1, 6, cfg.text_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([932.0]), context, attention="sla_reference", sla_topk=0.5)


def assert_same_model(loaded: WanModel, model: WanModel) -> None:
    """Bit-identical weights, and the same outputs up to float rounding (memory-mapped tensors may sit at
    addresses that make the CPU matmul pick differently-rounding kernels)."""
    ours, theirs = loaded.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    assert torch.allclose(run(loaded), run(model), rtol=1e-5, atol=1e-5)


def test_round_trip_turbo_pth(tmp_path: Path) -> None:
    model = bf16_exact_model("tiny-t2v", with_sla_proj=True)
    state = dit_state_dict_for_file(model, "turbo")
    assert state["patch_embedding.weight"].shape == (64, 64)
    assert state["text_embedding.0.weight"].dtype == torch.bfloat16
    assert state["blocks.0.norm3.bias"].dtype == torch.float32
    write_state_dict(state, tmp_path / "tiny.pth")
    loaded = load_dit("tiny-t2v", tmp_path / "tiny.pth", dtype=torch.float32)
    assert loaded.with_sla_proj and loaded.quant is None
    assert_same_model(loaded, model)


def test_round_trip_turbo_quant_pth_with_wrapper_prefixes(tmp_path: Path) -> None:
    model = bf16_exact_model("tiny-t2v", with_sla_proj=True)
    state = dit_state_dict_for_file(model, "turbo", quant="int8")
    assert detect_dit_format(state).quant == "int8"
    wrapped = {k.replace("blocks.1.", "blocks.1._checkpoint_wrapped_module."): v for k, v in state.items()}
    write_state_dict(wrapped, tmp_path / "tiny-quant.pth")
    loaded = load_dit("tiny-t2v", tmp_path / "tiny-quant.pth", dtype=torch.float32, quant="int8")
    quantize_model_linears(model, "int8")
    assert_same_model(loaded, model)


def test_round_trip_wan_safetensors_single_sharded_and_folder(tmp_path: Path) -> None:
    model = bf16_exact_model("tiny-i2v")
    state = dit_state_dict_for_file(model, "wan")
    assert state["patch_embedding.weight"].shape == (64, 36, 1, 2, 2)
    assert all(t.dtype == torch.float32 for t in state.values())

    single = tmp_path / "single" / "diffusion_pytorch_model.safetensors"
    single.parent.mkdir()
    write_state_dict(state, single)
    assert_same_model(load_dit("tiny-i2v", single, dtype=torch.float32), model)

    folder = tmp_path / "sharded"
    folder.mkdir()
    written = write_state_dict(state, folder / "diffusion_pytorch_model.safetensors", shards=3)
    assert [p.name for p in written][-1] == "diffusion_pytorch_model.safetensors.index.json"
    assert len(read_state_dict(folder)) == len(state)
    assert_same_model(load_dit("tiny-i2v", folder, dtype=torch.float32), model)
    assert_same_model(load_dit("tiny-i2v", written[-1], dtype=torch.float32), model)


def test_comfyui_prefix_and_load_time_fp8(tmp_path: Path) -> None:
    model = bf16_exact_model("tiny-t2v")
    state = {f"model.diffusion_model.{k}": v for k, v in dit_state_dict_for_file(model, "turbo").items()}
    write_state_dict(state, tmp_path / "prefixed.safetensors")
    loaded = load_dit("tiny-t2v", tmp_path / "prefixed.safetensors", dtype=torch.float32, quant="fp8")
    assert loaded.quant == "fp8"
    quantize_model_linears(model, "fp8")
    assert_same_model(loaded, model)
