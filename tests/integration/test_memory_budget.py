"""MODEL_MEMORY_MB on a real server: versions load on their first request, the least
recently used are unloaded (visible in /models), labelled versions stay, concurrent first
requests share one load, and a load longer than MODEL_LOAD_WAIT_SECONDS answers 503."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import joblib
import pytest

from tests.conftest import LiveServer, wait_until

pytestmark = pytest.mark.slow

ROW = [6.3, 2.5, 5.0, 1.9]
# iris/2 (a 100-tree forest) is ~0.17 MB as a pickle: this holds two forests, not three
# (iris/1, a logistic regression, is a few KB).
BUDGET_MB = "0.45"


@pytest.fixture
def forests(model_repo: Path) -> Path:
    """The demo plus iris 3-6, copies of iris/2 (labels: stable=1, canary=2)."""
    for version in ("3", "4", "5", "6"):
        shutil.copytree(model_repo / "iris" / "2", model_repo / "iris" / f".staging-{version}")
        (model_repo / "iris" / f".staging-{version}").rename(model_repo / "iris" / version)
    return model_repo


def _versions(server: LiveServer) -> dict[str, dict[str, Any]]:
    return {v["version"]: v for v in server.get("/models/iris").json()["versions"]}


def _memory(server: LiveServer) -> dict[str, Any]:
    figures: dict[str, Any] = server.get("/status").json()["model_memory"]
    return figures


def _predict(server: LiveServer, version: str) -> Any:
    resp = server.fresh("POST", f"/predict/iris/versions/{version}", json={"features": ROW})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_lru_versions_unload_and_labelled_ones_stay(
    server_factory: Callable[..., LiveServer], forests: Path
) -> None:
    server = server_factory(forests, WORKERS="1", MODEL_MEMORY_MB=BUDGET_MB,
                            MODEL_POLL_SECONDS="0", CACHE="off")
    before = _versions(server)
    assert {v["state"] for v in before.values()} == {"UNLOADED"}
    assert server.get("/ready").status_code == 200  # servable without anything in memory
    expected = joblib.load(forests / "iris" / "2" / "model.joblib").predict_proba([ROW])[0]
    for version in ("1", "2", "3", "4", "5"):
        answer = _predict(server, version)
        assert answer["version"] == version
        if version != "1":
            assert list(answer["probabilities"].values()) == pytest.approx(expected, abs=1e-12)
    states = {v: s["state"] for v, s in _versions(server).items()}
    assert states == {"1": "AVAILABLE", "2": "AVAILABLE", "3": "UNLOADED", "4": "UNLOADED",
                      "5": "AVAILABLE", "6": "UNLOADED"}
    shown = _versions(server)
    assert shown["3"]["memory_mb"] == shown["5"]["memory_mb"] > 0.1  # measured at its load
    assert shown["6"]["memory_mb"] is None  # never loaded
    figures = _memory(server)
    assert figures["loads"] == 5 and figures["unloads"] == 2
    assert figures["loaded_mb"] <= float(BUDGET_MB)
    # The unloaded version comes back on its next request, and another one goes.
    assert _predict(server, "3")["version"] == "3"
    assert _versions(server)["5"]["state"] == "UNLOADED"
    assert {v: s["state"] for v, s in _versions(server).items() if v in ("1", "2")} == \
        {"1": "AVAILABLE", "2": "AVAILABLE"}
    assert "model version unloaded" in server.log_text()


def test_concurrent_first_requests_share_one_load(
    server_factory: Callable[..., LiveServer], forests: Path
) -> None:
    server = server_factory(forests, WORKERS="1", MODEL_MEMORY_MB=BUDGET_MB,
                            MODEL_POLL_SECONDS="0", CACHE="off")
    loads = _memory(server)["loads"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: _predict(server, "6"), range(16)))
    assert all(a["probabilities"] == answers[0]["probabilities"] for a in answers)
    assert _memory(server)["loads"] == loads + 1
    loaded = [line for line in server.log_text().splitlines()
              if '"msg":"model version loaded"' in line and '"version":"6"' in line]
    assert len(loaded) == 1, loaded


def test_a_load_longer_than_the_wait_answers_503_then_serves(
    server_factory: Callable[..., LiveServer], forests: Path
) -> None:
    server = server_factory(forests, WORKERS="1", MODEL_MEMORY_MB=BUDGET_MB,
                            MODEL_LOAD_WAIT_SECONDS="0.001", MODEL_POLL_SECONDS="0",
                            CACHE="off")
    resp = server.post("/predict/iris/versions/4", json={"features": ROW})
    assert resp.status_code == 503, resp.text
    assert resp.json()["code"] == "version_loading" and resp.headers["Retry-After"] == "1"
    # The load went on in the background: a later request is served.
    wait_until(lambda: server.post("/predict/iris/versions/4",
                                   json={"features": ROW}).status_code == 200, 10, 0.2)
    assert _memory(server)["loads"] == 1
