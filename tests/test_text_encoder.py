"""umT5 text encoder: the tiny tokenizer, Wan key maps, strict loading from a Wan-format .pth, encoding
of English / Chinese / mixed prompts against transformers run directly, and the embedding cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from turbodiffusion_core.errors import CheckpointMismatch
from turbodiffusion_core.models.text_encoder import (
    T5_CONFIGS,
    TextEncoder,
    clean_prompt,
    hf_t5_key_to_wan,
    hf_t5_to_wan,
    load_umt5_encoder,
    umt5_config,
    wan_t5_key_to_hf,
    wan_t5_to_hf,
)
from turbodiffusion_core.models.tokenizer_builder import build_tiny_tokenizer

KEYS = Path(__file__).parent / "data" / "keys"
ENGLISH = "An orange cat chases a butterfly in the garden, cinematic lighting."
CHINESE = "一只橙色的猫在花园里追逐蝴蝶"
MIXED = "A panda 在竹林里吃竹子, slow motion 4K。"
PROMPTS = [ENGLISH, CHINESE, MIXED]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(umt5_config("tiny")).eval()


@pytest.fixture(scope="module")
def wan_t5_path(tmp_path_factory, hf_model) -> Path:
    """The tiny encoder saved as Wan ships its encoder: Wan key names, bf16, a plain torch pickle."""
    sd = {k: v.to(torch.bfloat16) for k, v in hf_t5_to_wan(hf_model.state_dict()).items()}
    path = tmp_path_factory.mktemp("t5") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def encoder(wan_t5_path, tokenizer_dir) -> TextEncoder:
    return TextEncoder.from_files(wan_t5_path, tokenizer_dir, config="tiny", dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
def test_tiny_tokenizer_build_is_deterministic(tokenizer_dir, tmp_path):
    again = build_tiny_tokenizer(tmp_path / "again")
    names = sorted(p.name for p in tokenizer_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (tokenizer_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_tokenizer_loads_through_autotokenizer_like_umt5(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == T5_CONFIGS["tiny"]["vocab_size"]
    for text in PROMPTS:
        ids = tok(clean_prompt(text)).input_ids
        assert ids[-1] == 1 and ids.count(1) == 1  # </s> appended once
        assert 2 not in ids, f"unknown token in {text!r}: {tok.convert_ids_to_tokens(ids)}"
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == clean_prompt(text).replace(" ", "")
    # Characters outside the vocab degrade to <unk> instead of failing.
    assert 2 in tok("emoji 🦋 and Ω").input_ids


# ------------------------------------------------------------------------------------------------
# Key maps and strict loading
# ------------------------------------------------------------------------------------------------
def test_official_umt5_xxl_key_list_maps_onto_umt5_encoder_model():
    official = json.loads((KEYS / "wan2.1-t5-umt5-xxl.json").read_text())["tensors"]
    mapping = json.loads((KEYS / "wan-t5-to-transformers-umt5-map.json").read_text())["tensors"]
    assert set(official) == set(mapping) and len(official) == 242
    for key, entry in mapping.items():
        assert wan_t5_key_to_hf(key) == entry["to"], key

    meta_sd = {
        k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta") for k, v in official.items()
    }
    model = load_umt5_encoder(meta_sd, "umt5-xxl")  # raises CheckpointMismatch on any difference
    assert set(model.state_dict()) == set(wan_t5_to_hf(meta_sd))
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.shared.weight.shape == (256384, 4096)
    assert set(hf_t5_to_wan(model.state_dict())) == set(official)


def test_hf_and_wan_maps_round_trip(hf_model):
    sd = hf_model.state_dict()
    wan = hf_t5_to_wan(sd)
    assert "token_embedding.weight" in wan and "blocks.1.ffn.gate.0.weight" in wan
    back = wan_t5_to_hf(wan)
    assert set(back) == set(sd)
    for key, value in back.items():
        assert value is wan[hf_t5_key_to_wan(key)], key
    assert back["encoder.embed_tokens.weight"] is back["shared.weight"]


def _saved(tmp_path: Path, sd: dict) -> Path:
    path = tmp_path / "t5.pth"
    torch.save(sd, path)
    return path


def test_missing_and_unexpected_keys_are_named(wan_t5_path, tokenizer_dir, tmp_path):
    sd = torch.load(wan_t5_path, weights_only=True)
    broken = dict(sd)
    del broken["blocks.1.attn.k.weight"]
    broken["blocks.1.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatch) as err:
        TextEncoder.from_files(_saved(tmp_path, broken), tokenizer_dir, config="tiny")
    message = str(err.value)
    assert "blocks.1.attn.k.weight" in message and "missing" in message
    assert "blocks.1.attn.extra.weight" in message and "unexpected" in message


def test_shape_mismatch_is_named(wan_t5_path, tokenizer_dir, tmp_path):
    sd = dict(torch.load(wan_t5_path, weights_only=True))
    sd["norm.weight"] = torch.zeros(7, dtype=torch.bfloat16)
    with pytest.raises(CheckpointMismatch, match=r"norm\.weight: file \(7,\)"):
        TextEncoder.from_files(_saved(tmp_path, sd), tokenizer_dir, config="tiny")


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
def test_clean_prompt_follows_wan():
    assert clean_prompt("  A &amp;amp; B\n\t cat  ") == "A & B cat"
    assert clean_prompt("cafÃ©  au lait") == "café au lait"  # ftfy repairs mojibake
    assert clean_prompt(" 一只猫\u3000在跑 ") == "一只猫 在跑"


def test_encode_lengths_are_true_token_counts(encoder):
    out = encoder.encode(PROMPTS)
    for text, emb in zip(PROMPTS, out):
        n_tokens = len(encoder.tokenizer(clean_prompt(text)).input_ids)
        assert emb.shape == (n_tokens, T5_CONFIGS["tiny"]["d_model"])
        assert emb.dtype == torch.float32
    assert len({e.shape[0] for e in out}) == 3  # the three prompts really differ in length


def test_encode_equals_transformers_run_directly(encoder, hf_model):
    """Reference: the same weights (rounded to bf16 like the file) in transformers, on Wan's padded
    512-token batch with the mask, trimmed by hand; and on each prompt alone without padding, which
    shows the padded positions do not leak into the kept ones."""
    ref_model = copy.deepcopy(hf_model).to(torch.bfloat16).to(torch.float32)
    tok = encoder.tokenizer
    texts = [clean_prompt(p) for p in PROMPTS]
    batch = tok(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (3, 512)
    with torch.no_grad():
        padded = ref_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    out = encoder.encode(PROMPTS)
    for i, text in enumerate(texts):
        n = int(batch.attention_mask[i].sum())
        assert torch.allclose(out[i], padded[i, :n], atol=1e-6)
        alone = tok(text, return_tensors="pt")
        with torch.no_grad():
            unpadded = ref_model(input_ids=alone.input_ids).last_hidden_state[0]
        assert torch.allclose(out[i], unpadded, atol=1e-5)


def test_default_dtype_is_bf16(wan_t5_path, tokenizer_dir):
    enc = TextEncoder.from_files(wan_t5_path, tokenizer_dir, config="tiny")
    assert enc.dtype == torch.bfloat16 and enc.device.type == "cpu"
    assert enc.encode([CHINESE])[0].dtype == torch.bfloat16
    assert enc.to("cpu") is enc and enc.offload() is enc and enc.device.type == "cpu"


def test_long_prompts_are_truncated_to_512_tokens(encoder):
    (emb,) = encoder.encode([" ".join(["butterfly garden"] * 400)])
    assert emb.shape[0] == 512


def test_embedding_cache_skips_the_encoder_on_repeats(wan_t5_path, tokenizer_dir):
    enc = TextEncoder.from_files(wan_t5_path, tokenizer_dir, config="tiny", dtype=torch.float32, cache_size=2)
    forwards: list[int] = []
    enc.model.register_forward_hook(lambda module, args, output: forwards.append(1))

    first = enc.encode([ENGLISH])[0]
    again = enc.encode(["  " + ENGLISH.replace(" ", "   ") + "\n"])[0]  # same text once cleaned
    assert len(forwards) == 1
    assert torch.equal(first, again)
    info = enc.cache_info()
    assert (info.hits, info.misses, info.maxsize, info.currsize) == (1, 1, 2, 1)

    enc.encode([CHINESE, MIXED])  # one batch for both misses; evicts ENGLISH (LRU, size 2)
    assert len(forwards) == 2 and enc.cache_info().currsize == 2
    enc.encode([ENGLISH])
    assert len(forwards) == 3 and enc.cache_info().misses == 4

    enc.cache_clear()
    assert enc.cache_info() == (0, 0, 2, 0)
