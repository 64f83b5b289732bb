"""Exceptions the engine raises that its callers (CLI, worker) handle specially. Torch-free."""


class EngineError(RuntimeError):
    """Base class; `code` is a stable machine-readable name (the API's error code)."""

    code = "engine_error"


class Cancelled(EngineError):
    """`should_cancel()` returned True between two steps."""

    code = "cancelled"


class ModelFilesMissing(EngineError):
    """A preset's files are not in the models folder."""

    code = "model_files_missing"


class CheckpointMismatch(EngineError):
    """A checkpoint's keys or shapes do not fit the module built for it."""

    code = "checkpoint_mismatch"


class UnsupportedRequest(EngineError):
    """The request asks for something this loaded pipeline does not run (e.g. another quantization)."""

    code = "unsupported_value"


class WorkerBroken(EngineError):
    """This process can no longer run jobs (its group of GPUs is out of step after a failed collective):
    the job is not the problem and should run on another worker, which the caller arranges."""

    code = "worker_broken"
