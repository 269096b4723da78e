"""gzip both ways: answers over 1 KiB are compressed for clients that accept it (streams
never), and gzip request bodies are read with MAX_BODY_BYTES applied to what they inflate
to, so a gzip bomb is a 413 that costs the worker little memory."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer

ROW = [5.1, 3.5, 1.4, 0.2]
BATCH = {"model": "iris", "instances": [ROW] * 200}


def raw_post(server: LiveServer, path: str, body: bytes, **headers: str) -> requests.Response:
    """A request whose answer requests leaves as sent (no automatic inflating)."""
    resp = requests.post(server.url + path, data=body, stream=True, timeout=30,
                         headers={"Content-Type": "application/json", **headers})
    resp.raw.decode_content = False
    return resp


def test_a_big_answer_is_gzip_and_inflates_to_the_same_json(live_server: LiveServer) -> None:
    plain = raw_post(live_server, "/predict/batch", json.dumps(BATCH).encode(),
                     **{"Accept-Encoding": "identity"})
    packed = raw_post(live_server, "/predict/batch", json.dumps(BATCH).encode(),
                      **{"Accept-Encoding": "gzip"})
    plain_bytes, packed_bytes = plain.raw.read(), packed.raw.read()
    assert "Content-Encoding" not in plain.headers
    assert packed.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in packed.headers["Vary"]
    assert len(packed_bytes) < len(plain_bytes) / 5
    want, got = json.loads(plain_bytes), json.loads(gzip.decompress(packed_bytes))
    want.pop("request_id"), got.pop("request_id")
    assert got == want


def test_small_answers_and_streams_are_not_compressed(live_server: LiveServer) -> None:
    small = raw_post(live_server, "/predict/iris", json.dumps(ROW).encode(),
                     **{"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers
    stream = raw_post(live_server, "/predict/stream", json.dumps(BATCH).encode(),
                      **{"Accept-Encoding": "gzip"})
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    assert "Content-Encoding" not in stream.headers
    assert stream.raw.read().endswith(b"data: [DONE]\n\n")


def test_a_gzip_body_is_read(live_server: LiveServer) -> None:
    resp = raw_post(live_server, "/predict/batch", gzip.compress(json.dumps(BATCH).encode()),
                    **{"Content-Encoding": "gzip", "Accept-Encoding": "identity"})
    assert resp.status_code == 200 and json.loads(resp.raw.read())["count"] == 200


@pytest.mark.parametrize(("body", "coding", "status", "code"), [
    (b"not gzip at all", "gzip", 400, "bad_gzip"),
    (gzip.compress(b'{"model": "iris"}')[:-12], "gzip", 400, "bad_gzip"),
    (b"{}", "br", 415, "unsupported_media_type"),
])
def test_unreadable_encodings_are_4xx(live_server: LiveServer, body: bytes, coding: str,
                                      status: int, code: str) -> None:
    resp = live_server.post("/predict/batch", data=body,
                            headers={"Content-Type": "application/json",
                                     "Content-Encoding": coding})
    assert resp.status_code == status and resp.json()["code"] == code


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow  # starts a server of its own
def test_a_one_gib_gzip_bomb_is_413_in_little_memory(
        server_factory: Callable[..., LiveServer], model_repo: Path) -> None:
    server = server_factory(model_repo, WORKERS="1", MODEL_POLL_SECONDS="0")
    pid = server.get("/status").json()["pid"]
    # Run-length matching only (Z_RLE): the same bomb, about a megabyte, in half the time.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    chunk = b"[" + b" " * (1 << 20)
    bomb = b"".join(packer.compress(chunk) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2 << 20  # 1 GiB of JSON-looking bytes in about a megabyte
    before = rss_kb(pid)
    resp = server.post("/predict/batch", data=bomb, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"}, timeout=60)
    assert resp.status_code == 413 and resp.json()["code"] == "body_too_large"
    assert rss_kb(pid) - before < 50 * 1024
    assert server.post("/predict/iris", json=ROW).status_code == 200
