"""Scoring jobs as the HTTP views see them, transport-free: submit an upload, look a job up
for its owner, list, cancel, find its result. The views only read the request and shape
the answer; the queue workers do the scoring (``server.jobs.queue``)."""

from __future__ import annotations

import csv
import io
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from server.errors import ApiError
from server.jobs.files import FORMATS, JOB_ID_RE, JobFiles
from server.jobs.store import JobRecord, JobStore
from server.model.loaded import LoadedVersion
from server.protocols.csvrows import feature_positions

log = logging.getLogger("server.jobs")

DEFAULT_CHUNK_ROWS = 50_000
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 1_000, 1_000_000
PARQUET_MAGIC = b"PAR1"

T = TypeVar("T")


def jobs_off() -> ApiError:
    """Without REDIS_URL there are no jobs: 404, as DRIFT=off and PREDICTION_LOG=off do."""
    return ApiError(404, "jobs_off", "scoring jobs need REDIS_URL: Redis is the queue "
                    "workers' broker and the jobs' state store, and this server has none")


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job '{job_id[:64]}' for this API key (it may "
                    "have expired: results are kept JOB_RESULT_TTL seconds)")


def sniff_format(path: Path) -> str:
    """An upload sent without a telling Content-Type: Parquet by its magic bytes, else CSV."""
    with path.open("rb") as fh:
        return "parquet" if fh.read(4) == PARQUET_MAGIC else "csv"


def input_columns(path: Path, fmt: str) -> tuple[list[str], int | None]:
    """The upload's column names (CSV header, Parquet schema) and its row count when the
    file says it (Parquet); 422 when it is not a file of that format."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ApiError(415, "unsupported_media_type", "Parquet uploads need pyarrow on "
                           "the server: pip install -r requirements-score.txt") from exc
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise ApiError(422, "validation_error",
                           f"the body is not a readable Parquet file: {exc}"[:300]) from exc
        return list(meta.schema.to_arrow_schema().names), meta.num_rows
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        try:
            header = next(filter(None, csv.reader(text)), None)
        except csv.Error as exc:
            raise ApiError(422, "validation_error", f"the CSV header cannot be read: {exc}") \
                from exc
    if header is None:
        raise ApiError(422, "validation_error", "the CSV body is empty: send a header row of "
                       "feature names, then one row per line")
    return [str(c) for c in header], None


def chunk_rows(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_CHUNK_ROWS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not MIN_CHUNK_ROWS <= n <= MAX_CHUNK_ROWS:
        raise ApiError(422, "validation_error", f"chunk_rows must be an integer from "
                       f"{MIN_CHUNK_ROWS} to {MAX_CHUNK_ROWS}",
                       [{"loc": ["query", "chunk_rows"], "msg": "out of range"}])
    return n


class JobService:
    """The web side of scoring jobs: ``enqueue`` sends a job's message to the workers."""

    def __init__(self, store: JobStore, root: Path, enqueue: Callable[[str], None],
                 max_bytes: int, max_active: int) -> None:
        self.store, self.root, self.enqueue = store, root, enqueue
        self.max_bytes, self.max_active = max_bytes, max_active

    def check_room(self, owner: str) -> None:
        """429 before the upload is read when the owner has MAX_ACTIVE jobs already."""
        n = self._redis(lambda: self.store.active_count(owner))
        if n >= self.max_active:
            raise self._too_many(n)

    def _too_many(self, n: int) -> ApiError:
        return ApiError(429, "too_many_jobs", f"{n} jobs of this API key are queued or "
                        f"running (JOB_MAX_ACTIVE_PER_KEY={self.max_active}): wait for one "
                        "to finish, or cancel one", headers={"Retry-After": "5"})

    def staging(self) -> tuple[str, Path]:
        """A new job id and its folder, for the upload to be written into."""
        job_id = secrets.token_hex(16)
        folder = self.root / job_id
        folder.mkdir(parents=True)
        return job_id, folder

    def submit(self, owner: str, job_id: str, upload: Path, fmt: str | None,
               lv: LoadedVersion, rows_per_chunk: int) -> JobRecord:
        """The upload (``upload``, in the job's folder) checked and queued: 422 when its
        header lacks a feature, 429 when the owner has too many jobs, 503 when the queue is
        unreachable. The folder is removed on any error."""
        try:
            fmt = fmt or sniff_format(upload)
            assert fmt in FORMATS
            files = JobFiles(self.root, job_id, fmt)
            upload.rename(files.input)
            columns, total = input_columns(files.input, fmt)
            feature_positions(lv, columns)  # 422 naming the missing feature
            record = JobRecord(job_id, owner, "queued", lv.name, lv.version, fmt,
                               rows_per_chunk, files.input.stat().st_size, time.time(),
                               rows_total=total)
            active = self._redis(lambda: self.store.create(record, self.max_active))
            if active is not None:
                raise self._too_many(active)
        except BaseException:
            shutil.rmtree(self.root / job_id, ignore_errors=True)
            raise
        try:
            self.enqueue(job_id)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds
            log.error("job %s could not be queued: %s", job_id, exc)
            reason = f"could not be queued: {exc}"[:300]
            self._redis(lambda: self.store.fail(job_id, reason))
            shutil.rmtree(self.root / job_id, ignore_errors=True)
            raise ApiError(503, "queue_unavailable", "the job queue (Redis) is unreachable: "
                           "retry shortly", headers={"Retry-After": "5"}) from exc
        return record

    def get(self, owner: str, job_id: str) -> JobRecord:
        """The job, for its owner only: another key's job is as unknown as a made-up id."""
        record = None
        if JOB_ID_RE.match(job_id):
            record = self._redis(lambda: self.store.get(job_id))
        if record is None or record.owner != owner:
            raise job_not_found(job_id)
        return record

    def list(self, owner: str) -> list[JobRecord]:
        return self._redis(lambda: self.store.list_for(owner))

    def cancel(self, owner: str, job_id: str) -> JobRecord:
        """Cancel a queued job at once, a running one before its worker's next chunk; 409
        for a job that has ended."""
        record = self.get(owner, job_id)
        state = self._redis(lambda: self.store.cancel(job_id)) if record.active else None
        if state not in ("cancelled", "running"):
            ended = state or record.state
            raise ApiError(409, "job_finished", f"job {job_id} has already ended: it is "
                           f"{ended}")
        if state == "cancelled":
            JobFiles(self.root, job_id, record.format).remove_work()
        return self.get(owner, job_id)

    def output(self, owner: str, job_id: str, which: str) -> tuple[JobRecord, Path]:
        """The file ``which`` ('result' or 'rejects') of a succeeded job: 409 before then."""
        record = self.get(owner, job_id)
        if record.state != "succeeded":
            raise ApiError(409, "job_not_succeeded", f"job {job_id} is {record.state}: its "
                           f"{which} can be downloaded once it has succeeded")
        files = JobFiles(self.root, job_id, record.format)
        path = files.result if which == "result" else files.rejects
        if not path.exists():
            raise ApiError(404, "job_not_found", f"the {which} of job {job_id} is gone from "
                           "JOBS_DIR (expired, or deleted by hand)")
        return record, path

    @staticmethod
    def _redis(call: Callable[[], T]) -> T:
        try:
            return call()
        except redis.RedisError as exc:
            raise ApiError(503, "jobs_unavailable", f"the job store (Redis) is unreachable: "
                           f"{exc}"[:300], headers={"Retry-After": "5"}) from exc
