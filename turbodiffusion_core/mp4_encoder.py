"""MP4 encoding in a helper process, streamed while the VAE decodes.

The pipeline hands each decoded chunk of frames to an H.264 encoder that runs beside the decode, so that
when the decode ends only the last frames are left to encode. An encoder *thread* shares the worker's
GIL with the Python that drives the GPU, and loses: on an H100 the same encode took 0.54 s alone and
0.68-0.83 s inside a request, and 17 ms vs 70-86 ms after the last chunk (bench/results/mp4_tail_h100.json,
e2e_h100.json). A helper process has its own interpreter. It is started once per pipeline (at warm-up),
reused for every video, and restarted if it dies.

Protocol, over the helper's stdin / stdout: every message is a 4-byte big-endian length and a JSON
object; a "frames" message is followed by the raw uint8 bytes of the frames it announces: RGB [n, H, W, 3], or
I420 planes [n, H*3/2, W] (`video.Yuv420Frames`, converted by the pipeline on the GPU) with "format": "yuv420p".

    parent -> helper: {"op": "open", "path", "width", "height", "x264_params"}
                      {"op": "frames", "shape": [n, H, W, 3]} + bytes
                      {"op": "frames", "shape": [n, H*3/2, W], "format": "yuv420p"} + bytes
                      {"op": "finish"} | {"op": "abort"} | {"op": "stop"}
    helper -> parent: after finish: {"ok": true, "busy": seconds} or {"ok": false, "error": text};
                      after abort: {"ok": true}

The helper reads on one thread and encodes on another, so a chunk is taken off the pipe at once even
while the one before it is still encoding (the parent's write then never waits on the encoder).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

from .errors import EngineError
from .video import Yuv420Frames

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
FINISH_TIMEOUT_S = 120.0
"""How long `finish` waits for the helper to flush and close the file before calling it dead."""


def _write_all(pipe: BinaryIO, data) -> None:
    """Write every byte (an unbuffered pipe may take a large write in parts)."""
    view = memoryview(data)
    while view.nbytes:
        written = pipe.write(view)
        view = view[written if written is not None else 0:]


def _send(pipe: BinaryIO, message: dict, payload: Optional[memoryview] = None) -> None:
    data = json.dumps(message).encode()
    _write_all(pipe, _HEADER.pack(len(data)) + data)
    if payload is not None:
        _write_all(pipe, payload)
    pipe.flush()


def _read_exact(pipe: BinaryIO, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = pipe.read(left)
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(pipe: BinaryIO) -> dict:
    (size,) = _HEADER.unpack(_read_exact(pipe, _HEADER.size))
    return json.loads(_read_exact(pipe, size))


class EncoderProcess:
    """The helper process; `stream()` opens one MP4 at a time on it (starting or restarting it as needed)."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._busy_stream = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the helper if it is not running (about half a second: a Python with numpy and PyAV)."""
        if self.alive:
            return
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "turbodiffusion_core.mp4_encoder"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        except OSError as exc:
            raise EngineError(f"could not start the MP4 encoder process ({sys.executable}: {exc}); "
                              "TD_MP4_ENCODER=thread encodes in the worker itself") from exc
        log.info("MP4 encoder process started (pid %d)", self._proc.pid)

    def stream(self, path: Path, width: int, height: int, x264_params: Optional[str] = None) -> "Mp4Stream":
        with self._lock:
            if self._busy_stream:
                raise EngineError("the MP4 encoder process is already writing a video")
            self.start()  # raises EngineError when it cannot
            self._busy_stream = True
        try:
            _send(self._proc.stdin, {"op": "open", "path": str(path), "width": width, "height": height,
                                     "x264_params": x264_params})
        except OSError as exc:
            self._release()
            self._died(f"could not open {path.name}: {exc}")
            raise EngineError(f"the MP4 encoder process is not running ({exc}); it restarts with the next video")
        return Mp4Stream(self, Path(path))

    def close(self) -> None:
        """Stop the helper (it also exits by itself when the parent's end of its stdin closes)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            _send(proc.stdin, {"op": "stop"})
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def _release(self) -> None:
        with self._lock:
            self._busy_stream = False

    def _died(self, why: str) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            log.warning("MP4 encoder process %d lost (%s); it restarts with the next video", proc.pid, why)
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class Mp4Stream:
    """One MP4 being written by the helper; the same calls as the pipeline's thread writer: `put(frames)`
    as chunks are decoded, then `finish()` (returns the path) or `abort()` (removes the file)."""

    def __init__(self, owner: EncoderProcess, path: Path) -> None:
        self._owner = owner
        self.path = path
        self.busy = 0.0  # seconds the helper spent encoding (reported by finish)
        self._error: Optional[str] = None
        self._done = False

    def put(self, frames: Union[np.ndarray, Yuv420Frames]) -> None:
        if self._error is not None:
            return
        header: dict = {"op": "frames"}
        if isinstance(frames, Yuv420Frames):
            frames, header["format"] = frames.planes, "yuv420p"
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        header["shape"] = list(frames.shape)
        try:
            _send(self._owner._proc.stdin, header, memoryview(frames).cast("B"))
        except (OSError, AttributeError) as exc:  # reported by finish()
            self._error = f"the MP4 encoder process exited while taking frames ({exc})"

    def finish(self) -> Path:
        if self._done:
            return self.path
        self._done = True
        proc = self._owner._proc
        try:
            if self._error is not None:
                self._owner._died(self._error)
                raise EngineError(f"{self._error}; it restarts with the next video")
            reply = self._ask({"op": "finish"}, proc)
            if not reply.get("ok"):
                raise EngineError(f"MP4 encoding failed: {reply.get('error')}")
            self.busy = float(reply.get("busy", 0.0))
            return self.path
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            self._owner._release()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._error is None:
                self._ask({"op": "abort"}, self._owner._proc)
        except EngineError:
            pass  # the helper is gone; the file is removed here
        finally:
            self.path.unlink(missing_ok=True)
            self._owner._release()

    def _ask(self, message: dict, proc: Optional[subprocess.Popen]) -> dict:
        result: dict = {}

        def exchange() -> None:
            try:
                _send(proc.stdin, message)
                result["reply"] = _receive(proc.stdout)
            except (OSError, EOFError, ValueError, AttributeError) as exc:
                result["error"] = exc

        worker = threading.Thread(target=exchange, name="mp4-helper-reply", daemon=True)
        worker.start()
        worker.join(FINISH_TIMEOUT_S)
        if "reply" in result:
            return result["reply"]
        why = "no answer in time" if worker.is_alive() else str(result.get("error"))
        self._owner._died(why)
        raise EngineError(f"the MP4 encoder process failed ({why}); it restarts with the next video")


# --- the helper process ---------------------------------------------------------------------------------
def _helper_main(inp: BinaryIO, out: BinaryIO) -> int:
    """One video at a time on a `video.Mp4Thread`: this thread keeps reading the pipe while it encodes."""
    from .video import Mp4Thread

    stream: Optional[Mp4Thread] = None
    path: Optional[Path] = None
    open_error: Optional[str] = None  # the writer could not be made: reported at finish
    while True:
        try:
            msg = _receive(inp)
        except EOFError:
            return 0  # the parent is gone
        op = msg.get("op")
        if op == "frames":
            shape = tuple(msg["shape"])
            data = _read_exact(inp, int(np.prod(shape)))
            if stream is not None:
                frames = np.frombuffer(data, dtype=np.uint8).reshape(shape)
                stream.put(Yuv420Frames(frames) if msg.get("format") == "yuv420p" else frames)
        elif op == "open":
            path, open_error = Path(msg["path"]), None
            try:
                stream = Mp4Thread(path, msg["width"], msg["height"], x264_params=msg.get("x264_params"))
            except BaseException as exc:
                stream, open_error = None, f"{type(exc).__name__}: {exc}"
        elif op in ("finish", "abort"):
            current, stream = stream, None
            if current is None:
                if path is not None:
                    path.unlink(missing_ok=True)
                _send(out, {"ok": True} if op == "abort" else {"ok": False, "error": open_error or "no video open"})
            elif op == "abort":
                current.abort()
                _send(out, {"ok": True})
            else:
                try:
                    current.finish()
                except BaseException as exc:  # the file is removed
                    _send(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                else:
                    _send(out, {"ok": True, "busy": current.busy})
        elif op == "stop":
            return 0


if __name__ == "__main__":
    # The protocol owns stdout: keep a private handle on it and send anything else printed to stderr.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.exit(_helper_main(sys.stdin.buffer, protocol_out))
