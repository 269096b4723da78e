"""Abusive uploads on a real gunicorn (issue 24, items 5 and 6): CSV bodies past CSV_MAX_BYTES,
a worker's CSV_SPOOL_MB budget, and malformed chunked bodies, each sent on a raw socket as a
client would, byte for byte."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ADMIN_TOKEN, LiveServer, wait_until

# Starts a server of its own: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

CSV_MAX = 100_000
SPOOL_BYTES = 150_000  # room for one upload of UPLOAD bytes, not two
UPLOAD = 90_000
HEADER = b"sepal_length,sepal_width,petal_length,petal_width\n"
ROW = b"5.1,3.5,1.4,0.2\n"
ADMIN = f"Authorization: Bearer {ADMIN_TOKEN}\r\n"


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One worker, so that every upload counts against the same spool."""
    tmp = tmp_path_factory.mktemp("uploads")
    models = Path(shutil.copytree(demo_repo, tmp / "models"))  # /train/stream may write
    live = LiveServer(tmp, models, WORKERS="1", CSV_MAX_BYTES=str(CSV_MAX),
                      CSV_SPOOL_MB=str(SPOOL_BYTES / (1 << 20)), MODEL_POLL_SECONDS="0",
                      CACHE="off").start()
    yield live
    live.stop(quick=True)


