"""Errors that say what happened: a model call out of memory is a 503 the worker survives;
error answers are counted by their machine code, model time per version, and every answer
says where its time went (Server-Timing)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import joblib
import pytest
from sklearn.datasets import load_iris

from tests.conftest import LiveServer, scrape_metrics
from tests.slow_model import HungryLogistic

TIMING = re.compile(r"^model;dur=[0-9.]+, total;dur=[0-9.]+$")


@pytest.mark.slow  # starts a server of its own
def test_out_of_memory_is_503_and_the_worker_serves_on(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    X, y = load_iris(return_X_y=True)
    (model_repo / "hungry" / "1").mkdir(parents=True)
    joblib.dump(HungryLogistic(max_iter=1000).fit(X, y),
                model_repo / "hungry" / "1" / "model.joblib")
    server = server_factory(model_repo, WORKERS="1", CACHE="off", MODEL_POLL_SECONDS="0")
    refused = server.post("/predict/hungry", json=[5000.0, 3.5, 1.4, 0.2])
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["code"] == "insufficient_memory"
    batch = server.post("/predict/batch", json={"model": "hungry",
                                                "instances": [[5.1, 3.5, 1.4, 0.2]] * 3
                                                + [[5000.0, 3.5, 1.4, 0.2]]})
    assert batch.status_code == 503 and batch.json()["code"] == "insufficient_memory"
    fine = server.post("/predict/hungry", json=[5.1, 3.5, 1.4, 0.2])
    assert fine.status_code == 200 and fine.json()["label"] == "0"
    assert TIMING.match(fine.headers["Server-Timing"])
    server.post("/predict/nope", json=[1.0])
    text = scrape_metrics(server)
    assert 'http_errors_total{code="insufficient_memory"} 2.0' in text
    assert 'http_errors_total{code="model_not_found"} 1.0' in text
    assert re.search(r'prediction_duration_seconds_count\{model="hungry",version="1"\} 1\.0',
                     text)


def test_every_answer_carries_server_timing(live_server: LiveServer) -> None:
    answer = live_server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2])
    assert TIMING.match(answer.headers["Server-Timing"])
    health = live_server.get("/health")
    assert re.match(r"^total;dur=[0-9.]+$", health.headers["Server-Timing"])
    error = live_server.post("/predict/iris", json=[1.0])
    assert error.status_code == 422 and "total;dur=" in error.headers["Server-Timing"]
