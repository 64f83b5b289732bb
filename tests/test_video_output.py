"""MP4 / thumbnail / spritesheet files, checked by decoding them back with PyAV and Pillow."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from turbodiffusion_core.video import (
    MEDIA_TYPES,
    Mp4Writer,
    frames_to_uint8,
    read_video_frames,
    spritesheet_indices,
    write_mp4,
    write_outputs,
    PreviewWriter,
    write_spritesheet,
    write_thumbnail,
)

from tests.conftest import assert_same_video

T, H, W = 17, 96, 160


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """A smooth colour gradient that moves a few pixels per frame (like real video, unlike noise)."""
    t = np.arange(T, dtype=np.float32)[:, None, None]
    y = np.arange(H, dtype=np.float32)[None, :, None]
    x = np.arange(W, dtype=np.float32)[None, None, :]
    r = 128 + 100 * np.sin((x + 3 * t) / 25)
    g = 128 + 100 * np.cos((y - 2 * t) / 20)
    b = 40 + (x + y + 4 * t) / 2
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).clip(0, 255).astype(np.uint8)


def top_level_boxes(data: bytes) -> list[str]:
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        boxes.append(data[pos + 4:pos + 8].decode("latin-1"))
        if size < 8:
            break
        pos += size
    return boxes


def test_mp4_roundtrip(frames, tmp_path):
    path = write_mp4(frames, tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.format.name == "yuv420p"
        assert stream.average_rate == 16
        assert (stream.codec_context.width, stream.codec_context.height) == (W, H)
        assert int(stream.codec_context.colorspace) == 1  # BT.709 tagged
    back = read_video_frames(path)
    assert back.shape == (T, H, W, 3) and back.dtype == np.uint8
    err = np.abs(back.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 2.0
    # frame order survives: each decoded frame is closest to its own source frame
    assert np.abs(back[8].astype(np.int16) - frames[8]).mean() < np.abs(back[8].astype(np.int16) - frames[12]).mean()


def test_mp4_is_faststart(frames, tmp_path):
    boxes = top_level_boxes(write_mp4(frames, tmp_path / "fs.mp4").read_bytes())
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat")


def test_streaming_writer_matches_whole_clip(frames, tmp_path):
    with Mp4Writer(tmp_path / "stream.mp4", W, H) as writer:
        writer.write(frames[:1])
        for start in range(1, T, 4):
            writer.write(frames[start:start + 4])
    assert writer.frames_written == T
    streamed = read_video_frames(writer.path)
    whole = read_video_frames(write_mp4(frames, tmp_path / "whole.mp4"))
    assert streamed.shape == (T, H, W, 3)
    assert_same_video(streamed, whole, "streamed vs whole clip")


def test_streaming_writer_removes_partial_file_on_error(frames, tmp_path):
    path = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError):
        with Mp4Writer(path, W, H) as writer:
            writer.write(frames[:3])
            raise RuntimeError("decoder failed")
    assert not path.exists()


def test_writer_rejects_bad_frames(frames, tmp_path):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "odd.mp4", 161, 96)
    with Mp4Writer(tmp_path / "w.mp4", W, H) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(frames.astype(np.float32))
        with pytest.raises(ValueError, match="writer is"):
            writer.write(frames[:, :64])
        writer.write(frames[:2])


def test_thumbnail_is_middle_frame_webp(frames, tmp_path):
    path = write_thumbnail(frames, tmp_path / "t.webp")
    assert path.read_bytes()[:4] == b"RIFF" and path.read_bytes()[8:12] == b"WEBP"
    with Image.open(path) as img:
        assert img.format == "WEBP" and img.size == (W, H)  # small clips keep their size
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels - frames[T // 2]).mean() < np.abs(pixels - frames[0]).mean()


def test_thumbnail_downscales_large_frames(tmp_path):
    big = np.full((3, 480, 832, 3), 90, dtype=np.uint8)
    with Image.open(write_thumbnail(big, tmp_path / "big.webp")) as img:
        assert img.size == (512, 295)


def test_spritesheet_grid(frames, tmp_path):
    path = write_spritesheet(frames, tmp_path / "s.jpg", columns=3, max_tiles=6, tile_max_side=80)
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    with Image.open(path) as img:
        assert img.format == "JPEG"
        assert img.size == (3 * 80, 2 * 48)  # tiles 160x96 -> 80x48, 6 tiles in 2 rows of 3
        sheet = np.asarray(img.convert("RGB"), dtype=np.int16)
    # the last tile is the last frame
    last = np.asarray(Image.fromarray(frames[-1]).resize((80, 48)), dtype=np.int16)
    assert np.abs(sheet[48:, 160:] - last).mean() < 6


def test_previews_built_chunk_by_chunk_equal_the_whole_video_ones(frames, tmp_path):
    """What a streamed decode does: frames arrive 1, then 4 at a time; the thumbnail and spritesheet files are
    the same bytes as those made from the whole array at the end."""
    whole_thumb = write_thumbnail(frames, tmp_path / "whole.webp")
    whole_sheet = write_spritesheet(frames, tmp_path / "whole.jpg")
    previews = PreviewWriter(len(frames), tmp_path / "t.webp", tmp_path / "s.jpg")
    starts = [0] + list(range(1, len(frames), 4))
    for start, stop in zip(starts, starts[1:] + [len(frames)]):
        previews.add(frames[start:stop], start)
        assert (tmp_path / "t.webp").exists() == (stop > len(frames) // 2)  # written once its frame came
    assert previews.finish() == {"thumbnail": tmp_path / "t.webp", "spritesheet": tmp_path / "s.jpg"}
    assert (tmp_path / "t.webp").read_bytes() == whole_thumb.read_bytes()
    assert (tmp_path / "s.jpg").read_bytes() == whole_sheet.read_bytes()
    previews.discard()
    assert not (tmp_path / "t.webp").exists() and not (tmp_path / "s.jpg").exists()


def test_previews_name_frames_that_never_came(frames, tmp_path):
    previews = PreviewWriter(len(frames), None, tmp_path / "s.jpg")
    previews.add(frames[:3], 0)
    with pytest.raises(ValueError, match="spritesheet frames missing"):
        previews.finish()
    with pytest.raises(ValueError, match="outside a video"):
        previews.add(frames[:3], len(frames) - 1)
    with pytest.raises(ValueError, match="at least one frame"):
        PreviewWriter(0, tmp_path / "t.webp")


def test_spritesheet_indices_are_even_and_bounded():
    assert spritesheet_indices(81, 16)[0] == 0 and spritesheet_indices(81, 16)[-1] == 80
    assert len(spritesheet_indices(81, 16)) == 16
    assert spritesheet_indices(3, 16) == [0, 1, 2]


def test_write_outputs(frames, tmp_path):
    paths = write_outputs(frames, tmp_path / "job1")
    assert set(paths) == set(MEDIA_TYPES) == {"video", "thumbnail", "spritesheet"}
    assert paths["video"].suffix == ".mp4" and paths["thumbnail"].suffix == ".webp"
    assert paths["spritesheet"].suffix == ".jpg"
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert len(read_video_frames(paths["video"])) == T


def test_frames_to_uint8():
    video = torch.linspace(-1, 1, 3 * 2 * 4 * 6).view(1, 3, 2, 4, 6).to(torch.bfloat16)
    out = frames_to_uint8(video)
    assert out.shape == (2, 4, 6, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out[0, 0, 0, 0] == 0 and out[-1, -1, -1, -1] == 255
    expected = ((video[0].float().permute(1, 2, 3, 0) + 1) * 127.5).round().numpy()
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    np.testing.assert_array_equal(frames_to_uint8(video[0]), out)


def test_vae_chunks_stream_into_mp4(tmp_path):
    """decode_iter -> frames_to_uint8 -> Mp4Writer, chunk by chunk: the path that lets MP4 encoding
    overlap the VAE decode."""
    from turbodiffusion_core.models.vae import VAE_CONFIGS, WanVAE

    torch.manual_seed(0)
    vae = WanVAE(VAE_CONFIGS["tiny"]).eval()
    latent = torch.randn(1, 16, 3, 4, 6)
    with Mp4Writer(tmp_path / "vae.mp4", 48, 32) as writer:
        for chunk in vae.decode_iter(latent):
            writer.write(frames_to_uint8(chunk))
    back = read_video_frames(writer.path)
    assert back.shape == (9, 32, 48, 3)
    # identical to encoding the whole decoded clip at once (random weights give pixel noise, which
    # H.264 does not keep, so compare against the same encoder rather than the raw frames)
    whole = write_mp4(frames_to_uint8(vae.decode(latent)), tmp_path / "whole.mp4")
    assert_same_video(back, read_video_frames(whole), "VAE chunks streamed vs whole clip")


def test_gpu_side_yuv_conversion_matches_swscale_and_encodes_as_well(tmp_path):
    """pipeline._yuv420_planes (run where the frames are, the GPU in a worker) gives the I420 planes swscale
    makes from the same RGB frames within one level of luma and two of chroma (BT.709, limited range; swscale
    rounds in fixed point); Mp4Writer encodes them to a
    video as close to the frames as its own RGB path."""
    from av.video.reformatter import ColorRange, Colorspace

    from turbodiffusion_core.pipeline import _yuv420_planes
    from turbodiffusion_core.video import Yuv420Frames

    rng = np.random.default_rng(4)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (w + h)], -1)
    frames = np.stack([np.clip(base + 6 * i + rng.normal(0, 3, base.shape), 0, 255) for i in range(7)]).astype(np.uint8)
    planes = _yuv420_planes(torch.from_numpy(frames)).numpy()
    assert planes.shape == (7, h * 3 // 2, w) and planes.dtype == np.uint8
    for ours, rgb in zip(planes, frames):
        theirs = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG).to_ndarray()
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff[:h].max() <= 1 and diff[:h].mean() < 0.05, (diff[:h].max(), diff[:h].mean())  # Y
        assert diff[h:].max() <= 2 and diff[h:].mean() < 0.5, (diff[h:].max(), diff[h:].mean())  # U, V
    with Mp4Writer(tmp_path / "rgb.mp4", w, h) as rgb_writer:
        rgb_writer.write(frames)
    with Mp4Writer(tmp_path / "yuv.mp4", w, h) as yuv_writer:
        yuv_writer.write(Yuv420Frames(planes[:3]))
        yuv_writer.write(Yuv420Frames(planes)[3:])
    err = {name: np.abs(read_video_frames(wr.path).astype(float) - frames).mean()
           for name, wr in (("rgb", rgb_writer), ("yuv", yuv_writer))}
    assert err["yuv"] <= err["rgb"] * 1.05 + 0.2 and err["yuv"] < 5, err
    with pytest.raises(ValueError, match="I420"):
        Yuv420Frames(np.zeros((2, 10, 8), np.uint8))  # 10 rows: not H*3/2 of an even H
    odd = Mp4Writer(tmp_path / "x.mp4", w, h)
    with pytest.raises(ValueError, match="writer is 64x48"):
        odd.write(Yuv420Frames(np.zeros((1, 36, 32), np.uint8)))
    odd.close()
