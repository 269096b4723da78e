"""POST /train/stream (admin): incremental training streamed as server-sent events.

The rows come from the model's stored data, a posted CSV, or (``"source": "feedback"``) the
prediction log's labelled rows, written to a temp CSV before the stream starts. Everything a
client can get wrong is checked before the stream starts, so it gets a JSON 4xx; after that,
failures arrive as ``event: error`` and the stream still ends in ``[DONE]``.
"""

from __future__ import annotations

import contextlib
import csv
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, g, request

from server.errors import ApiError, echo, not_found, validation_error
from server.http.auth import require_admin
from server.http.blueprints.predictions import prediction_log, read_log
from server.http.body import read_json
from server.http.context import ServerState, sse_response, state
from server.jobs import export
from server.jobs.training import TARGET, data_path, train_events
from server.model.repository import inside, is_valid_name
from server.protocols import native, sse
from server.schemas import TrainRequest

bp = Blueprint("train", __name__)
bp.before_request(require_admin)

INT_RE = re.compile(r"^[+-]?[0-9]{1,18}$")
QUERY_FIELDS = ("model", "epochs", "source", "since", "version", "model_version")


@bp.post("/train/stream")
def train_stream() -> Response:
    st = state()
    if st.settings.model_dir_remote:  # a new version would land in one host's mirror only
        raise ApiError(409, "repository_read_only", "MODEL_DIR is object storage: train "
                       "elsewhere and upload the new version")
    st.stream_slot()
    posted: Path | None = None
    started: dict[str, Any] = {}
    if request.mimetype == "text/csv":
        req = native.validate(TrainRequest, _query_payload())
        _check_model(st, req.model)
        if req.source == "feedback":
            raise validation_error("source=feedback trains on the prediction log: send no "
                                   "CSV body", ["query", "source"])
        posted = _spool_body(st.settings.max_body_bytes)
        try:
            _check_header(st, req.model, posted)
        except BaseException:
            posted.unlink(missing_ok=True)
            raise
    else:
        # ``?model=...&source=feedback`` with no body reads as the JSON body would.
        payload = _query_payload() if "model" in request.args and not _has_body() \
            else read_json()
        req = native.validate(TrainRequest, payload)
        _check_model(st, req.model)
        if req.source == "feedback":
            posted, started = _spool_feedback(st, req)
        else:
            stored = data_path(st.settings.model_path, req.model)
            if not inside(st.settings.model_path, stored):
                raise not_found("training_data", f"model '{req.model}' has no training data: "
                                "POST a CSV (Content-Type: text/csv) instead")
    source = _train(st, req.model, req.epochs, posted, started)
    response = sse_response(sse.with_heartbeat(source, st.settings.heartbeat_seconds))
    if posted is not None:
        # Also runs when the stream never started; the child has read the file by then.
        response.call_on_close(lambda: posted.unlink(missing_ok=True))
    return response


def _train(st: ServerState, model: str, epochs: int, data: Path | None,
           started: dict[str, Any]) -> Iterator[str]:
    """The SSE events of one run, ``started`` added to the first. Runs outside the request
    context: takes ``st``, not state()."""
    with contextlib.closing(train_events(st.settings.model_path, model, epochs, data)) as events:
        last: dict[str, Any] = {}
        for message in events:
            if message.get("status") == "started":
                message = {**message, **started}
            if "error" in message:
                yield sse.error_event(str(message["error"]),
                                            code=message.get("code", "training_failed"))
                return
            if message.get("status") == "complete":
                version = str(message["version"])
                st.reloader.reload_everywhere(wait=2.0)  # servable in every worker now
                st.events.publish("training_complete", {
                    "model": model, "version": version, "epochs": epochs,
                    "accuracy": last.get("accuracy")})
                yield sse.event({"status": "complete", "version": version})
                return
            last = message
            yield sse.event(message)


def _query_payload() -> dict[str, object]:
    """``?model=&epochs=&source=&since=&version=`` as the JSON body would be (integers as
    ints, so strict mode checks); other parameters (``token``...) are not the body's."""
    payload: dict[str, object] = {k: v for k, v in request.args.items() if k in QUERY_FIELDS}
    epochs = payload.get("epochs")
    if isinstance(epochs, str) and INT_RE.match(epochs):
        payload["epochs"] = int(epochs)
    return payload


def _has_body() -> bool:
    return bool(request.content_length) or \
        "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def _spool_feedback(st: ServerState, req: TrainRequest) -> tuple[Path, dict[str, Any]]:
    """The prediction log's labelled rows of ``req.model`` as a training CSV in a temp file,
    read in a native thread, and what the first event says of them. A 4xx (or 503, the
    database down) when they cannot train a model."""
    plog = prediction_log()
    entry = st.registry.get(req.model)
    lay = export.latest_layout(entry)
    version = export.logged_version(entry, req.version)
    with tempfile.NamedTemporaryFile(prefix="train-feedback-", suffix=".csv",
                                     delete=False) as tmp:
        path = Path(tmp.name)
    try:
        tally = read_log(lambda store: export.feedback_csv(store, lay, version, req.since, path))
        export.require_trainable(tally, lay, plog.inputs)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, {"source": "feedback", "rows": tally.rows,
                  "skipped": dict(tally.skipped), "note": tally.note(lay.model)}


def _check_model(st: ServerState, model: str) -> None:
    g.model = model
    if not is_valid_name(model):
        raise not_found("model", f"unknown model '{echo(model)}'")
    st.registry.get(model)


def _spool_body(limit: int) -> Path:
    """Copy the body to a temp file for the child, in constant memory, 413 past ``limit``."""
    with tempfile.NamedTemporaryFile(prefix="train-", suffix=".csv", delete=False) as tmp:
        path = Path(tmp.name)
        try:
            size = 0
            while chunk := request.stream.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large",
                                   f"request body larger than {limit} bytes")
                tmp.write(chunk)
            if size == 0:
                raise ApiError(400, "empty_body",
                               "request body is empty: send a CSV with a header row")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def _check_header(st: ServerState, model: str, path: Path) -> None:
    """422 up front when the header lacks a feature of the latest version or ``target``."""
    with path.open(newline="", errors="replace") as fh:
        header = {h.strip() for h in next(csv.reader(fh), [])}
    expected = list(st.registry.resolve(model).feature_names or []) + [TARGET]
    missing = [n for n in expected if n not in header]
    if missing:
        raise validation_error(f"CSV header lacks column(s): {', '.join(missing)}",
                               ["header"], f"missing {', '.join(missing)}")
