"""The prediction log over HTTP: GET /predictions (admin), POST /feedback and
GET /models/<m>/versions/<v>/quality (API key)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from flask import Blueprint, Response, g, request

from server.errors import ApiError, echo, validation_error
from server.http.app import REQUEST_ID_RE
from server.http.auth import require_admin, require_api_key
from server.http.body import read_json
from server.http.context import json_response, state
from server.http.origin import key_hash
from server.protocols import native
from server.runtime.offload import offload
from server.schemas import FeedbackBatch, FeedbackItem, parse_time
from server.serving.logstore import LogStore, LogUnavailable, Query
from server.serving.predlog import PredictionLog, classifier_quality, regressor_quality

bp = Blueprint("predictions", __name__)
T = TypeVar("T")
MAX_LIMIT = 1000


def prediction_log() -> PredictionLog:
    log = state().front.log
    if log is None:
        raise ApiError(404, "prediction_log_off",
                       "the prediction log is off on this server (PREDICTION_LOG=off)")
    return log


READ_WAIT = 5.0  # seconds a read waits for one of the worker's read slots


def read_log(fn: Callable[[LogStore], T]) -> T:
    """``fn`` on a connection of its own (no migration, statements cut at 10 s), in a
    native thread; the database down is a 503, as is waiting over 5 s for a read slot."""
    plog = prediction_log()
    store = LogStore(plog.store.url, reader=True)

    def run() -> T:
        try:
            return fn(store)
        finally:
            store.close()

    if not plog.reads.acquire(timeout=READ_WAIT):
        raise ApiError(503, "prediction_log_busy", "the prediction log is answering other "
                       "reads; retry shortly", headers={"Retry-After": "1"})
    try:
        return offload(run)
    except LogUnavailable as exc:
        raise ApiError(503, "prediction_log_unavailable",
                       f"the prediction log's database is unavailable: {exc}",
                       headers={"Retry-After": "5"}) from exc
    finally:
        plog.reads.release()


def _time(name: str) -> float | None:
    """A query time: ISO 8601 (``2026-12-03T10:00:00Z``; no zone = UTC) or Unix seconds."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_time(raw)
    except ValueError as exc:
        raise validation_error(f"{name}: {exc}", ["query", name]) from None


def _int(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise validation_error(f"{name}: an integer from {low} to {high}, not '{echo(raw)}'",
                               ["query", name])
    return int(raw)


def _request_id() -> str | None:
    raw = request.args.get("request_id")
    if not raw:
        return None
    if not REQUEST_ID_RE.match(raw):
        raise validation_error(f"request_id: not a request id: '{echo(raw)}'",
                               ["query", "request_id"])
    return raw


def _cursor() -> tuple[float, int] | None:
    """``?cursor=`` as a previous answer's ``next`` gave it: the last row's time and id."""
    raw = request.args.get("cursor")
    if not raw:
        return None
    ts, _, row_id = raw.partition("_")
    try:
        when, ident = float(ts), int(row_id)
    except ValueError:
        raise validation_error(f"cursor: not a cursor from 'next': '{echo(raw)}'",
                               ["query", "cursor"]) from None
    if not math.isfinite(when) or not 0 <= ident < 2**63 or not row_id.isascii():
        raise validation_error("cursor: not a cursor from 'next'", ["query", "cursor"])
    return when, ident


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _record(row: dict[str, Any]) -> dict[str, Any]:
    feedback = None
    if row["feedback_ts"] is not None:
        feedback = {"label": row["true_label"], "value": row["true_value"],
                    "time": _iso(row["feedback_ts"])}
    return {
        "id": row["id"], "time": _iso(row["ts"]), "request_id": row["request_id"],
        "row": row["row_index"], "model": row["model"], "version": row["version"],
        "door": row["door"], "experiment": row["experiment"], "arm": row["arm"],
        "api_key": row["api_key"],
        "features": orjson.loads(row["features"]) if row["features"] is not None else None,
        "features_sha256": row["features_hash"], "output": orjson.loads(row["output"]),
        "model_ms": row["model_ms"],
        "cache_hit": None if row["cache_hit"] is None else bool(row["cache_hit"]),
        "feedback": feedback,
    }


@bp.get("/predictions")
def predictions() -> Response:
    """Newest first; ``next`` is the cursor of the following page (``?cursor=``)."""
    require_admin()
    limit = _int("limit", 100, 1, MAX_LIMIT) or 100
    args = request.args
    q = Query(model=args.get("model") or None, version=args.get("version") or None,
              since=_time("since"), until=_time("until"),
              request_id=_request_id(),
              before=_cursor(), limit=limit)
    rows = read_log(lambda store: store.query(q))
    nxt = f"{rows[-1]['ts']!r}_{rows[-1]['id']}" if len(rows) == limit else None
    return json_response({"predictions": [_record(r) for r in rows], "next": nxt})


@bp.post("/feedback")
def feedback() -> Response:
    """The truth for logged predictions; an unknown request id is reported for its item and
    does not fail the others."""
    require_api_key()
    prediction_log()
    payload = read_json()
    if isinstance(payload, dict) and "items" in payload:
        items = native.validate(FeedbackBatch, payload).items
    else:
        items = [native.validate(FeedbackItem, payload)]
    truths = [(i.request_id, i.row,
               None if i.label is None else str(i.label), i.value) for i in items]
    owner = key_hash()  # under API_KEYS a key labels only what it was answered
    matched = read_log(lambda store: store.feedback(truths, owner))
    results = [{"request_id": i.request_id, "row": i.row,
                "status": "recorded" if n else "not_found"}
               for i, n in zip(items, matched)]
    recorded = sum(1 for r in results if r["status"] == "recorded")
    return json_response({"recorded": recorded, "not_found": len(results) - recorded,
                          "results": results})


@bp.get("/models/<model>/versions/<version>/quality")
def quality(model: str, version: str) -> Response:
    """Accuracy and per-class precision/recall (classifiers) or MAE/RMSE (regressors) over
    the labelled predictions of one version, since ``?since=``."""
    require_api_key()
    prediction_log()
    g.model = model
    lv = state().front.resolve(model, version)
    g.version = lv.version
    since = _time("since")
    body: dict[str, Any] = {"model": lv.name, "version": lv.version, "task": lv.task,
                            "since": _iso(since)}
    if lv.task == "classification":
        confusion = read_log(lambda store: store.confusion(lv.name, lv.version, since))
        body.update(classifier_quality(confusion, lv.class_names))
    else:
        count, mae, mse = read_log(lambda store: store.errors(lv.name, lv.version, since))
        body.update(regressor_quality(count, mae, mse))
    return json_response(body)
