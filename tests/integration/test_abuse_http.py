"""Abuse resistance on a real gunicorn, plain HTTP: HEADs that must not hold stream slots,
who sees /status and the V2 probes, Retry-After only where it means something, ASCII-only
version numbers and errors that do not echo a client's megabytes back."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]
KEY = "k-abuse"


@pytest.fixture(scope="module")
def few_streams(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LiveServer]:
    """One worker holding at most five streams, under API keys."""
    server = LiveServer(tmp_path_factory.mktemp("abuse"), demo_repo, WORKERS="1",
                        MAX_STREAMS="5", API_KEYS=KEY, MODEL_POLL_SECONDS="0").start()
    yield server
    server.stop(quick=True)


@pytest.fixture(scope="module")
def limited(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("limited"), demo_repo, WORKERS="1",
                        API_KEYS=KEY, RATE_LIMIT="10/second", MODEL_POLL_SECONDS="0").start()
    yield server
    server.stop(quick=True)


def _stream_works(server: LiveServer) -> None:
    resp = server.post("/predict/stream", json={"model": "iris", "instances": [ROW, ROW]},
                       headers={"X-API-Key": KEY})
    assert resp.status_code == 200, resp.text
    assert resp.text.rstrip().endswith("data: [DONE]")


def _heads(server: LiveServer, path: str, n: int) -> None:
    """``n`` HEADs over one keep-alive connection of a raw socket."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        reader = raw.makefile("rb")
        try:
            for _ in range(n):
                raw.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n\r\n"
                            .encode())
                status = reader.readline()
                assert status.split()[1] == b"200", status
                while reader.readline() not in (b"\r\n", b""):
                    pass
        finally:
            reader.close()


def test_heads_of_streams_hold_no_slot(few_streams: LiveServer) -> None:
    # Five slots; before the fix each HEAD took one for good and the sixth stream got 503.
    _heads(few_streams, "/stream/events", 1000)
    _stream_works(few_streams)
    status = few_streams.get("/status", headers={"X-API-Key": KEY}).json()["streams"]
    assert status["started"] - status["completed"] - status["cancelled"] == 0


def test_status_needs_a_key_under_api_keys(few_streams: LiveServer) -> None:
    refused = few_streams.fresh("GET", "/status")
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"
    assert "models" not in refused.json()
    assert few_streams.fresh("GET", "/status", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/v2/health/live", "/v2/health/ready"])
def test_probes_are_open_under_api_keys(few_streams: LiveServer, path: str) -> None:
    assert few_streams.fresh("GET", path).status_code == 200


def test_v2_models_still_need_a_key(few_streams: LiveServer) -> None:
    assert few_streams.fresh("GET", "/v2/models/iris").status_code == 401


def test_retry_after_only_with_429_and_503(limited: LiveServer) -> None:
    headers = {"X-API-Key": KEY}
    ok = limited.fresh("POST", "/predict/iris", json=ROW, headers=headers)
    assert ok.status_code == 200
    assert "Retry-After" not in ok.headers
    assert "X-RateLimit-Limit" in ok.headers  # the limiter's other headers stay
    with requests.Session() as s:
        answers = [s.post(limited.url + "/predict/iris", json=ROW, headers=headers,
                          timeout=10) for _ in range(60)]
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [r.status_code for r in answers]
    assert all("Retry-After" in r.headers for r in refused)
    assert all("Retry-After" not in r.headers for r in answers if r.status_code == 200)


@pytest.mark.parametrize(("version", "status"), [
    ("1", 200), ("01", 200),
    ("%D9%A1", 400),          # ARABIC-INDIC DIGIT ONE: int() reads it as 1
    ("%EF%BC%91", 400),       # FULLWIDTH DIGIT ONE
    ("%C2%B9", 400),          # SUPERSCRIPT ONE: str.isdigit() is True
])
def test_tf_serving_versions_are_ascii_digits(live_server: LiveServer, version: str,
                                               status: int) -> None:
    resp = live_server.post(f"/v1/models/iris/versions/{version}:predict",
                            json={"instances": [ROW]})
    assert resp.status_code == status, resp.text


@pytest.mark.parametrize("version", ["%D9%A1", "%EF%BC%91"])
def test_other_doors_do_not_read_other_scripts_digits(live_server: LiveServer,
                                                       version: str) -> None:
    v2 = live_server.post(f"/v2/models/iris/versions/{version}/infer", json={
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW}]})
    assert v2.status_code == 404, v2.text
    native = live_server.post(f"/predict/iris?version={version}", json=ROW)
    assert native.status_code == 404, native.text


HUGE = "m" * 200_000


def _native_long_name(server: LiveServer) -> requests.Response:
    return server.post("/predict", json={"model": HUGE[:60_000], "features": ROW})


def _native_long_label(server: LiveServer) -> requests.Response:
    return server.post("/predict/iris", json={"features": ROW, "version": HUGE[:60_000]})


def _native_long_key(server: LiveServer) -> requests.Response:
    return server.post("/predict/iris", json={"features": ROW, HUGE[:60_000]: 1})


def _tf_long_signature(server: LiveServer) -> requests.Response:
    return server.post("/v1/models/iris:predict", json={
        "instances": [ROW], "signature_name": HUGE[:60_000]})


def _v2_long_output(server: LiveServer) -> requests.Response:
    return server.post("/v2/models/iris/infer", json={
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": ROW}],
        "outputs": [{"name": HUGE[:60_000]}]})


@pytest.mark.parametrize("send", [_native_long_name, _native_long_label, _native_long_key,
                                  _tf_long_signature, _v2_long_output])
def test_errors_cut_what_they_echo(live_server: LiveServer,
                                   send: Callable[[LiveServer], requests.Response]) -> None:
    resp = send(live_server)
    assert 400 <= resp.status_code < 500, resp.text[:300]
    assert len(resp.content) < 3000, resp.text[:300]
    assert "characters)" in resp.text  # says it was cut, and how long the value was


def test_a_refused_upload_closes_the_connection_instead_of_draining_it(
        live_server: LiveServer) -> None:
    """413 before the body: the connection is closed at once, not kept to swallow the 300 MB
    the client announced (gunicorn would read and discard all of it first)."""
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=10) as raw:
        raw.sendall(b"POST /predict/csv?model=iris HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: text/csv\r\nContent-Length: 300000000\r\n\r\nsepal")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413")
    assert b"connection: close" in head
