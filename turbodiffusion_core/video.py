"""Turning decoded frames into the files the API serves: an H.264 MP4, a WebP thumbnail and a JPEG
spritesheet. numpy + PyAV + Pillow; torch is only imported inside `frames_to_uint8`.

The MP4 is what browsers and players expect without negotiation: H.264 (libx264) in yuv420p, 16 fps
(the rate Wan is trained at), the `moov` index moved to the front (faststart) so playback can start
while the file is still downloading, and BT.709 colour tags written both into the conversion and into
the stream so every player converts YUV back to RGB the same way.
"""

from __future__ import annotations

import queue
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from .spec import FPS

if TYPE_CHECKING:
    import torch

PathLike = Union[str, Path]

VARIANTS = ("video", "thumbnail", "spritesheet")
MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg"}
FILE_SUFFIXES = {"video": ".mp4", "thumbnail": "_thumbnail.webp", "spritesheet": "_spritesheet.jpg"}

_BT709 = 1  # value of BT.709 in FFmpeg's primaries / transfer / matrix enums (H.264 VUI codes)


def output_paths(out_dir: PathLike, stem: str = "video") -> dict[str, Path]:
    """Where `write_outputs` puts each variant: {"video": out_dir/video.mp4, ...}."""
    return {variant: Path(out_dir) / f"{stem}{suffix}" for variant, suffix in FILE_SUFFIXES.items()}


def frames_to_uint8(video: "torch.Tensor") -> np.ndarray:
    """[B,3,T,H,W] or [3,T,H,W] in [-1,1] (any float dtype, any device) -> uint8 [T,H,W,3] of the first
    sample. Rounds to nearest; the layout change and the cast run on the tensor's device, so only the
    uint8 frames cross to the host."""
    import torch

    x = video[0] if video.dim() == 5 else video
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"expected video [B,3,T,H,W] or [3,T,H,W]; got {list(video.shape)}")
    x = ((x.permute(1, 2, 3, 0).float() + 1.0) * 127.5).round_().clamp_(0, 255)
    return x.to(torch.uint8).contiguous().cpu().numpy()


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T,H,W,3]; got {frames.dtype} {list(frames.shape)}")
    return frames


class Yuv420Frames:
    """Frames already in the encoder's pixel format: uint8 [T, H*3/2, W], each frame its Y plane followed by
    its U and V planes (I420, BT.709, limited range), the layout `av.VideoFrame.from_ndarray(..., "yuv420p")`
    takes. The pipeline converts on the GPU (`pipeline._yuv420_planes`), so the encoder skips swscale's RGB
    conversion."""

    def __init__(self, planes: np.ndarray) -> None:
        if planes.dtype != np.uint8 or planes.ndim != 3 or planes.shape[1] % 6 or planes.shape[2] % 2:
            raise ValueError(f"expected uint8 I420 frames [T, H*3/2, W] with H and W even; got {planes.dtype} "
                             f"{list(planes.shape)}")
        self.planes = planes
        self.height, self.width = planes.shape[1] * 2 // 3, planes.shape[2]

    def __len__(self) -> int:
        return self.planes.shape[0]

    def __getitem__(self, index: slice) -> "Yuv420Frames":
        return Yuv420Frames(self.planes[index])


