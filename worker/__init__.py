"""The GPU worker process: an RQ SimpleWorker that keeps pipelines resident (worker.main), the
job function (worker.tasks) and its heartbeat thread (worker.pulse). Never imports FastAPI."""
