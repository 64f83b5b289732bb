"""The umT5 text encoder: `transformers.UMT5EncoderModel` loaded from Wan's own checkpoint file.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth` with its own key names (reference/wan.md
§2.2); the math is exactly transformers' UMT5 encoder (per-layer relative-position bias, gated tanh-GELU
FFN, unscaled attention, RMSNorm), so instead of re-implementing it we rename the keys onto
`UMT5EncoderModel` (wan.md §2.4, tests/data/keys/wan-t5-to-transformers-umt5-map.json). The model is
built on the meta device and the file's tensors are assigned into it, so loading the 11 GB XXL encoder
never allocates a second copy.

Prompts go through Wan's cleaning and tokenization (wan.md §2.3): ftfy + double HTML unescape +
whitespace collapse, padded/truncated to 512 tokens with `</s>` appended, encoded with the padding mask,
and each output trimmed to its true length (the DiT zero-pads it back to 512 itself).

`quantize_umt5_fp8` (placement "gpu-fp8") stores the attention and FFN-input weights in e4m3 with one
scale per output channel, run weight-only (activations stay bf16): 7.2 GiB instead of 10.6 GiB on the GPU
for the XXL encoder. fp8 umT5 weights are a common way to run Wan on smaller cards. The FFN output
projection `wo` stays bf16: UMT5's FFN casts its input to `wo.weight`'s dtype (kept from T5 8-bit work).

torch and transformers are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import html
import os
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional, Union

from turbodiffusion_core.errors import CheckpointMismatch
from turbodiffusion_core.models.tokenizer_builder import TINY_VOCAB_SIZE

if TYPE_CHECKING:
    import torch
    from transformers import UMT5EncoderModel

TEXT_LEN = 512
"""Wan pads/truncates every prompt to 512 tokens (`text_len` in the Wan configs)."""

_UMT5_COMMON: dict[str, Any] = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",  # the tanh GELU approximation, as Wan's T5 FFN uses
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}

T5_CONFIGS: dict[str, dict[str, Any]] = {
    # google/umt5-xxl encoder, as in Wan's models_t5_umt5-xxl-enc-bf16.pth (wan.md §2.1, §2.4).
    "umt5-xxl": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, **_UMT5_COMMON),
    # Same code path at toy size; the vocab is the tiny tokenizer's (models/tokenizer_builder.py).
    "tiny": dict(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **_UMT5_COMMON),
}
"""`transformers.UMT5Config` keyword arguments per encoder preset."""

# ------------------------------------------------------------------------------------------------
# Key maps (pure renames, no transposes): Wan T5Encoder <-> transformers UMT5EncoderModel
# ------------------------------------------------------------------------------------------------
_TOP_LEVEL = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_PER_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_HF_EMBED = "encoder.embed_tokens.weight"
"""UMT5EncoderModel's encoder embedding, tied to `shared.weight`: fed from Wan's token_embedding too."""

_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_PER_BLOCK_INV = {hf: wan for wan, hf in _PER_BLOCK.items()}
_TOP_LEVEL_INV = {hf: wan for wan, hf in _TOP_LEVEL.items()}


def wan_t5_key_to_hf(key: str) -> Optional[str]:
    """The UMT5EncoderModel name of one Wan T5 key, or None when the key is not part of the encoder."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    m = _WAN_BLOCK.fullmatch(key)
    if m and m.group(2) in _PER_BLOCK:
        return f"encoder.block.{m.group(1)}.{_PER_BLOCK[m.group(2)]}"
    return None


def hf_t5_key_to_wan(key: str) -> Optional[str]:
    """The Wan name of one UMT5EncoderModel key (the tied embedding maps to token_embedding)."""
    if key == _HF_EMBED:
        return "token_embedding.weight"
    if key in _TOP_LEVEL_INV:
        return _TOP_LEVEL_INV[key]
    m = _HF_BLOCK.fullmatch(key)
    if m and m.group(2) in _PER_BLOCK_INV:
        return f"blocks.{m.group(1)}.{_PER_BLOCK_INV[m.group(2)]}"
    return None