class Mp4Writer:
    """Streaming H.264 writer: `write` chunks of frames as they are decoded, then `close`.

    Usable as a context manager; if the block raises, the partial file is removed.
    `preset` trades encode time for size (veryfast encodes about twice as fast as medium for a
    similar size at crf 18 on our clips); `crf` 18 is visually lossless for this content. `x264_params`
    ("key=value:key=value", libx264's own option string) sets what the preset leaves, e.g. how many frames
    the encoder holds back (threads, lookahead), which is what `close` still has to encode when a
    streamed decode ends (bench/mp4_tail.py measures it).
    """

    def __init__(
        self, path: PathLike, width: int, height: int, fps: int = FPS, crf: int = 18, preset: str = "veryfast",
        x264_params: Optional[str] = None,
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even width and height; got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.frames_written = 0
        self._container = av.open(str(self.path), mode="w", format="mp4", options={"movflags": "+faststart"})
        options = {"crf": str(crf), "preset": preset}
        if x264_params:
            options["x264-params"] = x264_params
        stream = self._container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        ctx = stream.codec_context
        ctx.colorspace, ctx.color_primaries, ctx.color_trc = _BT709, _BT709, _BT709
        ctx.color_range = ColorRange.MPEG
        self._stream = stream
        self._closed = False

    def write(self, frames: Union[np.ndarray, Yuv420Frames]) -> None:
        """Encode uint8 RGB frames [T,H,W,3] (or one [H,W,3]), or `Yuv420Frames`, of the writer's size."""
        if isinstance(frames, Yuv420Frames):
            if (frames.height, frames.width) != (self.height, self.width):
                raise ValueError(f"frames are {frames.width}x{frames.height}, writer is {self.width}x{self.height}")
            for planes in frames.planes:
                self._encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(planes), format="yuv420p"))
            return
        frames = _check_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, writer is {self.width}x{self.height}")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            self._encode(frame)

    def _encode(self, frame: "av.VideoFrame") -> None:
        frame.pts = self.frames_written
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def close(self) -> Path:
        """Flush the encoder and finish the file (faststart rewrites the index to the front here)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.mux(self._stream.encode(None))
            finally:
                self._container.close()
        return self.path

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        finally:
            self.path.unlink(missing_ok=True)


class Mp4Thread:
    """An `Mp4Writer` on a background thread: `put` chunks of frames (RGB or `Yuv420Frames`) as they are
    decoded and the caller goes on; `finish()` flushes and closes the file (faststart) and returns its path,
    raising what encoding raised (the file removed); `abort()` removes it. `busy`: seconds spent encoding.
    The pipeline's thread writer, and the encoder inside the helper process (mp4_encoder.py)."""

    def __init__(self, path: PathLike, width: int, height: int, x264_params: Optional[str] = None):
        self.path = Path(path)
        self._writer = Mp4Writer(self.path, width, height, x264_params=x264_params)
        self._queue: queue.Queue = queue.Queue()
        self.error: Optional[BaseException] = None
        self.busy = 0.0
        self._thread = threading.Thread(target=self._run, name="mp4-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, str):  # "finish" or "abort"
                break
            if self.error is not None:
                continue
            start = time.perf_counter()
            try:
                self._writer.write(item)
            except BaseException as exc:  # reported by finish()
                self.error = exc
            self.busy += time.perf_counter() - start
        start = time.perf_counter()
        try:
            self._writer.close()
        except BaseException as exc:
            self.error = self.error or exc
        self.busy += time.perf_counter() - start

    def put(self, frames: Union[np.ndarray, Yuv420Frames]) -> None:
        self._queue.put(frames)

    def finish(self) -> Path:
        self._queue.put("finish")
        self._thread.join()
        if self.error is not None:
            self.path.unlink(missing_ok=True)
            raise self.error
        return self.path

    def abort(self) -> None:
        self._queue.put("abort")
        self._thread.join()
        self.path.unlink(missing_ok=True)


def write_mp4(frames: np.ndarray, path: PathLike, fps: int = FPS, crf: int = 18, preset: str = "veryfast") -> Path:
    """Whole clip uint8 [T,H,W,3] -> H.264 yuv420p MP4 (faststart)."""
    frames = _check_frames(frames)
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps=fps, crf=crf, preset=preset) as writer:
        writer.write(frames)
    return writer.path


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale (never upscale) so the longer side is at most max_side, keeping the aspect ratio."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


THUMBNAIL_MAX_SIDE = 512
SPRITESHEET_COLUMNS, SPRITESHEET_MAX_TILES, SPRITESHEET_TILE_MAX_SIDE = 4, 16, 256
PREVIEW_QUALITY = 85


def spritesheet_indices(num_frames: int, max_tiles: int) -> list[int]:
    """Evenly spaced frame indices, first and last included, at most max_tiles of them."""
    count = min(num_frames, max_tiles)
    return sorted({int(i) for i in np.linspace(0, num_frames - 1, count).round()})


