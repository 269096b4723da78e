"""Reading a request body once, the same way for every view: size and depth limits, JSON,
validation, and the model a request names; uploads spooled to disk within a budget."""

from __future__ import annotations

import io
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import numpy as np
from flask import Request, current_app, g, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected
from werkzeug.utils import cached_property
from werkzeug.wsgi import get_input_stream

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


def gzipped(coding: str) -> bool:
    """Whether a Content-Encoding is gzip (False for none); 415 for any other."""
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return False
    if coding not in ("gzip", "x-gzip"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Encoding {coding!r} is not supported: send gzip or none")
    return True


def inflate(body: bytes, coding: str, limit: int | None) -> bytes:
    """A ``Content-Encoding: gzip`` body, inflated; MAX_BODY_BYTES applies to what comes
    out, and inflating stops one byte past it, so a gzip bomb costs at most the limit in
    memory (413), never the whole of it."""
    if not gzipped(coding):
        return body
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


def body_error(exc: BaseException) -> ApiError | None:
    """A failed read of the request body as the client's error, or None when it is not one.

    gunicorn parses a chunked body while the app reads it, so its parse errors (a chunk size
    that is not hex, a chunk without its CRLF, a bad extension or trailer) reach the view: 400
    ``bad_body`` naming the problem, as a body cut short is. A client that stalls mid-body is
    408 (the socket's CLIENT_TIMEOUT_SECONDS fired). werkzeug reports both of the latter as
    ClientDisconnected, the socket's error as its context."""
    cause = exc.__context__ if isinstance(exc, ClientDisconnected) else exc
    if isinstance(cause, TimeoutError):
        return ApiError(408, "request_timeout", "the client stopped sending its request body")
    if isinstance(cause, ParseException):
        return ApiError(400, "bad_body", f"the request body is malformed: {str(cause)[:100]}")
    if isinstance(exc, ClientDisconnected) or isinstance(cause, NoMoreData):
        return ApiError(400, "bad_body",
                        "the request body ends early: the client closed the connection")
    return None


class CheckedBody(io.RawIOBase):
    """The request body as every view reads it (``request.stream``, and ``get_data`` through
    it), with failures to read it turned into the client's errors (``body_error``). After one,
    gunicorn closes the connection: where the next request would start is unknown."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self._stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        try:
            return self._stream.read(-1 if size is None else size)
        except Exception as exc:
            error = body_error(exc)
            if error is None:
                raise
            raise error from exc

    def readline(self, size: int | None = -1, /) -> bytes:
        try:
            return self._stream.readline(-1 if size is None else size)
        except Exception as exc:
            error = body_error(exc)
            if error is None:
                raise
            raise error from exc

    def readinto(self, buffer: Any, /) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class BodyRequest(Request):
    """Reads a whole body the same way for every view that calls ``get_data``: a chunked body
    cut at the size limit is refused (413), a malformed one is refused (400), a client that
    stalls mid-body gets 408, and a body read as JSON that nests deeper than MAX_JSON_DEPTH is
    refused (400) before any parser or validator recurses into it. Streamed bodies (CSV,
    training data) use ``request.stream``, which reports a malformed body the same way.

    ``install`` gives each app a subclass that knows its MAX_JSON_DEPTH. Every predict reads
    its body here, so the checks look at the WSGI environ directly (no header objects, no
    content-type parsing for a plain JSON body)."""

    _depth_checked = False
    max_json_depth = 32

    @cached_property
    def stream(self) -> IO[bytes]:  # type: ignore[override]
        """werkzeug's guarded input stream (Content-Length, max_content_length), checked."""
        raw = get_input_stream(self.environ, max_content_length=self.max_content_length)
        return cast(IO[bytes], CheckedBody(raw))

    def get_data(  # type: ignore[override]
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        if as_text:
            return super().get_data(cache, True, parse_form_data)
        environ = self.environ
        body = self._whole_body(cache)
        if body is None:
            body = super().get_data(cache, False, parse_form_data)
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

    def _whole_body(self, cache: bool) -> bytes | None:
        """A plain body of a declared length (what every one-row predict sends) read straight
        from ``wsgi.input`` (in one call under gunicorn), or None for werkzeug's path
        (chunked, compressed, over MAX_BODY_BYTES, read before, or cached already)."""
        environ = self.environ
        size = environ.get("CONTENT_LENGTH")
        if not size or not size.isdigit() or "HTTP_TRANSFER_ENCODING" in environ \
                or "HTTP_CONTENT_ENCODING" in environ or "stream" in self.__dict__ \
                or getattr(self, "_cached_data", None) is not None:
            return None
        length, limit = int(size), self.max_content_length
        if limit is not None and length > limit:
            return None  # werkzeug's path answers the 413
        stream = CheckedBody(environ["wsgi.input"])  # its read failures are the client's
        body = stream.read(length) if length else b""
        while len(body) < length:  # gunicorn reads it all at once; other servers may not
            more = stream.read(length - len(body))
            if not more:
                break
            body += more
        if len(body) != length:
            raise ApiError(400, "bad_body",
                           "the request body ends early: the client closed the connection")
        if cache:
            self._cached_data = body
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


SPOOL_MEMORY = 1 << 20  # an upload beyond 1 MB is spooled to disk, not kept in memory
READ_STEP = 1 << 16  # bytes of an upload read from the socket at a time
INFLATE_STEP = 1 << 20  # most bytes inflated at a time from a gzip upload


class SpoolBudget:
    """The bytes of uploads that one worker holds at once (CSV_SPOOL_MB): taken as an upload
    arrives, given back when it is done with. One per app (``spool_budget``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


def spool_budget() -> SpoolBudget:
    """This worker's CSV_SPOOL_MB budget, made with the first upload (after the fork)."""
    extensions = current_app.extensions
    budget: SpoolBudget | None = extensions.get("upload_spool")
    if budget is None:
        mb = state().settings.csv_spool_mb
        budget = extensions["upload_spool"] = SpoolBudget(int(mb * (1 << 20)))
    return budget


class SpooledUpload:
    """A request body copied to a temporary file (in memory up to SPOOL_MEMORY, then on
    disk), its size held against the worker's budget until ``release``: every way out calls
    it, an error before the answer, the answer's end, a client gone mid-answer."""

    def __init__(self, budget: SpoolBudget) -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self.held = 0
        self._budget = budget

    def hold(self, size: int) -> None:
        """Hold ``size`` more bytes: 503 while other uploads fill the budget, 413 when the
        budget could never hold this one."""
        budget = self._budget
        if self.held + size > budget.limit:
            raise ApiError(413, "body_too_large", f"request body larger than {budget.limit} "
                           "bytes, all the uploads one worker may hold (CSV_SPOOL_MB)")
        if not budget.take(size):
            raise ApiError(503, "spool_full", f"this worker holds {budget.held} bytes of "
                           "uploads (CSV_SPOOL_MB); retry shortly", headers={"Retry-After": "1"})
        self.held += size

    def release(self) -> None:
        """Delete the file and give its bytes back (again: nothing more)."""
        self.file.close()
        held, self.held = self.held, 0
        self._budget.give(held)


def spool_upload(limit: int, setting: str, budget: SpoolBudget) -> SpooledUpload:
    """The request body in a SpooledUpload, rewound; MAX_BODY_BYTES does not apply to it.

    More than ``limit`` bytes (inflated, when sent gzip) is 413 naming ``setting``: before
    anything is read when the Content-Length says so, else as the body arrives. A declared
    length is held against ``budget`` at once, so a full spool refuses an upload before it is
    sent; bytes beyond it (chunked, or inflated) are held as they arrive."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit, setting)
    inflating = gzipped(request.environ.get("HTTP_CONTENT_ENCODING", ""))
    request.max_content_length = sys.maxsize  # None would fall back to MAX_BODY_BYTES
    stream = request.stream
    pieces: Iterator[bytes] = iter(lambda: stream.read(READ_STEP), b"")
    upload = SpooledUpload(budget)
    try:
        upload.hold(declared or 0)
        size = 0
        for piece in inflated(pieces) if inflating else pieces:
            size += len(piece)
            if size > limit:
                raise too_large(limit, setting)
            if size > upload.held:
                upload.hold(size - upload.held)
            upload.file.write(piece)
        upload.file.seek(0)
    except BaseException:
        upload.release()
        raise
    return upload


def too_large(limit: int, setting: str) -> ApiError:
    return ApiError(413, "body_too_large", f"request body larger than {limit} bytes ({setting})")


def inflated(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """A gzip body's pieces inflated, INFLATE_STEP bytes at most at a time: a gzip bomb is
    counted (and refused at the limit) as it inflates, never held whole."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        for piece in pieces:
            while piece:
                yield inflater.decompress(piece, INFLATE_STEP)
                piece = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ApiError(400, "bad_gzip", f"the gzip body cannot be read: {exc}") from exc
    if not inflater.eof:
        raise ApiError(400, "bad_gzip", "the gzip body ends before its end")


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
