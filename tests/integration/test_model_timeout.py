"""MODEL_TIMEOUT_SECONDS in a real gevent worker: a slow batch is cut at a chunk boundary with
504 model_timeout, and the same worker keeps answering other requests while it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np
import pytest
import requests
from sklearn.datasets import load_iris

from tests.conftest import LiveServer
from tests.slow_model import SlowLogistic

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


def test_slow_batch_times_out_and_the_worker_stays_responsive(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    X, y = load_iris(return_X_y=True)
    (model_repo / "slow" / "1").mkdir(parents=True)
    joblib.dump(SlowLogistic(max_iter=1000).fit(X, y), model_repo / "slow" / "1" / "model.joblib")
    server = server_factory(model_repo, WORKERS="1", STREAM_CHUNK_ROWS="10",
                            MODEL_TIMEOUT_SECONDS="1", CACHE="off", MODEL_POLL_SECONDS="0")
    rows = np.random.default_rng(5).normal(4, 2, (1000, 4)).round(4).tolist()  # about 5 s of work
    answered: list[float] = []
    done = threading.Event()

    def meanwhile() -> None:  # one worker: these can only be answered between chunks
        with requests.Session() as s:
            while not done.is_set():
                resp = s.post(server.url + "/predict", timeout=10,
                              json={"model": "iris", "features": [5.1, 3.5, 1.4, 0.2]})
                assert resp.status_code == 200
                answered.append(time.monotonic())

    helper = threading.Thread(target=meanwhile)
    helper.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        resp = server.post("/predict/batch", json={"model": "slow", "instances": rows}, timeout=30)
        finished = time.monotonic()
    finally:
        done.set()
        helper.join(15)
    assert resp.status_code == 504, resp.text
    body = resp.json()
    assert body["code"] == "model_timeout" and "of 1000 rows were done" in body["error"]
    assert sum(started < t < finished for t in answered) >= 3  # others were served meanwhile
    ok = server.post("/predict/batch", json={"model": "slow", "instances": rows[:20]})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 20
