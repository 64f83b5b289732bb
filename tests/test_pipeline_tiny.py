"""The whole engine on the tiny presets: prompt -> frames -> MP4, through the real loaders."""

import re
import time

import numpy as np
import pytest
from PIL import Image

from turbodiffusion.cli import main
from turbodiffusion_core import spec
from turbodiffusion_core.pipeline import load_pipeline
from turbodiffusion_core.video import read_video_frames

from tests.conftest import assert_same_video

PROMPT_ZH = "一只橙色的猫在花园里追逐蝴蝶"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def t2v(models_dir):
    return load_pipeline("tiny-t2v", models_dir=models_dir, device="cpu")


def _req(**kw):
    return spec.resolve(spec.GenerationRequest(**{"prompt": PROMPT_ZH, "model": "tiny-t2v", **kw}))


def test_cli_generate_writes_a_valid_mp4_and_reports_seed(models_dir, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    start = time.perf_counter()
    rc = main(["generate", "--model", "tiny-t2v", "--prompt", PROMPT_ZH, "--seed", "42", "--num-frames", "17",
               "--out", str(out), "--models-dir", str(models_dir)])
    elapsed = time.perf_counter() - start
    assert rc == 0
    frames = read_video_frames(out)
    assert frames.shape == (17, 128, 224, 3)
    text = capsys.readouterr().out
    assert "seed: 42" in text and "timings:" in text and "denoise" in text
    assert elapsed < 60, f"tiny generation took {elapsed:.1f}s"

    again = tmp_path / "y.mp4"
    assert main(["generate", "--model", "tiny-t2v", "--prompt", PROMPT_ZH, "--seed", "42", "--num-frames", "17",
                 "--out", str(again), "--models-dir", str(models_dir)]) == 0
    assert_same_video(read_video_frames(again), frames, "same seed, second CLI run")

    other = tmp_path / "z.mp4"
    assert main(["generate", "--model", "tiny-t2v", "--prompt", PROMPT_ZH, "--seed", "0", "--num-frames", "17",
                 "--out", str(other), "--models-dir", str(models_dir)]) == 0
    drawn = int(re.search(r"seed: (\d+)", capsys.readouterr().out).group(1))
    assert drawn != 0


def test_same_seed_same_frames_other_seed_other_frames(t2v):
    a = t2v.generate(_req(seed=7))
    b = t2v.generate(_req(seed=7))
    c = t2v.generate(_req(seed=8))
    assert a.frames.dtype == np.uint8 and a.frames.shape == (17, 128, 224, 3)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.std() > 0  # not a constant image


def test_random_seed_is_reported_and_reproduces(t2v):
    first = t2v.generate(_req(seed=0, num_frames=5))
    assert first.seed != 0
    again = t2v.generate(_req(seed=first.seed, num_frames=5))
    assert np.array_equal(first.frames, again.frames)


def test_progress_covers_every_stage_in_order_and_cancel_stops_between_steps(t2v):
    from turbodiffusion_core.errors import Cancelled

    events = []
    t2v.generate(_req(seed=1, num_frames=5), on_progress=events.append)
    stages = [e.stage for e in events]
    assert stages.index("text_encode") < stages.index("denoise") < stages.index("vae_decode")
    steps = [e.step for e in events if e.stage == "denoise" and e.step]
    assert steps == [1, 2, 3, 4]
    percents = [e.percent for e in events]
    assert percents == sorted(percents)

    calls = []

    def cancel_after_two():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        t2v.generate(_req(seed=1, num_frames=5), should_cancel=cancel_after_two)
    assert len(calls) == 3


@pytest.mark.parametrize("steps,expect", [(1, ["high"]), (2, ["high", "high"]), (3, ["high", "high", "low"]),
                                          (4, ["high", "high", "low", "low"])])
def test_i2v_experts_switch_at_the_boundary(models_dir, steps, expect):
    pipe = _i2v(models_dir)
    img = Image.fromarray((np.random.default_rng(0).random((60, 100, 3)) * 255).astype(np.uint8))
    req = spec.resolve(spec.GenerationRequest(prompt="a dog", model="tiny-i2v", steps=steps, num_frames=5, seed=3))
    out = pipe.generate(req, image=img)
    assert out.info["experts"] == expect
    assert out.frames.shape == (5, 128, 224, 3)
    assert [k for k in out.timings if k.startswith("step_")] == [f"step_{i + 1}" for i in range(steps)]
    assert {"text_encode", "image_encode", "denoise", "vae_decode"} <= set(out.timings)


_I2V = {}


def _i2v(models_dir):
    if "pipe" not in _I2V:
        _I2V["pipe"] = load_pipeline("tiny-i2v", models_dir=models_dir, device="cpu")
    return _I2V["pipe"]


def test_i2v_adaptive_resolution_and_deterministic_ode(models_dir):
    pipe = _i2v(models_dir)
    img = Image.fromarray((np.random.default_rng(1).random((600, 1000, 3)) * 255).astype(np.uint8))
    req = spec.GenerationRequest(prompt="a dog", model="tiny-i2v", adaptive_resolution=True, num_frames=5,
                                 ode=True, seed=5, image_width=1000, image_height=600)
    resolved = spec.resolve(req)
    assert (resolved.width, resolved.height) == spec.adaptive_size(1000, 600, 224 * 128)
    a = pipe.generate(resolved, image=img)
    b = pipe.generate(resolved, image=img)
    assert a.frames.shape == (5, resolved.height, resolved.width, 3)
    assert np.array_equal(a.frames, b.frames)


def test_a_request_for_another_quantization_fails_clearly(t2v):
    """Regression: `quant` was accepted and silently ignored; a pipeline runs only the mode it was loaded with."""
    from turbodiffusion_core.errors import UnsupportedRequest

    with pytest.raises(UnsupportedRequest, match="quant=fp8"):
        t2v.generate(_req(seed=1, num_frames=5, steps=1, quant="fp8"))
    assert t2v.generate(_req(seed=1, num_frames=5, steps=1, quant="none")).frames.shape[0] == 5


def test_cli_refuses_i2v_without_image_before_loading_and_creates_the_output_folder(models_dir, tmp_path, capsys):
    """Regressions: an I2V model without --image failed only after loading the model, with a traceback; an
    --out in a folder that does not exist failed after the whole generation."""
    start = time.perf_counter()
    assert main(["generate", "--model", "tiny-i2v", "--prompt", "a dog", "--models-dir", str(tmp_path / "none")]) == 2
    assert "--image" in capsys.readouterr().err
    assert time.perf_counter() - start < 5 and not (tmp_path / "none").exists()  # nothing was loaded or written

    out = tmp_path / "new" / "folder" / "clip.mp4"
    assert main(["generate", "--model", "tiny-t2v", "--prompt", "a cat", "--num-frames", "5", "--steps", "1",
                 "--seed", "3", "--extras", "--out", str(out), "--models-dir", str(models_dir)]) == 0
    assert read_video_frames(out).shape == (5, 128, 224, 3)
    assert (out.parent / "clip_thumbnail.webp").exists() and (out.parent / "clip_spritesheet.jpg").exists()


def test_cli_extend_continues_a_video(models_dir, tmp_path, capsys):
    """`generate --extend clip.mp4` with the I2V model: the new file is the clip followed by the new frames."""
    first = tmp_path / "first.mp4"
    assert main(["generate", "--model", "tiny-t2v", "--prompt", "a kite", "--seed", "4", "--num-frames", "5",
                 "--size", "224x128", "--out", str(first), "--models-dir", str(models_dir)]) == 0
    longer = tmp_path / "longer.mp4"
    assert main(["generate", "--model", "tiny-i2v", "--extend", str(first), "--prompt", "the kite climbs",
                 "--num-frames", "5", "--steps", "2", "--out", str(longer), "--models-dir", str(models_dir)]) == 0
    frames, original = read_video_frames(longer), read_video_frames(first)
    assert frames.shape == (9, 128, 224, 3) and "(9 frames, 224x128" in capsys.readouterr().out
    assert_same_video(frames[:5], original, "re-encoded once more: close, not exact", max_mean=6.0)
    assert main(["generate", "--model", "tiny-t2v", "--extend", str(first), "--prompt", "x",
                 "--models-dir", str(models_dir)]) == 2
    assert "image-to-video" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-i2v", "--extend", str(first), "--size", "128x96", "--prompt", "x",
                 "--models-dir", str(models_dir)]) == 2
    assert "keeps that size" in capsys.readouterr().err
