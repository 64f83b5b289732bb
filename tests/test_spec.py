"""The torch-free contract: presets, sizes, frame counts and request resolution."""

import math
import subprocess
import sys

import pytest

from turbodiffusion_core import spec


def test_spec_does_not_import_torch():
    code = "import turbodiffusion_core.spec, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_defaults_come_from_the_preset():
    r = spec.resolve(spec.GenerationRequest(prompt="a cat", model="turbowan2.1-t2v-1.3b-480p"))
    assert (r.width, r.height, r.num_frames, r.steps) == (832, 480, 81, 4)
    assert r.sigma_max == 80.0 and r.sla_topk == 0.10 and r.sampler == "rcm"
    assert r.seconds == "5" and r.size == "832x480"
    i2v = spec.resolve(spec.GenerationRequest(prompt="x", model="turbowan2.2-i2v-a14b-720p"))
    assert (i2v.width, i2v.height, i2v.sigma_max, i2v.boundary) == (1280, 720, 200.0, 0.9)
    orig = spec.resolve(spec.GenerationRequest(prompt="x", model="wan2.1-t2v-1.3b"))
    assert (orig.steps, orig.sampler, orig.guidance_scale, orig.shift) == (50, "unipc", 5.0, 5.0)


@pytest.mark.parametrize("seconds,frames", [(5, 81), (4, 65), (1, 17), ("2", 33)])
def test_seconds_map_to_4k_plus_1_frames(seconds, frames):
    r = spec.resolve(spec.GenerationRequest(prompt="x", model="turbowan2.1-t2v-1.3b-480p", seconds=seconds))
    assert r.num_frames == frames and (r.num_frames - 1) % 4 == 0


def test_size_must_be_one_the_model_supports_and_the_error_lists_them():
    ok = spec.resolve(spec.GenerationRequest(prompt="x", model="turbowan2.1-t2v-1.3b-480p", size="480x832"))
    assert (ok.width, ok.height) == (480, 832)
    with pytest.raises(spec.SpecError) as e:
        spec.resolve(spec.GenerationRequest(prompt="x", model="turbowan2.1-t2v-1.3b-480p", size="720x1281"))
    assert e.value.param == "size" and "832x480" in e.value.message and "1280x720" in e.value.message


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"num_frames": 80}, "num_frames"),
        ({"num_frames": 85}, "num_frames"),
        ({"steps": 5}, "steps"),
        ({"resolution": "1080p"}, "resolution"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),
        ({"boundary": 0.8}, "boundary"),
        ({"attention_type": "flash"}, "attention_type"),
        ({"model": "sora-2"}, "model"),
        ({"size": "big"}, "size"),
        ({"size": "832x480", "resolution": "480p"}, "size"),
    ],
)
def test_bad_requests_name_their_parameter(fields, param):
    with pytest.raises(spec.SpecError) as e:
        spec.resolve(spec.GenerationRequest(**{"prompt": "x", "model": "turbowan2.1-t2v-1.3b-480p", **fields}))
    assert e.value.param == param and e.value.message


def test_adaptive_resolution_follows_the_turbodiffusion_formula():
    # 1000x600 image at the 720p 16:9 area: ideal_w = sqrt(A / r), ideal_h = sqrt(A * r), rounded to 16.
    area = 1280 * 720
    r = 600 / 1000
    expect = (round(math.sqrt(area / r) / 16) * 16, round(math.sqrt(area * r) / 16) * 16)
    assert spec.adaptive_size(1000, 600, area) == expect == (1232, 736)
    req = spec.GenerationRequest(prompt="x", model="tiny-i2v", adaptive_resolution=True, image_width=1000,
                                 image_height=600)
    got = spec.resolve(req)
    assert (got.width, got.height) == spec.adaptive_size(1000, 600, 224 * 128)
    assert got.width % 16 == 0 and got.height % 16 == 0
    with pytest.raises(spec.SpecError):
        spec.resolve(spec.GenerationRequest(prompt="x", model="tiny-t2v", adaptive_resolution=True))


def test_progress_is_monotonic_over_the_stages():
    seen = [spec.overall_progress(name, f) for name, _ in spec.STAGES for f in (0.0, 0.5, 1.0)]
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 100


def test_every_preset_describes_itself_and_its_files_are_unique():
    for preset in spec.PRESETS.values():
        d = preset.describe()
        assert d["id"] == preset.id and d["sizes"] and d["default_frames"] <= d["max_frames"]
        roles = [f.role for f in preset.files]
        assert len(roles) == len(set(roles))
        size = spec.format_size(*preset.size_for(preset.default_resolution, "16:9"))
        assert size in d["sizes"]
