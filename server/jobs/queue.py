"""The queue workers: ``celery -A server.jobs.queue worker`` (the same environment as the
server: REDIS_URL, MODEL_DIR, JOBS_DIR shared with it).

``app`` is the Celery application the command finds; its settings are read from the
environment when the worker first needs them, never at import. Each worker process scores
one job at a time (``server.jobs.runner``). The worker's main process also runs a sweep
thread: every RESCUE_SECONDS it queues again the running jobs whose worker died (their
lease lapsed), and every SWEEP_SECONDS it deletes the files of jobs that expired.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown

from server.config import Settings
from server.jobs.broker import QUEUE, TASK, celery_config
from server.jobs.files import sweep
from server.jobs.runner import WorkerContext, run_job, worker_name
from server.jobs.store import JobStore
from server.model.registry import ModelRegistry
from server.model.storage import open_repository
from server.runtime.blas import limit_blas_threads

log = logging.getLogger("server.jobs")

RESCUE_SECONDS = 3.0
SWEEP_SECONDS = 60.0


class JobQueue(Celery):
    """Celery with the server's settings, read once, when first needed."""

    sweeper: Sweeper | None = None

    @cached_property
    def settings(self) -> Settings:
        settings = Settings()
        if not settings.redis_url:
            raise SystemExit("celery -A server.jobs.queue worker needs REDIS_URL (the broker "
                             "and the job store), the same as the server's")
        return settings

    def store(self) -> JobStore:
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=10,
                                      socket_connect_timeout=5, health_check_interval=30)
        return JobStore(client, self.settings.job_result_ttl, self.settings.job_lease_seconds)


app = JobQueue("server.jobs.queue")
app.add_defaults(lambda: celery_config(app.settings))


class JobTask(Task):  # type: ignore[misc]
    """Holds the worker process's context (settings, store, models), made on its first job
    in that process: a prefork child makes its own after the fork."""

    _context: WorkerContext | None = None
    _pid = 0

    def context(self) -> WorkerContext:
        if self._context is None or self._pid != os.getpid():
            settings = app.settings
            limit_blas_threads(settings.blas_threads)
            registry = ModelRegistry(open_repository(settings))
            self._context = WorkerContext(settings, app.store(), registry, worker_name())
            self._pid = os.getpid()
        return self._context


@app.task(bind=True, base=JobTask, name=TASK, acks_late=True, reject_on_worker_lost=True,
          ignore_result=True)
def score_job(self: JobTask, job_id: str) -> str:
    outcome = run_job(job_id, self.context())
    log.info("job %s: %s", job_id, outcome)
    return outcome


class Sweeper(threading.Thread):
    """Runs in a worker's main process: queues orphaned jobs again, removes expired files."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="jobs-sweeper")
        self.stopping = threading.Event()

    def run(self) -> None:
        store = app.store()
        root = app.settings.jobs_path
        swept_at = -SWEEP_SECONDS
        ticks = 0.0
        while True:
            try:
                for job_id in store.orphans():
                    if store.claim_rescue(job_id):
                        log.warning("job %s lost its worker: queued again", job_id)
                        app.send_task(TASK, args=[job_id], queue=QUEUE)
                if ticks - swept_at >= SWEEP_SECONDS:
                    swept_at = ticks
                    sweep(root, store.known)
            except Exception as exc:  # noqa: BLE001 - Redis or the disk away: next time
                log.warning("jobs sweep failed: %s", exc)
            if self.stopping.wait(RESCUE_SECONDS):
                return
            ticks += RESCUE_SECONDS


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    app.sweeper = Sweeper()
    app.sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(sender: Any = None, **_: Any) -> None:
    if app.sweeper is not None:
        app.sweeper.stopping.set()
        app.sweeper = None
