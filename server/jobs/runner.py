"""What a queue worker does with one job: the offline scorer's chunks and resumable parts
(``server.jobs.score``, ``server.jobs.parts``), with the job's state kept in Redis.

A job is scored by at most one worker at a time, the holder of its lease (refreshed by a
heartbeat thread). Chunk ``k`` becomes part ``k`` by atomic renames, so a worker that dies
leaves only whole parts; the next one (the message redelivered, or queued again by a sweep
that finds the lease lapsed) skips them and goes on from the first missing one. Between
chunks the worker checks for a cancel, for its version still being in the repository, and
for its lease. The result is the parts concatenated in order, written under a name of this
attempt's own and renamed into place.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import redis

from server.config import Settings
from server.errors import ApiError
from server.jobs.files import JobFiles
from server.jobs.parts import Job, Parts, prediction_type
from server.jobs.score import Unusable, open_source, read_chunks, score_frame
from server.jobs.store import JobRecord, JobStore
from server.model.loaded import LoadedVersion
from server.model.registry import ModelRegistry
from server.protocols.csvrows import feature_positions

log = logging.getLogger("server.jobs")

# A job whose worker died this many times (killed by the OOM killer on each try, say) fails
# instead of being queued again for ever.
MAX_ATTEMPTS = 5


class JobFailed(Exception):
    """The job cannot be scored: it ends as failed with this message."""


class Stop(Exception):
    """Stop scoring at a chunk boundary: ``reason`` is 'cancelled' or 'lost' (the lease)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class WorkerContext:
    """What one queue worker process scores with, made once per process."""

    settings: Settings
    store: JobStore
    registry: ModelRegistry
    name: str

    def version(self, record: JobRecord) -> LoadedVersion:
        """The job's version as the repository has it now (rescanned: cheap when unchanged)."""
        self.registry.reload()
        try:
            return self.registry.resolve(record.model, record.version)
        except ApiError as exc:
            if exc.status == 404:
                raise JobFailed(f"model '{record.model}' version {record.version} is no "
                                "longer in the model repository") from exc
            raise JobFailed(exc.message) from exc

    def artifact_present(self, lv: LoadedVersion) -> bool:
        path = self.registry.repository.artifact_path(lv.name, lv.version)
        return path is not None and path.exists()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """Holds a job's lease while the block runs: a thread refreshes it every third of the
    store's ``lease_seconds`` (JOB_LEASE_SECONDS), and notes when it was lost (another
    worker may have the job then)."""

    def __init__(self, store: JobStore, job_id: str, token: str) -> None:
        self.store, self.job_id, self.token = store, job_id, token
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="job-lease")

    def _run(self) -> None:
        while not self._stop.wait(self.store.lease_seconds / 3):
            try:
                if not self.store.refresh(self.job_id, self.token):
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - Redis down: try again next time
                log.warning("cannot refresh the lease of job %s: %s", self.job_id, exc)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.release(self.job_id, self.token)
        except Exception as err:  # noqa: BLE001 - it lapses by itself
            log.warning("cannot release the lease of job %s: %s", self.job_id, err)


def wait_for_lease(store: JobStore, job_id: str, patience: float) -> str | None:
    """The lease, waiting up to ``patience`` seconds while another worker holds it (a
    worker that died keeps it until it lapses). None when the job ended meanwhile, or when
    its holder is alive: then it is that worker's job (and if it dies, the sweep queues it
    again)."""
    deadline = time.monotonic() + patience
    while True:
        token = store.acquire(job_id)
        if token is not None:
            return token
        record = store.get(job_id)
        if record is None or not record.active or time.monotonic() >= deadline:
            return None
        time.sleep(0.25)


def run_job(job_id: str, ctx: WorkerContext) -> str:
    """Score one job (a Celery task's body); returns what happened, for the worker's log."""
    store = ctx.store
    record = store.get(job_id)
    if record is None:
        return "gone"
    if not record.active:
        return record.state
    token = wait_for_lease(store, job_id, store.lease_seconds + 2)
    if token is None:
        return "held elsewhere"
    with Lease(store, job_id, token) as lease:
        state = store.start(job_id, token, ctx.name)
        if state != "running":
            return state
        record = store.get(job_id) or record
        files = JobFiles(ctx.settings.jobs_path, job_id, record.format)

        def end(state: str, error: str | None = None) -> str:
            store.finish(job_id, token, state, eta_seconds=None, error=error)
            files.remove_work()
            return state

        if record.attempts > MAX_ATTEMPTS:
            return end("failed", f"stopped after {MAX_ATTEMPTS} attempts: the worker scoring "
                                 "it stopped each time (killed, or out of memory?)")
        try:
            outcome = Scoring(ctx, record, files, token, lease).run()
        except Stop as stop:
            return end("cancelled") if stop.reason == "cancelled" else stop.reason
        except redis.RedisError:
            raise  # Redis away: the job stays running, and is queued again once it is back
        except Exception as exc:
            return end("failed", failure(job_id, exc)[:1000])
        if store.finish(job_id, token, "succeeded", **outcome):
            files.remove_work()
            return "succeeded"
        return "lost"


