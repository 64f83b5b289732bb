"""The RQ job function: generate one video on this worker's resident pipeline.

`run_video(video_id, attempt)` claims the video (queued -> in_progress, fenced by attempt), runs
the engine with progress and cancel hooks, writes the MP4 / thumbnail / spritesheet to
storage/<video_id>/ and finishes the record. Every failure becomes a failed video with an error
code, so the function itself returns normally and RQ's own retry logic never runs (retries of
jobs whose worker died are the store's sweep).

Error codes: cancelled (DELETE or /cancel), timeout (TD_JOB_TIMEOUT passed), out_of_memory
(CUDA OOM; memory is freed and the worker keeps serving), the engine's own codes
(model_files_missing, checkpoint_mismatch, ...), internal_error (anything else).
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from turbodiffusion_core import spec
from turbodiffusion_core.errors import Cancelled, EngineError, WorkerBroken
from worker import runtime as runtime_mod
from worker.runtime import CurrentJob, Runtime

log = logging.getLogger("turbodiffusion.worker")


def run_video(video_id: str, attempt: int) -> str:
    """Entry point called by RQ (by dotted path, with JSON arguments)."""
    rt = runtime_mod.current()
    outcome = rt.store.claim(video_id, attempt, rt.name)
    if outcome != "ok":
        log.info("video %s attempt %d skipped: %s", video_id, attempt, outcome)
        return outcome
    rt.current = CurrentJob(video_id, attempt)
    try:
        return JobRun(rt, rt.current).run()
    finally:
        rt.current = None


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (by name, so no torch import is needed to recognise it) or
    an older torch's RuntimeError("CUDA out of memory ...")."""
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobRun:
    """One attempt at one video: the engine call and the bookkeeping around it."""

    def __init__(self, rt: Runtime, job: CurrentJob):
        self.rt = rt
        self.job = job
        self.store = rt.store
        self.settings = rt.settings
        self.stop_reason: Optional[str] = None
        self.prompt = ""
        self._last_write = 0.0
        self._last_stage: Optional[str] = None

    # --- hooks the engine calls --------------------------------------------------------------
    def should_cancel(self) -> bool:
        """Checked between denoising steps: cancel, deletion, a lost lease, or the job timeout."""
        if self.stop_reason:
            return True
        if time.monotonic() - self.job.started > self.settings.job_timeout:
            self.stop_reason = "timeout"
        else:
            self.stop_reason = self.store.stop_reason(self.job.video_id, self.job.attempt)
            if self.stop_reason is None and self.job.lost.is_set():
                self.stop_reason = "lost"
        return self.stop_reason is not None

    def on_progress(self, event: spec.ProgressEvent) -> None:
        if event.stage != self._last_stage:
            log.info("video %s: %s", self.job.video_id, event.stage)
        self._report(event)
        if event.stage == "denoise" and event.step:
            self._test_faults()
        elif event.stage == "vae_decode" and event.fraction > 0 and self.should_cancel():
            raise Cancelled("stopped during VAE decode")  # the engine checks only between denoising steps

    def _report(self, event: spec.ProgressEvent) -> None:
        """Write stage / progress / step, at most every progress_interval, but always a new stage
        and the last step (so a finished video shows step == total_steps)."""
        now = time.monotonic()
        milestone = event.stage != self._last_stage or (event.step is not None and event.step == event.total_steps)
        if not milestone and now - self._last_write < self.settings.progress_interval:
            return
        self._last_stage, self._last_write = event.stage, now
        fields: dict[str, Any] = {"stage": event.stage, "progress": event.percent}
        if event.step is not None:
            fields.update(step=event.step, total_steps=event.total_steps)
        if not self.store.update(self.job.video_id, self.job.attempt, **fields):
            self.stop_reason = self.stop_reason or self.store.stop_reason(self.job.video_id, self.job.attempt)

    def _test_faults(self) -> None:
        """TEST ONLY hooks (TD_TEST_STEP_DELAY, TD_TEST_OOM_MARKER), inert unless configured."""
        if self.settings.test_step_delay:
            time.sleep(self.settings.test_step_delay)
        marker = self.settings.test_oom_marker
        if marker and marker in self.prompt:
            import torch

            raise torch.cuda.OutOfMemoryError("TEST: simulated CUDA out of memory (TD_TEST_OOM_MARKER)")

    # --- the attempt ---------------------------------------------------------------------------
    def run(self) -> str:
        vid, attempt = self.job.video_id, self.job.attempt
        started = time.perf_counter()
        try:
            rec = self.store.get(vid)
            if rec is None:
                return "gone"
            request = spec.ResolvedRequest(**rec["resolved"])
            self.prompt = request.prompt
            queue_wait = max(0.0, time.time() - rec["enqueued_at"])
            log.info("video %s started on %s (attempt %d, %s %s, %d frames, %d steps; waited %.1f s)", vid,
                     self.rt.name, attempt, request.model, request.size, request.num_frames, request.steps,
                     queue_wait)
            files, result = self._generate(rec, request)
        except Cancelled:
            return self._stopped()
        except Exception as exc:  # every failure ends as a failed video with a code, never an RQ error
            return self._failed(exc)
        timings = {k: round(v, 4) for k, v in result.timings.items()}
        timings.update(queue_wait=round(queue_wait, 4),
                       total=round(time.perf_counter() - started, 4))
        final = self.store.finish(
            vid, attempt, "completed",
            files=files, seed_used=result.seed, timings=timings,
        )
        if final is None:
            self._discard_outputs(files)
            log.info("video %s attempt %d finished but no longer owns the video; output discarded", vid, attempt)
            return "discarded"
        log.info("video %s completed in %.1f s (%s)", vid, timings["total"],
                 ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"))
        return "completed"

    def _generate(self, rec: dict, request: spec.ResolvedRequest) -> tuple[dict[str, str], Any]:
        """Engine call; the engine writes the output files itself, encoding the MP4 while the VAE decodes
        (its timings then hold encode_video and store). Returns (variant -> file name, result)."""
        image = None
        if rec.get("input_image"):
            from PIL import Image

            with Image.open(self.store.video_dir(self.job.video_id) / rec["input_image"]) as img:
                image = img.convert("RGB")
        folder = self.store.video_dir(self.job.video_id)
        prefix = None
        if rec.get("prefix_video"):  # an extension: the video it continues, copied here by the API
            from turbodiffusion_core.video import read_video_frames

            prefix = read_video_frames(folder / rec["prefix_video"])
        residency = self.rt.residency
        with residency.lock(request.model):
            result = residency.get(request.model).generate(
                request, image=image, on_progress=self.on_progress, should_cancel=self.should_cancel,
                output_dir=folder, stem=f"video.{self.job.attempt}", prefix_frames=prefix,
            )
        files = {variant: Path(p).name for variant, p in result.files.items()}
        if self.should_cancel():  # stopped while the outputs were being finished
            self._discard_outputs(files)
            raise Cancelled("stopped after decoding")
        return files, result

    def _discard_outputs(self, files: dict[str, str]) -> None:
        folder = self.store.video_dir(self.job.video_id)
        for name in files.values():
            (folder / name).unlink(missing_ok=True)

    def _stopped(self) -> str:
        vid, attempt, reason = self.job.video_id, self.job.attempt, self.stop_reason or "cancelled"
        if reason == "cancelled":
            self.store.finish(vid, attempt, "cancelled",
                              error={"code": "cancelled", "message": "cancelled by request"})
            log.info("video %s cancelled while running", vid)
        elif reason == "timeout":
            self.store.finish(vid, attempt, "failed", error={
                "code": "timeout", "message": f"generation took longer than {self.settings.job_timeout} s"})
            log.warning("video %s failed: timeout after %d s", vid, self.settings.job_timeout)
        elif reason == "gone":
            self.store.drop_files(vid)
            log.info("video %s was deleted while running; stopped", vid)
        else:  # "stale" / "lost": the sweep gave the video to another attempt, which owns it now
            log.warning("video %s attempt %d stopped: lease lost, another attempt took over", vid, attempt)
        return reason

    def _failed(self, exc: Exception) -> str:
        vid, attempt = self.job.video_id, self.job.attempt
        if isinstance(exc, WorkerBroken):
            # Not the video's fault: leave it in_progress; its lease runs out once this worker stops
            # renewing it (the group worker exits), and the sweep gives it to another worker.
            log.error("video %s attempt %d abandoned: %s", vid, attempt, exc)
            return "abandoned"
        if is_out_of_memory(exc):
            # the traceback's frames still reference the step's tensors: drop them before freeing
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
            free_memory()
            code, message = "out_of_memory", f"the GPU ran out of memory: {exc}"
            log.error("video %s failed: out of memory (%s); memory freed, worker keeps serving", vid, exc)
        elif isinstance(exc, EngineError):
            code, message = exc.code, str(exc)
            log.error("video %s failed: %s: %s", vid, code, exc)
        else:
            code, message = "internal_error", f"{type(exc).__name__}: {exc}"
            log.exception("video %s failed with an unexpected error", vid)
        self.store.finish(vid, attempt, "failed", error={"code": code, "message": message[:2000]})
        return "failed"
