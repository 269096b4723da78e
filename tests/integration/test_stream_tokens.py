"""Under API_KEYS, browsers get a short-lived stream token for EventSource and WebSocket
clients: it opens /stream/events and /ws/monitor, a forged or expired one is 401, it opens
nothing else, and it is never the key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from simple_websocket import Client

from tests.conftest import LiveServer, websocket_handshake

pytestmark = pytest.mark.slow  # starts a server of its own

KEY = "alpha-key-123"


@pytest.fixture(scope="module")
def keyed(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the module: tokens hold no state on it, and no test changes it."""
    server = LiveServer(tmp_path_factory.mktemp("tokens"), demo_repo, API_KEYS=KEY,
                        STREAM_TOKEN_SECONDS="2", WORKERS="1", MODEL_POLL_SECONDS="0").start()
    yield server
    server.stop(quick=True)


def token(server: LiveServer) -> str:
    answer = server.post("/auth/stream-token", headers={"X-API-Key": KEY})
    assert answer.status_code == 200 and answer.json()["expires_in"] == 2
    assert KEY not in answer.text
    return str(answer.json()["token"])


def first_event(server: LiveServer, query: str) -> requests.Response:
    return requests.get(f"{server.url}/stream/events{query}", stream=True, timeout=10)


def test_a_token_opens_the_event_stream_and_the_monitor(keyed: LiveServer) -> None:
    assert keyed.post("/auth/stream-token").status_code == 401  # a key is needed for one
    with first_event(keyed, f"?token={token(keyed)}") as resp:
        assert resp.status_code == 200
        assert next(resp.iter_lines()).startswith(b"data: ")
    ws = Client.connect(f"ws://127.0.0.1:{keyed.port}/ws/monitor?token={token(keyed)}")
    try:
        assert "workers" in ws.receive(timeout=5)
    finally:
        ws.close()


@pytest.mark.parametrize("bad", ["forged", "eyJrIjoiMDAwMDAwMDAwMDAwMDAwMCJ9.Z2F.bad"])
def test_a_forged_token_is_401(keyed: LiveServer, bad: str) -> None:
    with first_event(keyed, f"?token={bad}") as resp:
        assert resp.status_code == 401 and resp.json()["code"] == "unauthorized"
    assert websocket_handshake(f"{keyed.url}/ws/monitor?token={bad}").status_code == 401


def test_an_expired_token_is_401_and_a_token_opens_nothing_else(keyed: LiveServer) -> None:
    fresh = token(keyed)
    assert keyed.post(f"/predict/iris?token={fresh}", json=[5.1, 3.5, 1.4, 0.2]
                      ).status_code == 401
    time.sleep(3.1)
    with first_event(keyed, f"?token={fresh}") as resp:
        assert resp.status_code == 401 and "expired" in resp.json()["error"]
