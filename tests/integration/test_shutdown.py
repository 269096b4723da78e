"""SIGTERM: /ready turns 503 first, in-flight requests and streams finish, nothing accepted
is lost; and the per-worker stream limit answers 503 with Retry-After."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
from sklearn import datasets

from tests.conftest import LiveServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


def test_sigterm_drains_then_finishes_streams_and_requests(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    server = server_factory(model_repo, DRAIN_SECONDS="1.5", GRACEFUL_TIMEOUT="20",
                            STREAM_CHUNK_ROWS="100", CACHE="off")
    rows = np.resize(datasets.load_iris().data, (30_000, 4)).tolist()
    stream = requests.post(server.url + "/predict/stream", stream=True, timeout=60,
                           json={"model": "iris", "version": "2", "instances": rows})
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                resp = server.fresh("POST", "/predict/iris", json=[5.1, 3.5, 1.4, 0.2])
                outcomes[str(resp.status_code)] += 1
            except requests.ConnectionError as exc:
                refused = "refused" in str(exc).lower()
                outcomes["refused" if refused else f"lost: {exc}"] += 1
                if refused:
                    return  # the server has stopped accepting: that is the end, not a loss
            time.sleep(0.01)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    server.signal(signal.SIGTERM)
    drained = wait_until(lambda: server.fresh("GET", "/ready").status_code == 503, 1.0, 0.05)
    assert drained
    body = server.fresh("GET", "/ready").json()
    assert body["reason"].startswith("shutting down")
    indices = 0
    last = ""
    for line in stream.iter_lines():
        if line.startswith(b"data: {\"index\""):
            indices += 1
        if line.startswith(b"data: "):
            last = line.decode()
    stop.set()
    for t in threads:
        t.join()
    assert indices == 30_000 and last == "data: [DONE]"
    assert not [k for k in outcomes if k.startswith("lost")], outcomes
    assert set(outcomes) <= {"200", "refused"} and outcomes["200"] > 10, outcomes
    assert server.proc is not None and server.proc.wait(20) == 0


def test_stream_limit_answers_503_with_retry_after(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    server = server_factory(model_repo, WORKERS="1", MAX_STREAMS="2")
    held = [requests.get(server.url + "/stream/events", stream=True, timeout=10)
            for _ in range(2)]
    try:
        for resp in held:
            assert json.loads(next(resp.iter_lines()).decode()[6:])["type"] == "hello"
        refused = server.get("/stream/events")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["code"] == "too_many_streams"
        assert server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2]).status_code == 200
    finally:
        for resp in held:
            resp.close()
    wait_until(lambda: server.get("/stream/events", stream=True).status_code == 200, 5)
