"""Pipeline modes on the tiny presets (CPU): I2V expert residency (resident / swap), outputs written while
the VAE decodes, stage timings, text encoder placement, warm-up, torch.compile, in-memory construction,
and the worker's engine options."""

import numpy as np
import pytest
import torch
from PIL import Image

from turbodiffusion_core import spec
from turbodiffusion_core.errors import Cancelled, EngineError
from turbodiffusion_core.pipeline import VideoPipeline, choose_text_encoder, load_pipeline
from turbodiffusion_core.residency import choose_mode, units_of
from turbodiffusion_core.video import read_video_frames

from tests.conftest import assert_same_video

GIB = 2**30


@pytest.fixture(scope="module")
def i2v(models_dir):
    return load_pipeline("tiny-i2v", models_dir=models_dir, device="cpu", expert_residency="resident")


@pytest.fixture(scope="module")
def t2v(models_dir):
    return load_pipeline("tiny-t2v", models_dir=models_dir, device="cpu")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(0).random((60, 100, 3)) * 255).astype(np.uint8))


def _i2v_req(steps=4, **kw):
    return spec.resolve(spec.GenerationRequest(**{"prompt": "a dog on a beach", "model": "tiny-i2v", "steps": steps,
                                                  "num_frames": 5, "seed": 11, **kw}))


def _t2v_req(**kw):
    return spec.resolve(spec.GenerationRequest(**{"prompt": "a cat", "model": "tiny-t2v", "num_frames": 5,
                                                  "seed": 5, **kw}))


def _params_on_host_copy(pipe, name):
    """Whether every tensor of an expert currently points into its unit's host buffer."""
    units = pipe.residency.units[name]
    return all(u.state == "host" for u in units)


# --- expert residency ------------------------------------------------------------------------------
def test_choose_mode_from_free_memory():
    assert choose_mode("auto", experts=2, expert_bytes=14 * GIB, free_bytes=40 * GIB, reserve_bytes=16 * GIB)[0] == "resident"
    mode, why = choose_mode("auto", experts=2, expert_bytes=28 * GIB, free_bytes=40 * GIB, reserve_bytes=16 * GIB)
    assert mode == "swap" and "needed" in why
    assert choose_mode("auto", experts=1, expert_bytes=28 * GIB, free_bytes=0, reserve_bytes=0)[0] == "resident"
    assert choose_mode("auto", experts=2, expert_bytes=28 * GIB, free_bytes=None, reserve_bytes=0)[0] == "resident"
    assert choose_mode("swap", experts=2, expert_bytes=1, free_bytes=10**12, reserve_bytes=0) == ("swap", "configured")
    with pytest.raises(ValueError):
        choose_mode("both", experts=2, expert_bytes=1, free_bytes=1, reserve_bytes=0)


def test_swap_and_resident_give_identical_videos_and_expert_trace(i2v, image):
    req = _i2v_req()
    assert i2v.set_expert_residency("resident") == "resident"
    assert i2v.info()["expert_residency"] == "resident"
    ref = i2v.generate(req, image=image)
    assert ref.info["experts"] == ["high", "high", "low", "low"]

    assert i2v.set_expert_residency("swap") == "swap"
    info = i2v.info()
    assert info["expert_residency"] == "swap" and info["expert_residency_detail"]["on_device"] == ["high"]
    assert _params_on_host_copy(i2v, "low") and not _params_on_host_copy(i2v, "high")
    out = i2v.generate(req, image=image)
    assert out.info["experts"] == ref.info["experts"]
    assert np.array_equal(out.frames, ref.frames)
    # high -> low streamed under step 2, low -> high (home) under step 4: every unit of each copied once
    units = len(units_of(i2v.experts["low"]))
    assert units == len(i2v.experts["low"].blocks) + 1
    moved = out.info["expert_residency"]
    assert moved["switches"] == 2 and moved["units_copied"] == 2 * units and moved["sync_loads"] == 0
    assert i2v.residency.on_device("high") and not i2v.residency.on_device("low")

    # one and two steps never leave the high expert: nothing moves
    short = i2v.generate(_i2v_req(steps=2), image=image)
    assert short.info["experts"] == ["high", "high"] and short.info["expert_residency"]["units_copied"] == 0

    # and back to resident: every expert on the device, same video again
    assert i2v.set_expert_residency("resident") == "resident"
    assert np.array_equal(i2v.generate(req, image=image).frames, ref.frames)


