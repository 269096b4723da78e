"""SSE: POST /predict/stream, POST /predict/csv, GET /stream/events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, request

from server.errors import ApiError
from server.http.auth import require_api_key_or_token
from server.http.body import read_json, read_target, row_features, spool_budget, spool_upload
from server.http.context import adopt_request_id, counted, sse_response, state
from server.http.origin import origin
from server.protocols import native, sse
from server.protocols.csvrows import feature_positions, open_csv, score_csv
from server.runtime import figures
from server.schemas import BatchRequest

bp = Blueprint("stream", __name__)
bp.before_request(require_api_key_or_token)
bp.before_request(lambda: state().stream_slot())


@bp.post("/predict/stream")
def predict_stream() -> Response:
    st = state()
    front = st.front
    payload = read_json(form_ok=True)
    front.check_rows(native.row_count(payload), ["instances"], front.limits.stream_max_rows)
    req = native.validate(BatchRequest, payload, row_features(front, payload))
    adopt_request_id(req.request_id)
    lv = read_target(front, None, req.model, None, req.version, "'model' in the body")
    # Everything that can be wrong with the whole body is answered before the stream starts.
    X = front.matrix(lv, req.instances, ["instances"], front.limits.stream_max_rows)
    return sse_response(sse.prediction_events(
        front.chunk_predictor(lv, ["instances"], origin("stream")),
        X, st.settings.stream_chunk_rows, lambda n: st.figures.stream("rows", n),
    ))


@bp.post("/predict/csv")
def predict_csv() -> Response:
    st = state()
    front = st.front
    mimetype = request.mimetype
    if mimetype and mimetype not in {"text/csv", "text/plain", "application/csv",
                                     "application/octet-stream"}:
        raise ApiError(415, "unsupported_media_type", f"expected text/csv, got {mimetype}")
    name = front.model_name(request.args.get("model"), "/predict/csv?model=<name>",
                            ["query", "model"])
    g.model = name
    lv = front.resolve(name, request.args.get("version") or None)
    g.version = lv.version
    # The whole body is read before the answer starts: a client sends all of it before it
    # reads anything, and an answer written meanwhile would fill its socket and stall both.
    upload = spool_upload(st.settings.csv_max_bytes, "CSV_MAX_BYTES", spool_budget())
    try:
        header, reader = open_csv(upload.file)
        positions = feature_positions(lv, header)

        predict = front.chunk_predictor(lv, ["csv"], origin("csv"))
        chunks = score_csv(lv, upload.file, predict, positions, header, reader)
        if "text/event-stream" in request.headers.get("Accept", ""):
            response = sse_response(_csv_progress(chunks))
        else:
            response = Response(counted(_texts(chunks)), mimetype="text/csv", headers={
                "Content-Disposition": f'attachment; filename="{name}-scored.csv"'})
    except BaseException:
        upload.release()
        raise
    # Runs however the answer ends, also when its body never started.
    response.call_on_close(upload.release)
    return response


def _texts(chunks: Iterator[tuple[str, int, int, int]]) -> Iterator[str]:
    for text, *_ in chunks:
        yield text
        time.sleep(0)


def _csv_progress(chunks: Iterator[tuple[str, int, int, int]]) -> Iterator[str]:
    rows = bad = 0
    for _, rows, bad, read in chunks:
        yield sse.event({"rows": rows, "errors": bad, "bytes": read}, "progress")
        time.sleep(0)
    yield sse.event({"status": "complete", "rows": rows, "errors": bad})


@bp.get("/stream/events")
def server_events() -> Response:
    st = state()
    runtime = st.events.dir
    ping = st.settings.heartbeat_seconds

    def source() -> Iterator[str]:
        yield sse.event({"type": "hello", "models": sorted(st.registry.models)})
        recent: dict[tuple[Any, ...], float] = {}
        last_metrics = last_sent = time.monotonic()
        for batch in st.events.follow(0.2):
            now = time.monotonic()
            for ev in batch:
                # Every worker reloads and reports the same change: tell it once.
                key = (ev.get("type"), ev.get("model"), ev.get("version"))
                if now - recent.get(key, -1e9) > 5:
                    recent[key] = now
                    yield sse.event(ev, ev.get("type"))
                    last_sent = now
            if now - last_metrics >= 1.0:
                last_metrics = last_sent = now
                yield sse.event({"type": "metrics", **figures.summary(runtime)}, "metrics")
            elif now - last_sent >= ping:
                last_sent = now
                yield sse.PING

    return sse_response(source())