class PreviewWriter:
    """The thumbnail and the spritesheet of a video of `num_frames` frames, made from frames as they arrive.

    `add(chunk, start)` takes frames start, start+1, ... of the video: the thumbnail (a WebP of the middle
    frame, more representative than frame 0, which I2V copies from its input) is written as soon as that
    frame comes, and the spritesheet's frames (evenly spaced, first and last included) are downscaled as
    they come; `finish()` lays the tiles out in a JPEG grid (row-major) and writes it. A streamed decode
    thus does the preview work while the GPU is still busy, leaving only the grid's JPEG for the end.
    A path left None skips that preview.
    """

    def __init__(
        self,
        num_frames: int,
        thumbnail: Optional[PathLike] = None,
        spritesheet: Optional[PathLike] = None,
        *,
        thumbnail_max_side: int = THUMBNAIL_MAX_SIDE,
        columns: int = SPRITESHEET_COLUMNS,
        max_tiles: int = SPRITESHEET_MAX_TILES,
        tile_max_side: int = SPRITESHEET_TILE_MAX_SIDE,
        quality: int = PREVIEW_QUALITY,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"a preview needs at least one frame; got {num_frames}")
        self.num_frames = num_frames
        self.thumbnail = None if thumbnail is None else Path(thumbnail)
        self.spritesheet = None if spritesheet is None else Path(spritesheet)
        self.thumbnail_max_side, self.tile_max_side = thumbnail_max_side, tile_max_side
        self.columns, self.quality = columns, quality
        self._thumbnail_index = num_frames // 2
        self._tile_indices = spritesheet_indices(num_frames, max_tiles) if spritesheet is not None else []
        self._tiles: dict[int, Image.Image] = {}
        self._thumbnail_done = thumbnail is None

    def add(self, frames: np.ndarray, start: int) -> None:
        """Frames [n,H,W,3] (uint8) that are frames start .. start+n-1 of the video."""
        frames = _check_frames(frames)
        stop = start + len(frames)
        if start < 0 or stop > self.num_frames:
            raise ValueError(f"frames {start}..{stop - 1} are outside a video of {self.num_frames} frames")
        if not self._thumbnail_done and start <= self._thumbnail_index < stop:
            image = _fit(Image.fromarray(frames[self._thumbnail_index - start]), self.thumbnail_max_side)
            image.save(self.thumbnail, format="WEBP", quality=self.quality)
            self._thumbnail_done = True
        for index in self._tile_indices:
            if start <= index < stop:
                self._tiles[index] = _fit(Image.fromarray(frames[index - start]), self.tile_max_side)

    def discard(self) -> None:
        """Remove what was already written (the generation failed or was cancelled)."""
        for path in (self.thumbnail, self.spritesheet):
            if path is not None:
                path.unlink(missing_ok=True)

    def finish(self) -> dict[str, Path]:
        """Write the spritesheet; {"thumbnail": path, "spritesheet": path} of what was asked for."""
        missing = [i for i in self._tile_indices if i not in self._tiles]
        if not self._thumbnail_done or missing:
            raise ValueError(f"preview frames never arrived (thumbnail frame {self._thumbnail_index} "
                             f"{'written' if self._thumbnail_done else 'missing'}, spritesheet frames missing: "
                             f"{missing})")
        written: dict[str, Path] = {}
        if self.thumbnail is not None:
            written["thumbnail"] = self.thumbnail
        if self.spritesheet is not None:
            tiles = [self._tiles[i] for i in self._tile_indices]
            columns = min(self.columns, len(tiles))
            rows = -(-len(tiles) // columns)
            tw, th = tiles[0].size
            sheet = Image.new("RGB", (columns * tw, rows * th))
            for n, tile in enumerate(tiles):
                sheet.paste(tile, ((n % columns) * tw, (n // columns) * th))
            sheet.save(self.spritesheet, format="JPEG", quality=self.quality)
            written["spritesheet"] = self.spritesheet
        return written


def write_thumbnail(frames: np.ndarray, path: PathLike, max_side: int = THUMBNAIL_MAX_SIDE,
                    quality: int = PREVIEW_QUALITY) -> Path:
    """WebP of the middle frame (`PreviewWriter` over the whole array)."""
    frames = _check_frames(frames)
    previews = PreviewWriter(len(frames), thumbnail=path, thumbnail_max_side=max_side, quality=quality)
    previews.add(frames, 0)
    return previews.finish()["thumbnail"]


def write_spritesheet(
    frames: np.ndarray,
    path: PathLike,
    columns: int = SPRITESHEET_COLUMNS,
    max_tiles: int = SPRITESHEET_MAX_TILES,
    tile_max_side: int = SPRITESHEET_TILE_MAX_SIDE,
    quality: int = PREVIEW_QUALITY,
) -> Path:
    """JPEG grid (row-major) of evenly spaced frames, each downscaled to at most tile_max_side: a
    scrubbing preview. With 81 frames and the defaults: 16 tiles in 4 rows of 4."""
    frames = _check_frames(frames)
    previews = PreviewWriter(len(frames), spritesheet=path, columns=columns, max_tiles=max_tiles,
                             tile_max_side=tile_max_side, quality=quality)
    previews.add(frames, 0)
    return previews.finish()["spritesheet"]


def write_outputs(frames: np.ndarray, out_dir: PathLike, stem: str = "video", fps: int = FPS) -> dict[str, Path]:
    """All three variants into out_dir (created if needed); returns {"video", "thumbnail", "spritesheet"}."""
    paths = output_paths(out_dir, stem)
    paths["video"].parent.mkdir(parents=True, exist_ok=True)
    write_mp4(frames, paths["video"], fps=fps)
    write_thumbnail(frames, paths["thumbnail"])
    write_spritesheet(frames, paths["spritesheet"])
    return paths


def read_video_frames(path: PathLike, limit: Optional[int] = None) -> np.ndarray:
    """Decode a video file to uint8 RGB [T,H,W,3] (the stream's own colour tags drive the conversion)."""
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path} has no video frames")
    return np.stack(out)