def test_swap_recovers_from_cancel_and_from_a_failure_mid_switch(i2v, image):
    req = _i2v_req()
    i2v.set_expert_residency("resident")
    ref = i2v.generate(req, image=image).frames
    i2v.set_expert_residency("swap")

    checks = []

    def cancel_before_step_3():
        checks.append(1)
        return len(checks) == 3

    with pytest.raises(Cancelled):
        i2v.generate(req, image=image, should_cancel=cancel_before_step_3)
    assert i2v.residency.on_device("low") and not i2v.residency.on_device("high")  # left where step 2 put it
    again = i2v.generate(req, image=image)
    assert again.info["expert_residency"]["sync_loads"] == 1  # high brought back before step 1
    assert np.array_equal(again.frames, ref)

    # TEST fault: block 1 of the high expert raises during step 2, the step that streams the low expert in
    calls = []

    def fail_second_time(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("TEST: simulated failure inside a DiT block")

    handle = i2v.experts["high"].blocks[1].register_forward_hook(fail_second_time)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            i2v.generate(req, image=image)
    finally:
        handle.remove()
    states = {name: [u.state for u in units] for name, units in i2v.residency.units.items()}
    assert "host" in states["high"] and "device" in states["low"]  # half-switched: block 0 had moved
    assert not i2v.experts["high"].blocks[0]._forward_hooks  # no hook of the residency left behind
    assert np.array_equal(i2v.generate(req, image=image).frames, ref)
    assert i2v.residency.on_device("high")
    i2v.set_expert_residency("resident")


# --- outputs while decoding, stage timings -----------------------------------------------------------
def test_outputs_written_during_decode_match_the_frames(t2v, tmp_path):
    req = _t2v_req()
    plain = t2v.generate(req)
    events = []
    out = t2v.generate(req, on_progress=events.append, output_dir=tmp_path / "o", stem="video.1")
    assert np.array_equal(out.frames, plain.frames)
    assert set(out.files) == {"video", "thumbnail", "spritesheet"}
    assert out.files["video"].name == "video.1.mp4" and all(p.exists() for p in out.files.values())
    decoded = read_video_frames(out.files["video"])
    assert decoded.shape == out.frames.shape
    assert np.abs(decoded.astype(int) - out.frames.astype(int)).mean() < 12  # H.264 crf 18: close, not exact
    for key in ("text_encode", "denoise", "step_1", "step_2", "step_3", "step_4", "vae_decode", "encode_video",
                "encode_video_busy", "store"):
        assert key in out.timings and out.timings[key] >= 0, key
    assert "encode_video" not in plain.timings and not plain.files
    assert sum(out.timings[f"step_{i}"] for i in range(1, 5)) <= out.timings["denoise"] + 1e-3
    stages = [e.stage for e in events]
    assert stages.index("vae_decode") < stages.index("encode_video") < stages.index("store")
    assert [e.percent for e in events] == sorted(e.percent for e in events)

    only_video = t2v.generate(req, output_dir=tmp_path / "v", variants=("video",))
    assert set(only_video.files) == {"video"} and sorted(p.name for p in (tmp_path / "v").iterdir()) == ["video.mp4"]


def test_prefix_frames_make_an_extension(i2v, tmp_path):
    """An extension: the I2V output without its first frame (the repeated image) appended to the prefix, in
    the returned frames and in the MP4 written during decode; a prefix of another size is refused."""
    req = _i2v_req(steps=2, size="224x128")
    prefix = (np.random.default_rng(3).random((7, 128, 224, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(prefix[-1])
    plain = i2v.generate(req, image=image)
    out = i2v.generate(req, image=image, output_dir=tmp_path / "x", prefix_frames=prefix)
    assert out.num_frames == 7 + 5 - 1 and out.frames.shape == (11, 128, 224, 3)
    assert np.array_equal(out.frames[:7], prefix) and np.array_equal(out.frames[7:], plain.frames[1:])
    assert read_video_frames(out.files["video"]).shape == out.frames.shape
    with pytest.raises(EngineError, match="expected uint8"):
        i2v.generate(req, image=image, prefix_frames=prefix[:, :64])


def test_mp4_helper_process_and_thread_write_the_same_video(t2v, tmp_path):
    """The default writes the MP4 on a thread of the worker; TD_MP4_ENCODER=process on a helper process; both
    from the I420 frames the pipeline converts itself: the same frames, the same video, previews included."""
    assert t2v.mp4_encoder == "thread" and t2v.info()["mp4_encoder"] == "thread"
    by_thread = t2v.generate(_t2v_req(num_frames=9), output_dir=tmp_path / "t")
    assert t2v._encoder_process is None  # no helper started unless asked for
    t2v.mp4_encoder = "process"
    try:
        by_process = t2v.generate(_t2v_req(num_frames=9), output_dir=tmp_path / "p")
        assert t2v._encoder_process is not None and t2v._encoder_process.alive
    finally:
        t2v.mp4_encoder = "thread"
    assert np.array_equal(by_process.frames, by_thread.frames)
    assert_same_video(read_video_frames(by_process.files["video"]), read_video_frames(by_thread.files["video"]))
    assert set(by_process.files) == set(by_thread.files) == {"video", "thumbnail", "spritesheet"}
    assert by_process.files["thumbnail"].read_bytes() == by_thread.files["thumbnail"].read_bytes()
    with pytest.raises(ValueError, match="mp4_encoder must be one of process, thread"):
        VideoPipeline(t2v.preset, text_encoder=t2v.text_encoder, vae=t2v.vae, experts=t2v.experts,
                      device=t2v.device, dtype=t2v.dtype, mp4_encoder="gpu")


def test_cancel_during_decode_leaves_no_partial_files(t2v, tmp_path):
    def cancel_in_decode(event):
        if event.stage == "vae_decode" and event.fraction > 0:
            raise Cancelled("TEST: stop during VAE decode")

    folder = tmp_path / "out"
    with pytest.raises(Cancelled):
        t2v.generate(_t2v_req(), on_progress=cancel_in_decode, output_dir=folder)
    assert folder.exists() and list(folder.iterdir()) == []

    # late in the decode the thumbnail (the middle frame, 4 of 9) has already been written from the frames
    # landed so far (each chunk lands while the next decodes): a cancel then removes it as well
    def cancel_late_in_decode(event):
        if event.stage == "vae_decode" and event.fraction >= 0.99:
            assert any(folder.glob("*_thumbnail.webp")), "the thumbnail is written during the decode"
            raise Cancelled("TEST: stop at the end of the VAE decode")

    with pytest.raises(Cancelled):
        t2v.generate(_t2v_req(num_frames=9), on_progress=cancel_late_in_decode, output_dir=folder)
    assert list(folder.iterdir()) == []

    # the MP4 writer opens before the model runs (an extension's prefix encodes meanwhile): a cancel between
    # steps must remove its file too
    steps = []
    with pytest.raises(Cancelled):
        t2v.generate(_t2v_req(), on_progress=lambda e: steps.append(e.step), output_dir=folder,
                     should_cancel=lambda: len(steps) > 3)
    assert list(folder.iterdir()) == []


# --- text encoder, warm-up, compile, in-memory construction ------------------------------------------
def test_text_encoder_placement_choice():
    cuda = torch.device("cuda")
    enc = 11 * GIB
    assert choose_text_encoder("auto", cuda, encoder_bytes=enc, free_bytes=40 * GIB, reserve_bytes=8 * GIB)[0] == "gpu"
    assert choose_text_encoder("auto", cuda, encoder_bytes=enc, free_bytes=16 * GIB, reserve_bytes=8 * GIB)[0] == "cpu"
    assert choose_text_encoder("cpu", cuda, encoder_bytes=enc, free_bytes=80 * GIB, reserve_bytes=0)[0] == "cpu"
    assert choose_text_encoder("gpu", torch.device("cpu"), encoder_bytes=enc, free_bytes=None,
                               reserve_bytes=0)[0] == "cpu"
    with pytest.raises(ValueError):
        choose_text_encoder("tpu", cuda, encoder_bytes=enc, free_bytes=None, reserve_bytes=0)


def test_prompt_cache_and_cpu_text_encoder(models_dir):
    pipe = load_pipeline("tiny-t2v", models_dir=models_dir, device="cpu", text_encoder="cpu")
    assert pipe.info()["text_encoder"] == "cpu"
    first = pipe.generate(_t2v_req(num_frames=1, steps=1))
    second = pipe.generate(_t2v_req(num_frames=1, steps=1))
    cache = pipe.info()["prompt_cache"]
    assert cache["hits"] >= 1 and cache["currsize"] == 1
    assert second.timings["text_encode"] < first.timings["text_encode"]
    with pytest.raises(ValueError):
        load_pipeline("tiny-t2v", models_dir=models_dir, device="cpu", text_encoder="disk")


def test_warmup_runs_a_short_generation_and_is_reported(i2v):
    req, image = i2v.warmup_request()
    assert (req.width, req.height, req.num_frames) == (224, 128, 17) and req.steps == 4 and image is not None
    timings = i2v.warmup()
    assert {"denoise", "vae_decode", "encode_video"} <= set(timings)
    assert i2v.info()["warmup_seconds"] > 0


def test_in_memory_pipeline_and_compiled_dit(t2v):
    """The constructor path benchmarks use (modules built in memory), here with torch.compile on
    (aot_eager: dynamo traces the whole DiT forward, without the minute of C++ codegen inductor takes)."""
    req = _t2v_req(num_frames=1, steps=2, size="128x96")
    ref = t2v.generate(req)
    twin = VideoPipeline.from_modules("tiny-t2v", text_encoder=t2v.text_encoder, vae=t2v.vae,
                                      experts=t2v.experts, device=torch.device("cpu"), dtype=torch.float32,
                                      compile_dit="aot_eager")
    assert twin.info()["compile"] == "aot_eager" and twin._forward["dit"] is not t2v.experts["dit"]
    out = twin.generate(req)
    assert np.array_equal(out.frames, ref.frames)


# --- the worker's options ------------------------------------------------------------------------------
def test_worker_engine_options_from_env_and_warmup_at_load(models_dir):
    from worker.residency import EngineOptions, Residency

    default = EngineOptions.from_env({})
    assert default.expert_residency == "auto" and not default.should_warm_up("cpu") and default.should_warm_up("cuda")
    assert default.compile_arg is False
    opts = EngineOptions.from_env({"TD_EXPERT_RESIDENCY": "swap", "TD_TEXT_ENCODER": "cpu", "TD_WARMUP": "1",
                                   "TD_COMPILE": "aot_eager", "TD_RESERVE_GB": "2"})
    assert opts.compile_arg == "aot_eager" and opts.reserve_gb == 2.0 and opts.should_warm_up("cpu")
    assert EngineOptions.from_env({"TD_WARMUP": "0"}).should_warm_up("cuda") is False
    with pytest.raises(ValueError, match="TD_EXPERT_RESIDENCY"):
        EngineOptions.from_env({"TD_EXPERT_RESIDENCY": "sometimes"})
    assert default.decode_args == {"vae_chunk_frames": 1, "cudnn_benchmark": False, "mp4_encoder": "thread",
                                   "cuda_graphs": True}
    decode = EngineOptions.from_env({"TD_VAE_CHUNK_FRAMES": " 3 ", "TD_CUDNN_BENCHMARK": "on",
                                     "TD_MP4_ENCODER": "Process", "TD_CUDA_GRAPHS": "0"}).decode_args
    assert decode == {"vae_chunk_frames": 3, "cudnn_benchmark": True, "mp4_encoder": "process", "cuda_graphs": False}
    with pytest.raises(ValueError, match="TD_CUDA_GRAPHS"):
        EngineOptions.from_env({"TD_CUDA_GRAPHS": "always"})
    with pytest.raises(ValueError, match="TD_MP4_ENCODER"):
        EngineOptions.from_env({"TD_MP4_ENCODER": "gpu"})
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="TD_VAE_CHUNK_FRAMES"):
            EngineOptions.from_env({"TD_VAE_CHUNK_FRAMES": bad})
    with pytest.raises(ValueError, match="TD_CUDNN_BENCHMARK"):
        EngineOptions.from_env({"TD_CUDNN_BENCHMARK": "sometimes"})

    residency = Residency.load(["tiny-i2v"], models_dir=models_dir, device="cpu",
                               options=EngineOptions(expert_residency="swap", warmup="1", vae_chunk_frames="3"))
    assert residency.get("tiny-i2v").vae.decode_chunk_frames == 3  # the option reaches the loaded VAE
    info = residency.describe()["tiny-i2v"]
    assert info["expert_residency"] == "swap" and info["warmup_seconds"] > 0
    assert info["mp4_encoder"] == "thread" and info["cuda_graphs"] == "off"  # graphs: GPU only
    assert info["expert_residency_detail"]["switches"] == 2  # the warm-up ran both experts


def test_worker_job_timings_show_the_stage_profile_and_models_show_the_expert_mode(client, start_worker):
    from tests.conftest import FAST, wait_status

    start_worker()
    start_worker("tiny-i2v")
    created = client.post("/v1/videos", json=dict(FAST, prompt="a paper boat on a river", steps=2)).json()
    video = wait_status(client, created["id"])
    assert video["status"] == "completed", video
    assert {"text_encode", "step_1", "step_2", "denoise", "vae_decode", "encode_video", "store", "queue_wait",
            "total"} <= set(video["timings"])
    assert "step_3" not in video["timings"]
    assert client.get(f"/v1/videos/{video['id']}/content").status_code == 200

    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    i2v_worker = cards["tiny-i2v"]["workers"][0]
    assert i2v_worker["expert_residency"] in ("resident", "swap") and i2v_worker["text_encoder"] == "cpu"
    assert "expert_residency" not in cards["tiny-t2v"]["workers"][0]
