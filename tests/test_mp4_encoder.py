"""The MP4 helper process (turbodiffusion_core/mp4_encoder.py): a real child process, real MP4s decoded back."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

from turbodiffusion_core.errors import EngineError
from turbodiffusion_core.mp4_encoder import EncoderProcess
from turbodiffusion_core.video import read_video_frames, write_mp4

from tests.conftest import assert_same_video

T, H, W = 13, 64, 96


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        out[t, ..., 0] = (xx * 2 + 9 * t) % 256
        out[t, ..., 1] = (yy * 3 + 5 * t) % 256
        out[t, ..., 2] = 128
    return out


@pytest.fixture()
def helper():
    encoder = EncoderProcess()
    yield encoder
    encoder.close()
    assert not encoder.alive


def stream_chunks(stream, frames: np.ndarray) -> None:
    stream.put(frames[:1])
    for start in range(1, len(frames), 4):
        stream.put(frames[start:start + 4])


def test_helper_writes_the_same_video_as_the_in_process_writer(helper, frames, tmp_path):
    stream = helper.stream(tmp_path / "a.mp4", W, H)
    stream_chunks(stream, frames)
    assert stream.finish() == tmp_path / "a.mp4" and stream.busy > 0
    back = read_video_frames(tmp_path / "a.mp4")
    assert back.shape == frames.shape
    assert_same_video(back, read_video_frames(write_mp4(frames, tmp_path / "ref.mp4")), "helper vs in-process")

    # the same helper process serves the next video (and a non-contiguous chunk is fine)
    pid = helper._proc.pid
    second = helper.stream(tmp_path / "b.mp4", W, H)
    second.put(frames[:, :, :, :][::-1].copy()[::-1])
    second.finish()
    assert helper._proc.pid == pid and read_video_frames(tmp_path / "b.mp4").shape == frames.shape


def test_helper_takes_i420_frames_as_the_thread_writer_does(helper, frames, tmp_path):
    """I420 chunks (what the pipeline sends, converted on the GPU) over the pipe, mixed with an RGB one: the same
    video as the in-process writer makes from the same chunks."""
    import torch

    from turbodiffusion_core.pipeline import _yuv420_planes
    from turbodiffusion_core.video import Mp4Writer, Yuv420Frames

    yuv = Yuv420Frames(_yuv420_planes(torch.from_numpy(frames)).numpy())
    stream = helper.stream(tmp_path / "yuv.mp4", W, H)
    stream.put(frames[:1])  # RGB (an extension's prefix frames)
    stream.put(yuv[1:7])
    stream.put(yuv[7:])
    stream.finish()
    with Mp4Writer(tmp_path / "ref.mp4", W, H) as ref:
        ref.write(frames[:1])
        ref.write(yuv[1:])
    assert_same_video(read_video_frames(tmp_path / "yuv.mp4"), read_video_frames(ref.path), "helper vs in-process")


def test_abort_removes_the_file_and_one_video_at_a_time(helper, frames, tmp_path):
    stream = helper.stream(tmp_path / "x.mp4", W, H)
    with pytest.raises(EngineError, match="already writing"):
        helper.stream(tmp_path / "y.mp4", W, H)
    stream.put(frames[:5])
    stream.abort()
    assert not (tmp_path / "x.mp4").exists()
    again = helper.stream(tmp_path / "y.mp4", W, H)
    stream_chunks(again, frames)
    again.finish()
    assert read_video_frames(tmp_path / "y.mp4").shape == frames.shape


def test_an_encoding_error_is_reported_with_its_cause(helper, frames, tmp_path):
    stream = helper.stream(tmp_path / "odd.mp4", W + 1, H)  # yuv420p needs even sizes
    stream.put(frames[:2])
    with pytest.raises(EngineError, match="even width"):
        stream.finish()
    assert not (tmp_path / "odd.mp4").exists()
    ok = helper.stream(tmp_path / "ok.mp4", W, H)
    stream_chunks(ok, frames)
    ok.finish()  # the helper goes on after a failed video


def test_a_helper_that_dies_fails_its_video_clearly_and_restarts(helper, frames, tmp_path):
    stream = helper.stream(tmp_path / "dead.mp4", W, H)
    stream.put(frames[:5])
    dead_pid = helper._proc.pid
    os.kill(dead_pid, signal.SIGKILL)
    helper._proc.wait()
    stream.put(frames[5:])  # a write to the dead helper is reported by finish, not raised here
    with pytest.raises(EngineError, match="MP4 encoder process"):
        stream.finish()
    assert not (tmp_path / "dead.mp4").exists()
    fresh = helper.stream(tmp_path / "fresh.mp4", W, H)
    assert helper._proc.pid != dead_pid
    stream_chunks(fresh, frames)
    fresh.finish()
    assert read_video_frames(tmp_path / "fresh.mp4").shape == frames.shape


def test_a_helper_that_cannot_start_is_a_clear_engine_error(monkeypatch, tmp_path):
    encoder = EncoderProcess()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(EngineError, match="could not start the MP4 encoder process.*TD_MP4_ENCODER=thread"):
        encoder.stream(tmp_path / "v.mp4", W, H)
    monkeypatch.undo()
    stream = encoder.stream(tmp_path / "v.mp4", W, H)  # nothing stuck: the next video starts it
    stream.abort()
    encoder.close()
