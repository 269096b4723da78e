"""Scoring jobs: POST /jobs, GET /jobs, GET|DELETE /jobs/<id>, GET /jobs/<id>/events,
/result and /rejects. A job belongs to the API key that submitted it (its hash; the client
address without API_KEYS): any other caller gets 404, as for a job that does not exist."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint, Response, current_app, g, request, send_file

from server.errors import ApiError
from server.http.auth import (
    client_key,
    presented_token,
    require_api_key,
    require_api_key_or_token,
    token_signer,
)
from server.http.body import READ_STEP, gzipped, inflated, query_version, read_json, too_large
from server.http.context import json_response, sse_response, state
from server.jobs.files import MEDIA
from server.jobs.service import JobService, chunk_rows, jobs_off
from server.model.loaded import LoadedVersion
from server.protocols import native, sse
from server.schemas import JobInputRequest

bp = Blueprint("jobs", __name__)

CSV_TYPES = {"text/csv", "application/csv", "text/plain"}
PARQUET_TYPES = {"application/vnd.apache.parquet", "application/parquet",
                 "application/x-parquet"}
SNIFFED = {"", "application/octet-stream"}
EVENTS_POLL_SECONDS = 0.5


@bp.before_request
def _authorize() -> None:
    if request.endpoint == "jobs.events":
        require_api_key_or_token()
    else:
        require_api_key()
    if current_app.extensions.get("jobs") is None:
        raise jobs_off()


def service() -> JobService:
    return current_app.extensions["jobs"]  # type: ignore[no-any-return]


def owner() -> str:
    """Whose jobs these are: the presented API key's hash (the same for a stream token made
    from that key), else the client address."""
    if state().settings.api_key_list and not presented_token("X-API-Key"):
        token = request.args.get("token")
        if token:  # checked by require_api_key_or_token already
            return "key:" + str(token_signer().loads(token)["k"])
    return client_key()


def _urls(job_id: str) -> dict[str, str]:
    base = f"{request.script_root}/jobs/{job_id}"
    return {"job_id": job_id, "status_url": base, "events_url": f"{base}/events",
            "result_url": f"{base}/result"}


@bp.post("/jobs")
def submit() -> Response:
    jobs = service()
    mimetype = request.mimetype
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return _submit_json()
    try:
        fmt, lv, rows, who = _before_upload(jobs, mimetype)
    except ApiError as err:
        # Refused before the upload was read: close rather than read the rest of it.
        err.headers = {**err.headers, "Connection": "close"}
        raise
    job_id, folder = jobs.staging()
    try:
        upload = save_body(folder / "input.upload", jobs.max_bytes)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    jobs.submit(who, job_id, upload, fmt, lv, rows)
    body = _urls(job_id)
    return json_response(body, 202, headers={"Location": body["status_url"]})


def _before_upload(jobs: JobService, mimetype: str
                   ) -> tuple[str | None, LoadedVersion, int, str]:
    """What the query says (format, version, rows per chunk) and whose job it is, checked
    before a byte of the upload is read: 415, 404, 422, 429."""
    if mimetype in CSV_TYPES:
        fmt: str | None = "csv"
    elif mimetype in PARQUET_TYPES:
        fmt = "parquet"
    elif mimetype in SNIFFED:
        fmt = None  # told by the file's first bytes
    else:
        raise ApiError(415, "unsupported_media_type", f"expected text/csv or "
                       f"application/vnd.apache.parquet, got {mimetype}")
    front = state().front
    name = front.model_name(request.args.get("model"), "/jobs?model=<name>",
                            ["query", "model"])
    g.model = name
    lv = front.resolve(name, query_version() or None)
    g.version = lv.version
    rows = chunk_rows(request.args.get("chunk_rows"))
    who = owner()
    jobs.check_room(who)
    return fmt, lv, rows, who


def _submit_json() -> Response:
    req = native.validate(JobInputRequest, read_json())
    front = state().front
    name = front.model_name(req.model or request.args.get("model"), "'model' in the body",
                            ["model"])
    g.model = name
    lv = front.resolve(name, req.version or query_version() or None)
    g.version = lv.version
    if not req.input.startswith("s3://"):
        raise ApiError(422, "validation_error", "input must be an s3:// URL, or upload the "
                       "file as the body", [{"loc": ["input"], "msg": "not an s3:// URL"}])
    raise ApiError(422, "object_storage_unavailable", "reading a job's input from object "
                   "storage is not available yet: upload the file as the body instead "
                   "(Content-Type text/csv or application/vnd.apache.parquet)")


def save_body(path: Path, limit: int) -> Path:
    """The request body streamed into ``path`` (inflated when sent gzip), never held in
    memory: 413 naming JOB_MAX_BYTES before anything is read when the Content-Length says
    so, else as soon as the bytes arriving pass it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit, "JOB_MAX_BYTES")
    inflating = gzipped(request.environ.get("HTTP_CONTENT_ENCODING", ""))
    request.max_content_length = sys.maxsize  # None would fall back to MAX_BODY_BYTES
    stream = request.stream
    pieces: Iterator[bytes] = iter(lambda: stream.read(READ_STEP), b"")
    size = 0
    try:
        with path.open("wb") as out:
            for piece in inflated(pieces) if inflating else pieces:
                size += len(piece)
                if size > limit:
                    raise too_large(limit, "JOB_MAX_BYTES")
                out.write(piece)
    except OSError as exc:
        raise ApiError(503, "jobs_storage_full", f"cannot store the upload in JOBS_DIR: "
                       f"{exc.strerror or exc}", headers={"Retry-After": "30"}) from exc
    if size == 0:
        raise ApiError(422, "validation_error", "the body is empty: send a CSV file with a "
                       "header row, or a Parquet file")
    return path


