"""Reading a request body once, the same way for every view: size and depth limits, JSON,
validation, and the model a request names."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from flask import Request, g, request
from werkzeug.exceptions import ClientDisconnected

from server.errors import ApiError, validation_error
from server.http.context import state
from server.model.loaded import LoadedVersion
from server.protocols import native
from server.serving.frontdoor import FrontDoor

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


def inflate(body: bytes, coding: str, limit: int | None) -> bytes:
    """A ``Content-Encoding: gzip`` body, inflated; MAX_BODY_BYTES applies to what comes
    out, and inflating stops one byte past it, so a gzip bomb costs at most the limit in
    memory (413), never the whole of it."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Encoding {coding!r} is not supported: send gzip or none")
    inflater = zlib.decompressobj(wbits=31)  # gzip framing
    cap = (limit if limit is not None else 1 << 62) + 1
    try:
        out = inflater.decompress(body, cap)
    except zlib.error as exc:
        raise ApiError(400, "bad_gzip", f"the gzip body cannot be read: {exc}") from exc
    if len(out) >= cap:
        raise ApiError(413, "body_too_large",
                       f"request body larger than {limit} bytes once inflated")
    if not inflater.eof:
        raise ApiError(400, "bad_gzip", "the gzip body ends before its end")
    return out


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
        coding = environ.get("HTTP_CONTENT_ENCODING")
        if coding is not None:
            body = inflate(body, coding, self.max_content_length)
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


FORM = "application/x-www-form-urlencoded"  # what `curl -d` sends unless told otherwise


def read_json(form_ok: bool = False) -> Any:
    """The request body parsed as JSON (NaN and Infinity parse so they can be refused as 422).

    With ``form_ok`` (the prediction endpoints), a JSON body sent with curl's default form
    type is read as JSON, as TF Serving does: a pasted ``curl -d '{...}'`` works. Not when a
    browser sent it (an Origin header): a cross-site page cannot use a form post to run
    predictions. Admin and outcome endpoints are always strict."""
    mimetype = request.mimetype
    # A browser names the page's origin on a cross-site post; curl sends no Origin.
    as_form = form_ok and mimetype == FORM and "HTTP_ORIGIN" not in request.environ
    if mimetype and not as_form and mimetype != "application/json" \
            and not mimetype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"expected application/json, got {mimetype}: send the header "
                       "'Content-Type: application/json' (curl --json '...')")
    body = request.get_data(cache=False)
    if as_form:  # not checked on the way in: only JSON-typed bodies are
        refuse_deep_json(body)
    return native.parse_json(body)


def read_target(front: FrontDoor, path_model: str | None, body_model: str | None,
                path_version: str | None, body_version: str | None,
                where: str) -> LoadedVersion:
    """The version a validated request names: the path wins over the body, the body over
    ``?version=``; ``where`` tells a client that named no model how to name one."""
    if path_model and body_model and body_model != path_model:
        raise validation_error(f"body names model '{body_model}' but the path '{path_model}'",
                               ["model"])
    name = front.model_name(path_model or body_model, where)
    g.model = name
    version = path_version or body_version
    if not version and request.query_string:  # parse the query only when there is one
        version = query_version()
    lv = front.resolve(name, version or None)
    g.version = lv.version
    return lv


def query_version() -> str | None:
    """``?version=`` or the guides' ``?model_version=``."""
    args = request.args
    return args.get("version") or args.get("model_version")


def row_features(front: FrontDoor, payload: Any, path_model: str | None = None,
                 path_version: str | None = None) -> Callable[[], tuple[str, ...] | None]:
    """The feature names of the version a body seems to name, looked up only when its
    validation failed (so a row's bad value can name its feature); None when that version
    cannot be found. A request's errors keep their order: the body first, then the target."""

    def names() -> tuple[str, ...] | None:
        try:
            body_model, body_version = native.named_target(payload)
            name = path_model or body_model or front.limits.default_model
            version = path_version or body_version or query_version() or None
            return front.resolve(name, version).feature_names if name else None
        except ApiError:
            return None

    return names
