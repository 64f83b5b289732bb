"""How long the MP4 still takes after the last decoded frames arrive (the request's `encode_video` stage), per
libx264 option set and encoder placement, on this machine's CPUs.

The pipeline streams decoded chunks (1 frame, then 4 at a time) to an encoder thread while the VAE goes on;
when the decode ends, the encoder still holds the frames its frame threads and lookahead keep back, and
`finish()` has to encode them all. This feeds synthetic 480p frames (moving gradients over fixed texture, so
the encoder has real work) at the VAE's pace and times that tail, the encoder's total busy time and the file
size, for each `x264-params` string, with the encoder on a thread of this process or on the helper process, fed RGB
frames (`thread`, `process`) or the I420 frames the pipeline converts on the GPU (`thread-yuv`, `process-yuv`,
converted here beforehand) (`--encoders`), and the main thread idle between chunks or running Python (`--main busy`: what the loop that
drives the GPU does, which holds the GIL). CPU only; run it on the GPU machine to get that machine's CPUs.

    python bench/mp4_tail.py --out bench/results/mp4_tail.json
    python bench/mp4_tail.py --pace-ms 40 --params "" "threads=8" "sliced-threads=1"
    python bench/mp4_tail.py --params "" --encoders thread,process --main idle,busy
    python bench/mp4_tail.py --params "" --encoders thread,thread-yuv --main busy --pace-ms 37
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turbodiffusion_core.mp4_encoder import EncoderProcess  # noqa: E402
from turbodiffusion_core.pipeline import _yuv420_planes  # noqa: E402
from turbodiffusion_core.video import Mp4Thread, Yuv420Frames  # noqa: E402

ENCODERS = ("thread", "thread-yuv", "process", "process-yuv")

DEFAULT_PARAMS = ["", "rc-lookahead=4:sync-lookahead=0", "threads=8", "threads=8:rc-lookahead=4:sync-lookahead=0",
                  "sliced-threads=1", "sliced-threads=1:rc-lookahead=4:sync-lookahead=0"]


def synthetic_frames(frames: int, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.random.default_rng(0).integers(0, 24, (height, width, 3)).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0] = 120 + 90 * np.sin((xx + 3 * t) / 40.0)
        out[t, ..., 1] = 120 + 90 * np.cos((yy - 2 * t) / 30.0)
        out[t, ..., 2] = (xx + yy + 5 * t) % 200
        out[t] = np.clip(out[t] + texture, 0, 255)
    return out


def one_run(frames, params: str, pace_s: float, folder: Path, helper: Optional[EncoderProcess] = None,
            busy: bool = False) -> dict:
    """frames: uint8 RGB [T,H,W,3] or Yuv420Frames."""
    path = folder / "tail.mp4"
    height, width = (frames.height, frames.width) if isinstance(frames, Yuv420Frames) else frames.shape[1:3]
    if helper is None:
        mp4 = Mp4Thread(path, width, height, x264_params=params or None)
    else:
        mp4 = helper.stream(path, width, height, x264_params=params or None)
    chunks = [frames[:1]] + [frames[i:i + 4] for i in range(1, len(frames), 4)]
    start = time.perf_counter()
    for chunk in chunks:  # a decoder that hands over a chunk every pace_s
        due = time.perf_counter() + pace_s
        mp4.put(chunk)
        if busy:  # Python work holding the GIL, as a GPU-driving loop does
            while time.perf_counter() < due:
                sum(range(200))
        else:
            time.sleep(max(0.0, due - time.perf_counter()))
    last = time.perf_counter()
    mp4.finish()
    end = time.perf_counter()
    return {"tail_s": end - last, "total_s": end - start, "busy_s": mp4.busy, "bytes": path.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--params", nargs="*", default=DEFAULT_PARAMS, help="x264-params strings ('' = preset only)")
    ap.add_argument("--pace-ms", type=float, default=40.0,
                    help="ms between decoded chunks (about the 480p VAE's pace on an H100: 0.85 s / 21)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x480", help="WIDTHxHEIGHT")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--encoders", default="thread", help="comma-separated: " + ", ".join(ENCODERS))
    ap.add_argument("--main", default="idle", help="comma-separated: idle, busy (the main thread between chunks)")
    args = ap.parse_args()

    width, height = (int(v) for v in args.size.split("x"))
    frames = synthetic_frames(args.frames, height, width)
    for encoder in args.encoders.split(","):
        if encoder not in ENCODERS:
            ap.error(f"unknown encoder {encoder!r} (one of {', '.join(ENCODERS)})")
    yuv = None
    if any(e.endswith("-yuv") for e in args.encoders.split(",")):
        import torch

        yuv = Yuv420Frames(_yuv420_planes(torch.from_numpy(frames)).numpy())
    rows = []
    helper = EncoderProcess() if any(e.startswith("process") for e in args.encoders.split(",")) else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for encoder in args.encoders.split(","):
                for main_thread in args.main.split(","):
                    for params in args.params:
                        source = yuv if encoder.endswith("-yuv") else frames
                        runs = [one_run(source, params, args.pace_ms / 1000, Path(tmp),
                                        helper if encoder.startswith("process") else None,
                                        busy=main_thread == "busy")
                                for _ in range(args.repeat)]
                        row = {"encoder": encoder, "main_thread": main_thread, "x264_params": params,
                               "bytes": runs[-1]["bytes"]}
                        for key in ("tail_s", "total_s", "busy_s"):
                            row[key] = round(statistics.median(r[key] for r in runs), 4)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        if helper is not None:
            helper.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"what": "MP4 encode tail after the last decoded chunk, per x264-params", "cpus": os.cpu_count(),
                  "pace_ms": args.pace_ms, "frames": args.frames, "size": args.size,
                  "date": time.strftime("%Y-%m-%d"), "rows": rows}
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
