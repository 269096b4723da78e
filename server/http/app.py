"""The hooks every request goes through (request id, metrics, access line) and the one place
where errors become responses, in the native shape or a protocol's own."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from server.errors import ApiError
from server.http.body import BodyRequest
from server.http.context import ServerState, json_response, new_request_id, request_id, state
from server.protocols import native
from server.runtime import prometheus
from server.runtime.logs import AccessLog

log = logging.getLogger("server.access")


REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout",
    411: "length_required", 413: "body_too_large", 414: "uri_too_long",
    415: "unsupported_media_type", 429: "rate_limited", 431: "headers_too_large",
}


# Errors answered before the body was read to its end.
UNREAD_BODY = frozenset({"bad_body", "spool_full"})


def as_api_error(exc: HTTPException) -> ApiError:
    """A werkzeug/Flask HTTP error (404, 405, 413, 429...) as our ApiError."""
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        message = f"request body larger than {state().settings.max_body_bytes} bytes"
    headers = dict(exc.get_headers()) if status in (405, 429) else {}
    headers.pop("Content-Type", None)
    return ApiError(status, HTTP_CODES.get(status, "http_error"), message, headers=headers)


ErrorShape = Callable[[ApiError, str], tuple[int, dict[str, Any]]]


def error_handlers(scope: Flask | Blueprint, shape: ErrorShape) -> None:
    """Every error raised in ``scope`` (ours, werkzeug's 404/405/413..., or a crash) as one
    response in the protocol's ``shape``: the app gets the native one, the TF Serving and
    Open Inference blueprints their own."""

    def render(err: ApiError) -> Response:
        prometheus.child(prometheus.ERRORS, err.code).inc()
        status, body = shape(err, request_id())
        headers = err.headers
        if err.status in (408, 413) or err.code in UNREAD_BODY:
            # What is left of the body is not worth reading: close after the answer.
            headers = {**headers, "Connection": "close"}
        return json_response(body, status, headers)

    @scope.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return render(err)

    @scope.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return render(as_api_error(exc))

    @scope.errorhandler(Exception)
    def _crash(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"request_id": request_id()})
        return render(ApiError(500, "internal_error", "internal server error"))



def install_compression(app: Flask) -> None:
    """gzip for JSON answers over 1 KiB to clients that accept it (flask-compress): a
    1,000-row batch with probabilities is ~200 KB of JSON. Streams are never compressed
    (each event must reach the client as it is written); ``Vary: Accept-Encoding`` is set on
    every answer that could have been compressed. flask-compress is called from the app's
    one after-request hook (``install``), and only for such answers: a one-row answer is
    never compressed and varies with nothing, so it skips the extension's header work."""
    from flask_compress import Compress

    app.config.update(COMPRESS_MIMETYPES=["application/json"], COMPRESS_MIN_SIZE=COMPRESS_MIN,
                      COMPRESS_STREAMS=False, COMPRESS_ALGORITHM=["gzip"], COMPRESS_LEVEL=5,
                      COMPRESS_REGISTER=False)
    app.extensions["compress_answer"] = Compress(app).after_request


COMPRESS_MIN = 1024


def install(app: Flask) -> None:
    """Request ids, access log, body reading and error handlers.

    These hooks run on every request: they fetch the request, ``g`` and the server state
    once each rather than through Flask's context proxies on every access, and count into
    cached Prometheus children (see ``server.runtime.prometheus.child``)."""
    depth = app.extensions["model_server"].settings.max_json_depth
    app.request_class = type("AppRequest", (BodyRequest,), {"max_json_depth": depth})
    access = AccessLog()

    @app.before_request
    def _start() -> None:
        sent = request.headers.get("X-Request-ID", "")
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        ctx.request_id = sent if REQUEST_ID_RE.match(sent) else new_request_id()
        ctx.t0 = time.perf_counter()
        prometheus.IN_FLIGHT.inc()

    @app.teardown_request
    def _done(_: BaseException | None) -> None:
        prometheus.IN_FLIGHT.dec()

    @app.after_request
    def _finish(response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]
        ctx = g._get_current_object()  # type: ignore[attr-defined]
        served: ServerState = app.extensions["model_server"]
        compress = app.extensions.get("compress_answer")
        if compress is not None and not response.is_streamed \
                and (response.content_length or 0) >= COMPRESS_MIN \
                and response.mimetype == "application/json":
            response = compress(response)
        headers = response.headers
        rid = ctx.get("request_id", "")
        headers.add("X-Request-ID", rid)  # add: no earlier value to look for and replace
        if served.front.draining:
            headers["Connection"] = "close"  # let keep-alive clients move on
        now = time.perf_counter()
        latency = (now - ctx.get("t0", now)) * 1000
        model_seconds = ctx.get("model_seconds")
        headers.add("Server-Timing",
                    f"total;dur={latency:.3f}" if model_seconds is None
                    else f"model;dur={model_seconds * 1000:.3f}, total;dur={latency:.3f}")
        status = response.status_code
        served.figures.observe(latency, status)
        rule = req.url_rule.rule if req.url_rule is not None else None
        route = rule or "unmatched"
        method = req.method if req.method in prometheus.METHODS else "other"
        prometheus.child(prometheus.REQUESTS, route, method, str(status)).inc()
        prometheus.child(prometheus.LATENCY, route).observe(latency / 1000)
        if access.enabled():
            access.write({
                "request_id": rid, "method": req.method[:16], "route": rule, "path": req.path,
                "status": status, "latency_ms": round(latency, 3), "model": ctx.get("model"),
                "version": ctx.get("version"), "cache": ctx.get("cache"),
            })
        return response

    error_handlers(app, native.error_answer)