@bp.get("/jobs")
def list_jobs() -> Response:
    return json_response({"jobs": [r.view() for r in service().list(owner())]})


@bp.get("/jobs/<job_id>")
def one_job(job_id: str) -> Response:
    return json_response(service().get(owner(), job_id).view())


@bp.delete("/jobs/<job_id>")
def cancel(job_id: str) -> Response:
    return json_response(service().cancel(owner(), job_id).view(), 202)


@bp.get("/jobs/<job_id>/result")
def result(job_id: str) -> Response:
    record, path = service().output(owner(), job_id, "result")
    return _download(path, MEDIA[record.format], f"{job_id}.{record.format}")


@bp.get("/jobs/<job_id>/rejects")
def rejects(job_id: str) -> Response:
    _, path = service().output(owner(), job_id, "rejects")
    return _download(path, MEDIA["csv"], f"{job_id}-rejects.csv")


def _download(path: Path, mimetype: str, name: str) -> Response:
    """The file with ETag and Last-Modified; a Range request gets 206 with those bytes."""
    return send_file(path, mimetype=mimetype, as_attachment=True, download_name=name,
                     conditional=True, etag=True, max_age=0)


@bp.get("/jobs/<job_id>/events")
def events(job_id: str) -> Response:
    jobs, who = service(), owner()
    jobs.get(who, job_id)  # 404 before the stream starts
    st = state()
    st.stream_slot()
    return sse_response(_progress(jobs, who, job_id, st.settings.heartbeat_seconds))


def _progress(jobs: JobService, who: str, job_id: str, ping: float) -> Iterator[str]:
    """An ``event: progress`` each time the job's figures change (polled from Redis, so any
    web worker or host serves it and a restart loses nothing), ``: ping`` while they don't,
    and the whole job as the last event once it has ended."""
    last = None
    sent = time.monotonic()
    while True:
        record = jobs.get(who, job_id)
        if not record.active:
            yield sse.event(record.view())
            return
        figures = record.progress()
        now = time.monotonic()
        if figures != last:
            last, sent = figures, now
            yield sse.event(figures, "progress")
        elif now - sent >= ping:
            sent = now
            yield sse.PING
        time.sleep(EVENTS_POLL_SECONDS)
