"""Limits against abuse on a real gunicorn: too-deep JSON, slowloris sockets, and a SIGHUP
restart under load that loses no request."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]
KEEPALIVE = 1
CLIENT_TIMEOUT = 2


@pytest.fixture(scope="module")
def tight_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LiveServer]:
    """Its own server, with short KEEPALIVE and CLIENT_TIMEOUT_SECONDS so that slow clients
    are cut within the test, shared by the slowloris and the SIGHUP tests."""
    server = LiveServer(tmp_path_factory.mktemp("limits"), demo_repo, WORKERS="2",
                        KEEPALIVE=str(KEEPALIVE), CLIENT_TIMEOUT_SECONDS=str(CLIENT_TIMEOUT),
                        MODEL_POLL_SECONDS="0", CACHE="off").start()
    yield server
    server.stop(quick=True)


def test_too_deep_json_is_a_400_and_the_server_goes_on(live_server: LiveServer) -> None:
    deep = "[" * 33 + "]" * 33
    for path, body in (("/predict/iris", deep), ("/v1/models/iris:predict",
                                                  f'{{"instances":{deep}}}')):
        resp = live_server.post(path, data=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert "MAX_JSON_DEPTH" in resp.json()["error"]
    assert live_server.post("/predict/iris", json=ROW).status_code == 200


def _fresh_latencies(server: LiveServer, n: int) -> list[float]:
    """``n`` sequential predictions, each on a new connection (any worker may take it)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        resp = server.fresh("POST", "/predict/iris", json=ROW, timeout=CLIENT_TIMEOUT + 3)
        out.append(time.perf_counter() - t0)
        assert resp.status_code == 200
    return out


class SlowClient:
    """A raw socket that sends what it is told and notes what the server answered and when
    the server closed it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.answer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            pass  # the server closed it; poll() notices

    def poll(self) -> bool:
        """Read what has arrived without waiting; True once the server has closed."""
        while not self.closed:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            self.answer += data
            self.closed = not data
        return self.closed


def test_slowloris_sockets_are_cut_and_others_served(tight_server: LiveServer) -> None:
    head = (b"POST /predict/iris HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    baseline = _fresh_latencies(tight_server, 30)
    drippers = [SlowClient(tight_server.port) for _ in range(100)]
    stallers = [SlowClient(tight_server.port) for _ in range(50)]
    for c in stallers:
        c.send(head + b"[5.1,")  # headers and 5 of the 100 body bytes promised, then silence
    stop = threading.Event()

    def drip() -> None:
        # One byte of the head per socket every 0.25 s: the head would take 25 s in all.
        for i in range(len(head)):
            for c in drippers:
                c.send(head[i : i + 1])
            if stop.wait(0.25):
                return

    dripping = threading.Thread(target=drip)
    dripping.start()
    t0 = time.monotonic()
    try:
        during = _fresh_latencies(tight_server, 50)
        wait_until(lambda: all([c.poll() for c in drippers + stallers]), 15, 0.1)
        cut_after = time.monotonic() - t0
    finally:
        stop.set()
        dripping.join()
        for c in drippers + stallers:
            c.sock.close()
    # A head is bounded by KEEPALIVE in all (not per byte), a stalled body by CLIENT_TIMEOUT.
    assert cut_after < 25 / 2, cut_after
    assert all(c.answer == b"" for c in drippers)
    assert all(c.answer.startswith(b"HTTP/1.1 408 ") for c in stallers), stallers[0].answer
    assert b'"code":"request_timeout"' in stallers[0].answer
    ratio = statistics.median(during) / statistics.median(baseline)
    print(f"fresh-connection median {statistics.median(baseline) * 1000:.1f} ms before, "
          f"{statistics.median(during) * 1000:.1f} ms under 150 slow sockets (x{ratio:.1f}); "
          f"all cut after {cut_after:.1f} s")
    assert ratio < 10, (baseline, during)


def test_sighup_replaces_every_worker_without_losing_a_request(
    tight_server: LiveServer,
) -> None:
    def both_worker_pids() -> set[int] | None:
        pids = {tight_server.fresh("GET", "/status", timeout=5).json()["pid"]
                for _ in range(12)}
        return pids if len(pids) == 2 else None

    old: set[int] = wait_until(both_worker_pids, 20)
    outcomes: Counter[str] = Counter()
    slowest = [0.0]
    stop = threading.Event()

    def client(fresh: bool) -> None:
        session = requests.Session()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                if fresh:
                    resp = tight_server.fresh("POST", "/predict/iris", json=ROW, timeout=30)
                else:
                    resp = session.post(tight_server.url + "/predict/iris", json=ROW, timeout=30)
                outcomes[str(resp.status_code)] += 1
            except requests.RequestException as exc:
                outcomes[f"lost: {type(exc).__name__}: {exc}"] += 1
            slowest[0] = max(slowest[0], time.perf_counter() - t0)
            time.sleep(0.01)
        session.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        hup = time.monotonic()
        tight_server.signal(signal.SIGHUP)
        # Done when every old worker has exited (the new ones started serving before that).
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in old), 60, 0.1)
        handover = time.monotonic() - hup
        served_during = sum(v for k, v in outcomes.items() if k == "200")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    new: set[int] = wait_until(both_worker_pids, 10)
    lost = {k: v for k, v in outcomes.items() if k != "200"}
    assert not lost, lost
    assert served_during > 50, outcomes
    assert not new & old, (old, new)
    # Stock gunicorn stops the old workers at once: requests then wait for the new ones to
    # load the app, about as long as the whole handover.
    print(f"SIGHUP handover {handover:.1f} s, {served_during} answers, slowest {slowest[0]:.3f} s")
    assert slowest[0] < handover / 2, (slowest, handover)