def failure(job_id: str, exc: Exception) -> str:
    """What a failed job's ``error`` says."""
    if isinstance(exc, JobFailed):
        log.info("job %s failed: %s", job_id, exc)
        return str(exc)
    if isinstance(exc, (Unusable, OSError, ValueError, csv.Error)):
        # The input broke part way (a Parquet file cut short, a full disk...).
        log.warning("job %s failed: %s", job_id, exc)
        return f"cannot score the input: {exc}"
    log.error("job %s failed", job_id, exc_info=exc)
    return f"internal error: {type(exc).__name__}: {exc}"


class Scoring:
    """One attempt at one job, from its first missing part to the concatenated result."""

    def __init__(self, ctx: WorkerContext, record: JobRecord, files: JobFiles, token: str,
                 lease: Lease) -> None:
        self.ctx, self.record, self.files, self.token, self.lease = ctx, record, files, token, lease
        self.started = time.monotonic()
        self.rows = 0  # rows done, parts of earlier attempts included
        self.scored = 0  # rows scored by this attempt (the rate counts these only)
        self.fraction0 = 0.0  # how much of the input earlier attempts had read

    def run(self) -> dict[str, Any]:
        record, files, ctx = self.record, self.files, self.ctx
        lv = ctx.version(record)
        if not files.input.exists():
            raise JobFailed(f"the job's input is not in this worker's JOBS_DIR "
                            f"({ctx.settings.jobs_path}): the server and the queue workers "
                            "must share it")
        try:
            source = open_source(files.input)
        except Unusable as exc:
            raise JobFailed(str(exc).replace(str(files.input), "the input")) from exc
        try:
            positions = feature_positions(lv, source.columns)
        except ApiError as exc:
            raise JobFailed(exc.message) from exc
        st = files.input.stat()
        # The job id, not the input's path: JOBS_DIR may be mounted elsewhere on each host.
        stamp = Job(record.id, st.st_size, st.st_mtime_ns, lv.name, lv.version, lv.sha256,
                    record.chunk_rows, "queue", record.format)
        parts = Parts(files.result, record.format, stamp,
                      prediction_type(lv) if record.format == "parquet" else None)
        rejects = 0
        count = 0
        for k, (chunk, parsed, fraction) in enumerate(
                read_chunks(source, record.chunk_rows, positions, lv)):
            count = k + 1
            if parts.done(k):  # written by an earlier attempt: not scored again
                manifest = json.loads(parts.manifest(k).read_text())
                self.rows += int(manifest["rows"])
                rejects += int(manifest["bad"])
                self.fraction0 = fraction
                continue
            self.between_chunks(lv)
            rejects += parts.write(k, score_frame(lv, chunk, positions, parsed))
            self.rows += len(chunk)
            self.scored += len(chunk)
            self.report(rejects, fraction, source.total_rows)
        self.between_chunks(lv)
        if count == 0:  # a header and no rows: still a result with every column
            empty = pd.DataFrame({c: pd.Series(dtype=str) for c in source.columns})
            parts.write(0, score_frame(lv, empty, positions))
            count = 1
        # Concatenated under this attempt's own name, then renamed into place.
        target = files.attempt(self.token)
        parts.output = target
        total, bad = parts.concatenate(count)
        os.replace(Path(f"{target}.rejects.csv"), files.rejects)
        os.replace(target, files.result)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {"rows_done": total, "rows_total": total, "rejects": bad, "eta_seconds": 0,
                "rows_per_second": round(self.scored / elapsed, 1) if self.scored else None}

    def between_chunks(self, lv: LoadedVersion) -> None:
        if self.lease.lost.is_set():
            raise Stop("lost")
        if not self.ctx.artifact_present(lv):
            raise JobFailed(f"model '{lv.name}' version {lv.version} was removed from the "
                            f"model repository while the job ran, after {self.rows:,} rows")

    def report(self, rejects: int, fraction: float, total: int | None) -> None:
        """Progress after a chunk: rows, rejects, this attempt's rate and the time left
        (from rows when the total is known, as for Parquet, else from the bytes read)."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.scored / elapsed
        eta: float | None = None
        if total:
            eta = max(total - self.rows, 0) / rate if rate else None
        elif fraction >= 1:
            eta = 0.0
        elif fraction > self.fraction0:  # 0 for compressed CSV: no estimate then
            eta = elapsed * (1 - fraction) / (fraction - self.fraction0)
        answer = self.ctx.store.progress(
            self.record.id, self.token, rows_done=self.rows, rejects=rejects,
            rows_per_second=round(rate, 1), eta_seconds=None if eta is None else round(eta, 1))
        if answer < 0:
            raise Stop("lost")
        if answer > 0:
            raise Stop("cancelled")
