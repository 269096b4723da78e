"""Flask glue shared by every blueprint: JSON in and out, request ids, access log, auth,
and the one place where errors become JSON responses."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson
import pydantic_core
from flask import Flask, Request, Response, current_app, g, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import ClientDisconnected, HTTPException

from server import metrics, streaming
from server.config import Settings
from server.errors import ApiError, validation_error
from server.events import EventLog
from server.inference import DataPlane
from server.logs import AccessLog
from server.monitor import WorkerMetrics
from server.registry import ModelRegistry
from server.reloader import Reloader
from server.schemas import error_details

log = logging.getLogger("server.access")
M = TypeVar("M", bound=BaseModel)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout",
    411: "length_required", 413: "body_too_large", 414: "uri_too_long",
    415: "unsupported_media_type", 429: "rate_limited", 431: "headers_too_large",
}


class ServerApp(Flask):
    """Flask, asking once per function (not on every request) whether it is a coroutine."""

    _sync_cache: dict[Any, Any]

    def ensure_sync(self, func: Any) -> Any:
        cache = self.__dict__.setdefault("_sync_cache", {})
        found = cache.get(func)
        if found is None:
            found = cache[func] = super().ensure_sync(func)
        return found


@dataclass
class ServerState:
    """Everything one worker serves with; lives in ``app.extensions``."""

    settings: Settings
    registry: ModelRegistry
    dataplane: DataPlane
    reloader: Reloader
    events: EventLog
    metrics: WorkerMetrics
    started: float
    draining: bool = False  # SIGTERM received: /ready says 503 while requests finish

    def stream_slot(self) -> None:
        """Refuse a new stream when this worker already holds MAX_STREAMS of them."""
        s = self.metrics.streams
        active = s["started"] - s["completed"] - s["cancelled"]
        if active >= self.settings.max_streams:
            raise ApiError(503, "too_many_streams",
                           f"this worker holds {active} streams (MAX_STREAMS); retry shortly",
                           headers={"Retry-After": "1"})


def state() -> ServerState:
    return current_app.extensions["model_server"]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers,
                    content_type="application/json")


def request_id() -> str:
    return g.get("request_id", "")


_ids: list[Any] = []


def _new_id_source() -> None:
    _ids[:] = [os.urandom(8).hex(), itertools.count()]


_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)  # each worker draws its own prefix


def new_request_id() -> str:
    """32 hex characters, unique without a syscall per request: 16 random ones drawn once
    per process and a 64-bit counter."""
    prefix, counter = _ids
    return f"{prefix}{next(counter) & 0xFFFFFFFFFFFFFFFF:016x}"


# Every byte that neither opens, closes nor quotes anything; dropped before counting depth.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')


def json_too_deep(body: bytes, limit: int) -> bool:
    """Whether arrays and objects in a JSON document nest deeper than ``limit``, without
    parsing it: a few C-speed passes over the bytes (about 45 us for a 64 KB batch, some 5%
    of its parse). Malformed JSON gets some answer; the parser refuses it anyway."""
    if b"\\" in body:
        # Pairs first: in a run of backslashes, \" is left exactly when the quote is escaped.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = body.translate(None, _NOT_STRUCTURE)
    if len(marks) <= limit:
        return False
    # Adjacent quotes are the strings holding no bracket; if any quote is left, some string
    # holds brackets: keep only what lies between strings.
    brackets = marks.replace(b'""', b"")
    if b'"' in brackets:
        brackets = b"".join(marks.split(b'"')[::2])
    if len(brackets) <= limit:
        return False
    # '[' and '{' have bit 1 set, ']' and '}' do not: each byte steps the depth by +1 or -1.
    steps = (np.frombuffer(brackets, np.int8) & 2) - 1
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0)) > limit


def refuse_deep_json(raw: bytes, depth: int | None = None) -> None:
    """400 bad_json for a JSON document nested deeper than MAX_JSON_DEPTH (``depth``), before
    any parser or validator recurses into it (request bodies and WebSocket messages alike)."""
    if depth is None:
        depth = state().settings.max_json_depth
    if json_too_deep(raw, depth):
        raise ApiError(400, "bad_json", f"JSON nested deeper than {depth} levels "
                       "(MAX_JSON_DEPTH)")


class BodyRequest(Request):
    """Reads a whole body the same way for every view that calls ``get_data``: a chunked body
    cut at the size limit is refused (413), a client that stalls mid-body gets 408, and a body
    read as JSON that nests deeper than MAX_JSON_DEPTH is refused (400) before any parser or
    validator recurses into it. Streamed bodies (CSV, training data) use ``request.stream``.

    ``install`` gives each app a subclass that knows its MAX_JSON_DEPTH. Every predict reads
    its body here, so the checks look at the WSGI environ directly (no header objects, no
    content-type parsing for a plain JSON body)."""

    _depth_checked = False
    max_json_depth = 32

    def get_data(  # type: ignore[override]
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        if as_text:
            return super().get_data(cache, True, parse_form_data)
        try:
            body = super().get_data(cache, False, parse_form_data)
        except ClientDisconnected as exc:
            # The client socket's read timeout (CLIENT_TIMEOUT_SECONDS) fired mid-body.
            if isinstance(exc.__context__, TimeoutError):
                raise ApiError(408, "request_timeout",
                               "the client stopped sending its request body") from exc
            raise
        environ = self.environ
        if not environ.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in environ:
            limit = self.max_content_length
            if self.content_length is None and limit is not None and len(body) >= limit:
                # A chunked body is cut at the limit rather than refused: refuse it ourselves.
                raise ApiError(413, "body_too_large",
                               f"request body larger than {limit} bytes")
        json_part = None if self._depth_checked else self._json_part(body)
        self._depth_checked = True
        if json_part is not None:
            refuse_deep_json(json_part, self.max_json_depth)
        return body

    def _json_part(self, body: bytes) -> bytes | None:
        """What views will parse as JSON: the head of a binary tensor request (Open Inference
        Protocol), else a body sent as JSON or without a Content-Type; None for the rest."""
        environ = self.environ
        size = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH", "")
        if size.isdigit():
            return body[: int(size)]
        sent = environ.get("CONTENT_TYPE", "")
        if sent == "application/json" or not sent:
            return body
        mimetype = self.mimetype
        if not mimetype or mimetype == "application/json" or mimetype.endswith("+json"):
            return body
        return None


def read_json() -> Any:
    """The request body parsed as JSON (NaN and Infinity parse so they can be refused as 422)."""
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"expected application/json, got {mimetype}")
    body = request.get_data(cache=False)
    if not body.strip():
        raise ApiError(400, "empty_body", "request body is empty: send a JSON object")
    try:
        return pydantic_core.from_json(body, allow_inf_nan=True)
    except ValueError as exc:
        raise ApiError(400, "bad_json", f"malformed JSON: {exc}") from exc


def validate(schema: type[M], payload: Any) -> M:
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object",
                       [{"loc": [], "msg": "expected an object"}])
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        details = error_details(exc.errors())
        first = details[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "validation_error", f"{where}: {first['msg']}", details) from exc


def read_rows(schema: type[M], limit: int) -> M:
    """A body with ``instances``, refused with 413 beyond ``limit`` rows before validation."""
    payload = read_json()
    rows = payload.get("instances") if isinstance(payload, dict) else None
    if isinstance(rows, list) and len(rows) > limit:
        raise ApiError(413, "too_many_rows", f"{len(rows)} rows sent, at most {limit} allowed",
                       [{"loc": ["instances"], "msg": f"at most {limit} rows"}])
    return validate(schema, payload)


def choose_target(
    path_model: str | None, body_model: str | None,
    path_version: str | None, body_version: str | None,
) -> tuple[str, str | int | None]:
    """Model and version of a request: the path wins over the body, the body over ``?version=``."""
    if path_model and body_model and body_model != path_model:
        raise validation_error(f"body names model '{body_model}' but the path '{path_model}'",
                               ["model"])
    name = path_model or body_model or state().settings.default_model
    if not name:
        raise validation_error("name a model: 'model' in the body or /predict/<model>", ["model"])
    version = path_version or body_version
    if not version and request.query_string:  # parse the query only when there is one
        version = request.args.get("version")
    version = version or None
    g.model = name
    return name, version


def counted(source: Iterator[str]) -> Iterator[str]:
    """Count a stream in this worker's figures: started now, then completed or cancelled
    (a client that went away closes the generator at its next write)."""
    metrics = state().metrics
    metrics.stream("started")

    def run() -> Iterator[str]:
        completed = False
        try:
            yield from source
            completed = True
        finally:
            metrics.stream("completed" if completed else "cancelled")

    return run()


def sse(source: Iterator[str]) -> Response:
    return Response(counted(streaming.finish(source)), mimetype="text/event-stream",
                    headers=streaming.SSE_HEADERS)


def _presented_token(*headers: str) -> str:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name in headers:
        if request.headers.get(name):
            return request.headers[name]
    return ""


def _matches(presented: str, allowed: list[str]) -> bool:
    # Compare against every key so the time taken says nothing about which one matched.
    hit = False
    for key in allowed:
        hit |= hmac.compare_digest(presented.encode(), key.encode())
    return hit


def require_admin() -> None:
    token = state().settings.admin_token
    if not token:
        raise ApiError(403, "admin_disabled", "admin endpoints are off: set ADMIN_TOKEN")
    presented = _presented_token("X-Admin-Token")
    if not presented or not _matches(presented, [token]):
        raise ApiError(401, "unauthorized", "admin token missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


def require_api_key() -> None:
    keys = state().settings.api_key_list
    if not keys:
        return
    presented = _presented_token("X-API-Key")
    if not presented or not _matches(presented, keys):
        raise ApiError(401, "unauthorized", "API key missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


def client_key() -> str:
    """Who a rate limit counts: the API key presented (hashed, never stored as is), else
    the client address."""
    presented = _presented_token("X-API-Key")
    if presented:
        return "key:" + hashlib.sha256(presented.encode()).hexdigest()[:16]
    return "addr:" + (request.remote_addr or "unknown")


def install_cors(app: Flask, settings: Settings) -> None:
    """Cross-origin browsers only when configured (off by default)."""
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        from flask_cors import CORS

        CORS(app, origins=origins, expose_headers=["X-Request-ID", "X-Cache", "Retry-After"],
             allow_headers=["Content-Type", "Authorization", "X-API-Key", "X-Request-ID"])


def require_metrics_key() -> None:
    key = state().settings.metrics_key
    if key and not _matches(_presented_token("X-API-Key"), [key]):
        raise ApiError(401, "unauthorized", "metrics key missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


def install_rate_limits(app: Flask, settings: Settings) -> None:
    if not settings.rate_limit:
        return
    from flask_limiter import Limiter

    open_paths = {"/health", "/ready", "/metrics"}
    Limiter(
        client_key, app=app, default_limits=[settings.rate_limit],
        storage_uri=settings.redis_url or "memory://",
        storage_options={"socket_timeout": settings.redis_timeout,  # type: ignore[dict-item]
                         "socket_connect_timeout": settings.redis_timeout},  # type: ignore[dict-item]
        headers_enabled=True, swallow_errors=True,  # Redis down: serve, don't 500
        default_limits_exempt_when=lambda: request.path in open_paths,
    )


def as_api_error(exc: HTTPException) -> ApiError:
    """A werkzeug/Flask HTTP error (404, 405, 413, 429...) as our ApiError."""
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        message = f"request body larger than {state().settings.max_body_bytes} bytes"
    headers = dict(exc.get_headers()) if status in (405, 429) else {}
    headers.pop("Content-Type", None)
    return ApiError(status, HTTP_CODES.get(status, "http_error"), message, headers=headers)


def _error_response(err: ApiError) -> Response:
    body = err.body()
    body["request_id"] = request_id()
    return json_response(body, err.status, err.headers)


def install(app: Flask) -> None:
    """Request ids, access log, body reading and error handlers.

    These hooks run on every request: they fetch the request, ``g`` and the server state
    once each rather than through Flask's context proxies on every access, and count into
    cached Prometheus children (see ``server.metrics.child``)."""
    depth = app.extensions["model_server"].settings.max_json_depth
    app.request_class = type("AppRequest", (BodyRequest,), {"max_json_depth": depth})
    access = AccessLog()

    @app.before_request
    def _start() -> None:
        sent = request.headers.get("X-Request-ID", "")
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        ctx.request_id = sent if REQUEST_ID_RE.match(sent) else new_request_id()
        ctx.t0 = time.perf_counter()
        metrics.IN_FLIGHT.inc()

    @app.teardown_request
    def _done(_: BaseException | None) -> None:
        metrics.IN_FLIGHT.dec()

    @app.after_request
    def _finish(response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        served: ServerState = app.extensions["model_server"]
        rid = ctx.get("request_id", "")
        response.headers["X-Request-ID"] = rid
        if served.draining:
            response.headers["Connection"] = "close"  # let keep-alive clients move on
        now = time.perf_counter()
        latency = (now - ctx.get("t0", now)) * 1000
        status = response.status_code
        served.metrics.observe(latency, status)
        rule = req.url_rule.rule if req.url_rule is not None else None
        route = rule or "unmatched"
        method = req.method if req.method in metrics.METHODS else "other"
        metrics.child(metrics.REQUESTS, route, method, str(status)).inc()
        metrics.child(metrics.LATENCY, route).observe(latency / 1000)
        if access.enabled():
            access.write({
                "request_id": rid, "method": req.method[:16], "route": rule, "path": req.path,
                "status": status, "latency_ms": round(latency, 3), "model": ctx.get("model"),
                "version": ctx.get("version"), "cache": ctx.get("cache"),
            })
        return response

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return _error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error_response(as_api_error(exc))

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"request_id": request_id()})
        return _error_response(ApiError(500, "internal_error", "internal server error"))