def iris_csv(size: int) -> bytes:
    """An iris CSV of exactly ``size`` bytes: rows, then blank lines (no rows)."""
    rows = HEADER + ROW * ((size - len(HEADER)) // len(ROW))
    return rows + b"\n" * (size - len(rows))


class Answer:
    """An HTTP/1.1 answer read off a raw socket: status, headers, body (de-chunked)."""

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                body, rest = body + rest[:n], rest[n + 2:]
            rest = body
        self.body = rest[: int(self.headers.get("content-length", len(rest)))]

    def json(self) -> dict[str, object]:
        return dict(json.loads(self.body))


def head(path: str, content_type: str, length: int | None = None, extra: str = "") -> bytes:
    size = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{size}\r\n"
            f"{extra}\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def read_answer(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it has sent one whole answer, or closes."""
    sock.settimeout(timeout)
    raw = b""
    while True:
        data = sock.recv(65536)
        raw += data
        if not data or _complete(raw):
            return raw


def _complete(raw: bytes) -> bool:
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head_text = raw[:head_end].lower()
    body = raw[head_end + 4:]
    if b"transfer-encoding: chunked" in head_text:
        return body.endswith(b"0\r\n\r\n")
    for line in head_text.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def read_to_close(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails on timeout)."""
    sock.settimeout(timeout)
    raw = b""
    while data := sock.recv(65536):
        raw += data
    return raw


def post_csv(server: LiveServer, body: bytes) -> requests.Response:
    return server.fresh("POST", "/predict/csv?model=iris", data=body,
                        headers={"Content-Type": "text/csv"})


# --- CSV_MAX_BYTES -----------------------------------------------------------------------

def test_a_declared_length_past_csv_max_bytes_is_refused_before_the_body_is_sent(
    server: LiveServer,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head("/predict/csv?model=iris", "text/csv", CSV_MAX + 1))
        t0 = time.monotonic()
        answer = Answer(read_answer(sock))  # not one byte of the body sent
    assert time.monotonic() - t0 < 2
    assert answer.status == 413, answer.body
    payload = answer.json()
    assert payload["code"] == "body_too_large"
    assert payload["error"] == f"request body larger than {CSV_MAX} bytes (CSV_MAX_BYTES)"


def test_a_chunked_csv_growing_past_csv_max_bytes_is_refused_while_it_is_sent(
    server: LiveServer,
) -> None:
    piece = ROW * 500  # 8 KB
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head("/predict/csv?model=iris", "text/csv") + chunk(HEADER))
        raw = b""
        while sent < 50 * CSV_MAX and not _complete(raw):
            sock.sendall(chunk(piece))
            sent += len(piece)
            time.sleep(0.002)
            try:
                raw += sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        if not _complete(raw):
            raw += read_answer(sock)
    answer = Answer(raw)
    assert answer.status == 413, answer.body
    assert answer.json()["code"] == "body_too_large"
    assert "CSV_MAX_BYTES" in str(answer.json()["error"])
    assert sent < 10 * CSV_MAX, f"answered only after {sent} bytes"
    assert post_csv(server, iris_csv(CSV_MAX)).status_code == 200  # at the limit: scored


# --- CSV_SPOOL_MB ------------------------------------------------------------------------

class HeldUpload:
    """A CSV upload of UPLOAD declared bytes, a first part sent, the rest held back."""

    def __init__(self, server: LiveServer) -> None:
        self.body = iris_csv(UPLOAD)
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        self.sock.sendall(head("/predict/csv?model=iris", "text/csv", UPLOAD) + self.body[:1000])

    def finish(self) -> Answer:
        self.sock.sendall(self.body[1000:])
        return Answer(read_answer(self.sock, 30))

    def close(self) -> None:
        self.sock.close()


def refused_for_spool(server: LiveServer) -> bool:
    resp = post_csv(server, iris_csv(UPLOAD))
    if resp.status_code == 503:
        assert resp.json()["code"] == "spool_full" and resp.headers["Retry-After"] == "1"
        return True
    assert resp.status_code == 200, resp.text
    return False


def test_a_full_spool_refuses_a_second_upload_until_the_first_is_answered(
    server: LiveServer,
) -> None:
    first = HeldUpload(server)
    try:
        wait_until(lambda: refused_for_spool(server), 10)  # the first one holds the spool
        assert refused_for_spool(server)
        answer = first.finish()
        assert answer.status == 200
        assert answer.body.count(b"\n") == (UPLOAD - len(HEADER)) // len(ROW) + 1
    finally:
        first.close()
    wait_until(lambda: not refused_for_spool(server), 5)  # given back with the answer
    assert not refused_for_spool(server)


def test_a_client_gone_mid_upload_gives_its_spool_back(server: LiveServer) -> None:
    first = HeldUpload(server)
    try:
        wait_until(lambda: refused_for_spool(server), 10)
    finally:
        first.close()  # gone with 89,000 bytes of its body unsent
    wait_until(lambda: not refused_for_spool(server), 10)


def test_a_client_gone_before_reading_its_answer_gives_its_spool_back(
    server: LiveServer,
) -> None:
    body = iris_csv(UPLOAD)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(head("/predict/csv?model=iris", "text/csv", len(body)) + body)
        sock.settimeout(10)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")  # the answer has started
    wait_until(lambda: not refused_for_spool(server), 10)


# --- malformed chunked bodies ------------------------------------------------------------

JSON = "application/json"
# (path, content type, extra header lines) of every endpoint that reads a body
READERS: list[tuple[str, str, str]] = [
    ("/predict/iris", JSON, ""),
    ("/predict", JSON, ""),
    ("/predict/iris/versions/1", JSON, ""),
    ("/predict/batch", JSON, ""),
    ("/predict/ab", JSON, ""),
    ("/predict/stream", JSON, ""),
    ("/predict/csv?model=iris", "text/csv", ""),
    ("/predict/csv?model=iris", "text/csv", "Accept: text/event-stream\r\n"),
    ("/v1/models/iris:predict", JSON, ""),
    ("/v1/models/iris/versions/2:classify", JSON, ""),
    ("/v2/models/iris/infer", JSON, ""),
    ("/v2/models/iris/infer", "application/octet-stream",
     "Inference-Header-Content-Length: 10\r\n"),
    ("/experiments/iris-ab/outcome", JSON, ""),
    ("/train/stream", JSON, ADMIN),
    ("/train/stream?model=iris&epochs=1", "text/csv", ADMIN),
]
# (id, chunked body after the head, words of the error)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("chunk-size-not-hex", b"zz\r\n", "Invalid chunk size"),
    ("negative-chunk-size", b"-1\r\n", "Invalid chunk size"),
    ("chunk-without-crlf", b"4\r\n[5.1XY", "chunk terminator"),
    ("bad-chunk-extension", b"4;=x\r\n[5.1\r\n", "chunk extension"),
    ("endless-chunk-size-line", b"1" * 10_000, "Invalid chunk size"),
    ("bad-trailer", b"0\r\nno colon here\r\n\r\n", "malformed"),
]


def send_malformed(server: LiveServer, path: str, content_type: str, extra: str,
                   body: bytes) -> tuple[Answer, bytes]:
    """The answer to a malformed chunked body, and what followed it before the server
    closed the connection (which it must: the next request's start is unknown)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head(path, content_type, None, extra) + body)
        raw = read_to_close(sock)
    end = raw.find(b"\r\n\r\n") + 4
    length = int(Answer(raw).headers.get("content-length", len(raw) - end))
    return Answer(raw), raw[end + length:]


def assert_bad_body(answer: Answer, path: str, words: str) -> None:
    assert answer.status == 400, (path, answer.status, answer.body)
    assert answer.headers["content-type"] == "application/json", answer.headers
    payload = answer.json()
    assert words in str(payload["error"]), payload
    if not path.startswith(("/v1", "/v2")):  # their error shape is {"error": ...} alone
        assert payload["code"] == "bad_body", payload


@pytest.mark.parametrize(("path", "content_type", "extra"), READERS,
                         ids=[f"{r[0]}{'-sse' if 'Accept' in r[2] else ''}"
                              f"{'-binary' if 'Inference' in r[2] else ''}" for r in READERS])
def test_a_malformed_chunk_size_is_a_400_on_every_endpoint(
    server: LiveServer, path: str, content_type: str, extra: str,
) -> None:
    answer, after = send_malformed(server, path, content_type, extra, b"zz\r\n")
    assert_bad_body(answer, path, "Invalid chunk size")
    assert after == b""  # one answer, then the connection closed
    assert server.fresh("POST", "/predict/iris", json=[5.1, 3.5, 1.4, 0.2]).status_code == 200


@pytest.mark.parametrize(("body", "words"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("path", ["/predict/iris", "/predict/csv?model=iris"])
def test_every_malformed_chunked_body_is_a_400(server: LiveServer, path: str, body: bytes,
                                               words: str) -> None:
    content_type = "text/csv" if "csv" in path else JSON
    answer, after = send_malformed(server, path, content_type, "", body)
    assert_bad_body(answer, path, words)
    assert after == b""


@pytest.mark.parametrize("path", ["/predict/iris", "/predict/csv?model=iris"])
def test_a_chunked_body_cut_short_is_a_400(server: LiveServer, path: str) -> None:
    content_type = "text/csv" if "csv" in path else JSON
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head(path, content_type) + b"40\r\n[5.1,3.5")
        sock.shutdown(socket.SHUT_WR)  # the client sends no more, and waits for the answer
        answer = Answer(read_to_close(sock))
    assert_bad_body(answer, path, "ends early")


def test_malformed_bodies_leave_no_traceback_and_the_server_answering(
    server: LiveServer,
) -> None:
    for _ in range(20):
        send_malformed(server, "/predict/batch", JSON, "", b"zz\r\n")
    resp = server.fresh("POST", "/predict/batch",
                        json={"model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert resp.status_code == 200
    log = server.log_text()
    assert "Traceback" not in log and "internal_error" not in log, log[-3000:]
