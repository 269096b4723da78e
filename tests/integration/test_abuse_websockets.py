"""WebSockets cannot starve a worker (issue 24, items 2 and 3): each worker holds at most
MAX_WEBSOCKETS of them (503 beyond) so /health still answers, a silent /ws/predict socket is
closed after WS_IDLE_SECONDS and a peer that ignores pings is dropped, each message counts
against RATE_LIMIT, and a message over MAX_BODY_BYTES closes the socket (1009) before the
rest of it is read."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from simple_websocket import Client, ConnectionClosed

from tests.conftest import LiveServer, wait_until, websocket_handshake

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]
PING, CLOSE = 0x9, 0x8


class RawWebSocket:
    """A WebSocket client written by hand on a plain socket: it sends only what a test asks
    for and never answers a ping (simple_websocket's client answers them by itself)."""

    def __init__(self, server: LiveServer, path: str = "/ws/predict") -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, "the server closed before answering the handshake"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    @staticmethod
    def header(length: int, opcode: int = 0x1) -> bytes:
        """A client frame's header, FIN set, masked with a zero key (payload sent as is)."""
        if length < 126:
            size = bytes([0x80 | length])
        elif length < 1 << 16:
            size = bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            size = bytes([0x80 | 127]) + struct.pack("!Q", length)
        return bytes([0x80 | opcode]) + size + b"\0\0\0\0"

    def send_text(self, text: str) -> None:
        data = text.encode()
        self.sock.sendall(self.header(len(data)) + data)

    def _read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """The server's frames (opcode, payload) until it closes the connection (or stays
        silent for the socket's 5 s timeout)."""
        while (head := self._read(2)) is not None:
            length = head[1] & 0x7F
            if length >= 126:
                ext = self._read(2 if length == 126 else 8)
                assert ext is not None
                length = int.from_bytes(ext, "big")
            payload = self._read(length)
            assert payload is not None
            yield head[0] & 0x0F, payload


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    codes = [struct.unpack("!H", p[:2])[0] for op, p in frames if op == CLOSE and len(p) >= 2]
    return codes[0] if codes else None


def ask(ws: Client, features: list[float] = ROW, msg_id: Any = 1) -> dict[str, Any]:
    ws.send(json.dumps({"model": "iris", "features": features, "id": msg_id}))
    return json.loads(ws.receive(timeout=5))  # type: ignore[no-any-return]


def predicts(server: LiveServer) -> bool:
    """A new /ws/predict socket is accepted and answers."""
    with RawWebSocket(server) as raw:
        if raw.status != 101:
            return False
        raw.send_text(json.dumps({"model": "iris", "features": ROW}))
        op, payload = next(raw.frames())
        return op == 0x1 and json.loads(payload)["label"] == "setosa"


def test_a_handshake_beyond_the_cap_is_refused_with_503(
        server_factory: Callable[..., LiveServer], demo_repo: Path) -> None:
    server = server_factory(demo_repo, WORKERS="1", MAX_WEBSOCKETS="3", MODEL_POLL_SECONDS="0")
    held = [Client.connect(f"ws://127.0.0.1:{server.port}/ws/predict") for _ in range(2)]
    held.append(Client.connect(f"ws://127.0.0.1:{server.port}/ws/monitor"))  # both routes
    try:
        for path in ("/ws/predict", "/ws/monitor"):
            refused = websocket_handshake(server.url + path)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["code"] == "too_many_websockets"
        assert all(ask(ws)["label"] == "setosa" for ws in held[:2])  # the held ones serve on
        held.pop(0).close()
        assert wait_until(lambda: predicts(server), 5)  # a closed socket gives its slot back
    finally:
        for ws in held:
            ws.close()


def test_a_worker_at_its_cap_of_idle_websockets_still_answers_health(
        server_factory: Callable[..., LiveServer], demo_repo: Path) -> None:
    """With WORKER_CONNECTIONS=20, twenty idle sockets used to leave /health unanswered."""
    server = server_factory(demo_repo, WORKERS="1", WORKER_CONNECTIONS="20", MAX_WEBSOCKETS="5",
                            MODEL_POLL_SECONDS="0")
    sockets = [RawWebSocket(server) for _ in range(20)]
    try:
        for s in sockets:
            if s.status != 101:
                s.sock.close()  # a refused client goes away
        for _ in range(5):
            t0 = time.monotonic()
            health = server.fresh("GET", "/health", timeout=1)
            assert health.status_code == 200 and time.monotonic() - t0 < 1
        assert Counter(s.status for s in sockets) == Counter({101: 5, 503: 15})
    finally:
        for s in sockets:
            s.sock.close()


def test_a_silent_websocket_is_closed_after_ws_idle_seconds_and_frees_its_slot(
        server_factory: Callable[..., LiveServer], demo_repo: Path) -> None:
    server = server_factory(demo_repo, WORKERS="1", MAX_WEBSOCKETS="1", WS_IDLE_SECONDS="1",
                            MODEL_POLL_SECONDS="0")
    ws = Client.connect(f"ws://127.0.0.1:{server.port}/ws/predict")
    try:
        for i in range(5):  # a socket in use is never idle, however long it stays open
            assert ask(ws, msg_id=i)["id"] == i
            time.sleep(0.4)
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.receive(timeout=5)
        assert closed.value.reason == 1001 and time.monotonic() - t0 < 2
    finally:
        with contextlib.suppress(ConnectionClosed):  # closed by the server: nothing to do
            ws.close()
    assert wait_until(lambda: predicts(server), 5)


def test_a_peer_that_ignores_pings_is_dropped(server_factory: Callable[..., LiveServer],
                                              demo_repo: Path) -> None:
    server = server_factory(demo_repo, WORKERS="1", WS_PING_SECONDS="0.5",
                            MODEL_POLL_SECONDS="0")
    answering = Client.connect(f"ws://127.0.0.1:{server.port}/ws/predict")
    try:
        with RawWebSocket(server) as deaf:
            t0 = time.monotonic()
            frames = list(deaf.frames())
            assert PING in [op for op, _ in frames] and close_code(frames) == 1008
            assert time.monotonic() - t0 < 3
        assert ask(answering)["label"] == "setosa"  # it answered every ping: still open
    finally:
        answering.close()


def test_each_message_counts_against_the_rate_limit(
        server_factory: Callable[..., LiveServer], demo_repo: Path) -> None:
    """One socket used to send 600 predictions in 0.4 s under a limit that gave HTTP 429s."""
    server = server_factory(demo_repo, WORKERS="1", RATE_LIMIT="10/2 seconds",
                            MODEL_POLL_SECONDS="0")
    ws = Client.connect(f"ws://127.0.0.1:{server.port}/ws/predict")  # the handshake counts: 1
    try:
        for i in range(20):
            ws.send(json.dumps({"model": "iris", "features": ROW, "id": i}))
        answers = [json.loads(ws.receive(timeout=5)) for _ in range(20)]
        assert [a["id"] for a in answers] == list(range(20))
        assert Counter(a.get("code", "ok") for a in answers) == \
            Counter({"ok": 9, "rate_limited": 11})
        refused = answers[-1]
        assert refused["status"] == 429 and "retry in" in refused["error"]
        time.sleep(2.1)  # the window passes: the same socket is answered again
        assert ask(ws, msg_id="later")["label"] == "setosa"
    finally:
        ws.close()


def test_an_oversized_message_closes_1009_before_it_is_read_whole(
        server_factory: Callable[..., LiveServer], demo_repo: Path) -> None:
    server = server_factory(demo_repo, WORKERS="1", MAX_BODY_BYTES="65536",
                            MODEL_POLL_SECONDS="0")
    announced = 60_000_000
    sent = 0
    with RawWebSocket(server) as raw:
        raw.sock.sendall(raw.header(announced))
        chunk = b"a" * 65536
        while sent < announced:
            readable, writable, _ = select.select([raw.sock], [raw.sock], [], 5)
            if readable:
                break  # the server has spoken: its close
            try:
                sent += raw.sock.send(chunk)
            except OSError:
                break
        frames = list(raw.frames())
    assert close_code(frames) == 1009
    assert sent < 8_000_000  # closed after MAX_BODY_BYTES and some buffers, not 60 MB
    assert server.fresh("GET", "/health").status_code == 200
    assert predicts(server)  # the worker goes on