def wan_t5_to_hf(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a Wan T5 state dict to UMT5EncoderModel names. `token_embedding.weight` feeds both
    `shared.weight` and the tied `encoder.embed_tokens.weight` (the same tensor object, no copy).
    Keys the map does not know are passed through unchanged, so a strict load names them."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        hf_key = wan_t5_key_to_hf(key)
        out[hf_key or key] = value
        if hf_key == "shared.weight":
            out[_HF_EMBED] = value
    return out


def hf_t5_to_wan(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a UMT5EncoderModel state dict to Wan's key names (what `models_t5_umt5-xxl-enc-bf16.pth`
    holds). The tied `encoder.embed_tokens.weight` is dropped in favour of `shared.weight`."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in sd.items():
        if key == _HF_EMBED:
            continue
        wan_key = hf_t5_key_to_wan(key)
        if wan_key is None:
            unknown.append(key)
        else:
            out[wan_key] = value
    if unknown:
        raise CheckpointMismatch(f"keys with no Wan T5 name: {_preview(unknown)}")
    return out


def _preview(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


# ------------------------------------------------------------------------------------------------
# Building the model
# ------------------------------------------------------------------------------------------------
def umt5_config(config: str = "umt5-xxl"):
    """The `transformers.UMT5Config` of a preset name in `T5_CONFIGS`."""
    from transformers import UMT5Config

    if config not in T5_CONFIGS:
        raise ValueError(f"unknown T5 config {config!r}; known: {sorted(T5_CONFIGS)}")
    return UMT5Config(**T5_CONFIGS[config])


def build_umt5_on_meta(config: str = "umt5-xxl") -> "UMT5EncoderModel":
    """An UMT5EncoderModel whose parameters live on the meta device (no memory, no random init)."""
    import torch
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        return UMT5EncoderModel(umt5_config(config))


def check_t5_state_dict(model: "torch.nn.Module", hf_sd: Mapping[str, Any]) -> None:
    """Strict key and shape check of a (renamed) state dict against the model; raises
    CheckpointMismatch naming missing keys (in Wan's names), unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [hf_t5_key_to_wan(k) or k for k in expected if k not in hf_sd]
    missing = sorted(set(missing))
    unexpected = [k for k in hf_sd if k not in expected]
    wrong_shape = [
        f"{hf_t5_key_to_wan(k) or k}: file {tuple(v.shape)} vs model {expected[k]}"
        for k, v in hf_sd.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches {_preview(wrong_shape)}")
        raise CheckpointMismatch("T5 checkpoint does not fit UMT5EncoderModel: " + "; ".join(parts))


def load_umt5_encoder(
    wan_sd: Mapping[str, "torch.Tensor"], config: str = "umt5-xxl", dtype: Optional["torch.dtype"] = None
) -> "UMT5EncoderModel":
    """Build UMT5EncoderModel on meta and assign a Wan-format state dict into it (strict).

    Tensors are cast to `dtype` first (when given) so the model ends up in one dtype without a second
    full copy; the tied input embedding is re-tied afterwards so later `.to(device)` moves it once.
    Returns the model in eval mode with gradients off, on the device the tensors are on.
    """
    model = build_umt5_on_meta(config)
    hf_sd = wan_t5_to_hf(wan_sd)
    check_t5_state_dict(model, hf_sd)
    if dtype is not None:
        cast = {id(v): v.to(dtype) for v in hf_sd.values()}  # shared tensors are cast once
        hf_sd = {k: cast[id(v)] for k, v in hf_sd.items()}
    model.load_state_dict(hf_sd, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight
    model.eval().requires_grad_(False)
    return model


FP8_LINEARS = ("q", "k", "v", "o", "wi_0", "wi_1")
"""Linears of each encoder block that `quantize_umt5_fp8` stores in fp8 (not `wo`: see the module doc)."""


def quantize_umt5_fp8(model: "UMT5EncoderModel", device: Optional[Union[str, "torch.device"]] = None) -> int:
    """Swap the encoder blocks' FP8_LINEARS for weight-only fp8 linears, in place; returns how many.

    With `device`, each weight is moved there just before it is quantized (one layer's bf16 weight on the
    device at a time); move the rest of the model afterwards. A meta model gets empty meta modules."""
    from torch import nn

    from turbodiffusion_core.quant.fp8 import Fp8WeightOnlyLinear

    swapped = 0
    for parent in list(model.encoder.block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in FP8_LINEARS:
                source = child if device is None or child.weight.is_meta else child.to(device)
                setattr(parent, name, Fp8WeightOnlyLinear.from_linear(source))
                swapped += 1
    return swapped


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy.fix_text, HTML-unescape twice, strip, collapse whitespace runs."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class TextEncoder:
    """umT5 encoder + tokenizer + a small LRU cache of prompt embeddings.

    `encode` returns one tensor [L_i, d_model] per prompt, L_i = the prompt's token count including
    `</s>`, in the model's dtype (bf16 for the real encoder, like Wan's), on the encoder's device.
    Repeated prompts (after cleaning) come from the cache without running the encoder; the negative
    prompt of a CFG pipeline is the typical hit. Cached tensors are returned as they are, so callers
    must not modify them in place.
    """

    def __init__(self, model: "UMT5EncoderModel", tokenizer: Any, *, text_len: int = TEXT_LEN, cache_size: int = 64):
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, "torch.Tensor"] = OrderedDict()
        self._hits = 0
        self._misses = 0

    @classmethod
    def from_files(
        cls,
        t5_path: Union[str, os.PathLike],
        tokenizer_dir: Union[str, os.PathLike],
        *,
        config: str = "umt5-xxl",
        device: Union[str, "torch.device"] = "cpu",
        dtype: Optional["torch.dtype"] = None,
        cache_size: int = 64,
        fp8: bool = False,
    ) -> "TextEncoder":
        """Load Wan's `.pth` (memory-mapped, strict key check) and the tokenizer folder through
        `AutoTokenizer`, then move the encoder to `device`. `dtype` defaults to bfloat16. `fp8`: the block
        linears in weight-only fp8 (`quantize_umt5_fp8`), quantized on `device` one weight at a time."""
        import torch
        from transformers import AutoTokenizer

        wan_sd = torch.load(os.fspath(t5_path), map_location="cpu", weights_only=True, mmap=True)
        model = load_umt5_encoder(wan_sd, config, dtype=torch.bfloat16 if dtype is None else dtype)
        if fp8:
            quantize_umt5_fp8(model, device)
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
        return cls(model.to(device), tokenizer, cache_size=cache_size)

    # -- placement -------------------------------------------------------------------------------
    @property
    def device(self) -> "torch.device":
        return self.model.shared.weight.device

    @property
    def dtype(self) -> "torch.dtype":
        return self.model.shared.weight.dtype

    @property
    def fp8(self) -> bool:
        """Whether the block linears hold fp8 weights (`quantize_umt5_fp8`)."""
        from turbodiffusion_core.quant.fp8 import Fp8WeightOnlyLinear

        return any(isinstance(m, Fp8WeightOnlyLinear) for m in self.model.encoder.block.modules())

    def to(self, device: Union[str, "torch.device"]) -> "TextEncoder":
        """Move the encoder (not the cache) to `device`; returns self."""
        self.model.to(device)
        return self

    def offload(self) -> "TextEncoder":
        """Move the encoder to the CPU (to make room for the DiT) and release the cached GPU memory."""
        import torch

        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self

    # -- cache -----------------------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def cache_clear(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0

    def _cache_get(self, key: str) -> Optional["torch.Tensor"]:
        if key in self._cache:
            self._cache.move_to_end(key)
            self._hits += 1
            return self._cache[key]
        self._misses += 1
        return None

    def _cache_put(self, key: str, value: "torch.Tensor") -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- encoding --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Token ids and attention mask [B, text_len] of already-cleaned texts (Wan's settings)."""
        batch = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def encode(self, prompts: list[str]) -> list["torch.Tensor"]:
        """Embeddings [L_i, d_model] of each prompt, trimmed to its true token count (see class doc)."""
        import torch

        keys = [clean_prompt(p) for p in prompts]
        found = {k: v for k in dict.fromkeys(keys) if (v := self._cache_get(k)) is not None}
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            ids, mask = self.tokenize(todo)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.no_grad():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            for key, h, n in zip(todo, hidden, mask.sum(dim=1).tolist()):
                found[key] = h[:n].clone()  # clone: keep only the trimmed rows alive in the cache
                self._cache_put(key, found[key])
        return [found[k].to(self.device) for k in keys]
