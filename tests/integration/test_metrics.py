"""GET /metrics: Prometheus text summed over every gunicorn worker."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import LiveServer, scrape_metrics

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


def test_metrics_are_summed_over_workers(server_factory: Callable[..., LiveServer],
                                         model_repo: Path) -> None:
    (model_repo / "iris" / "9").mkdir()
    (model_repo / "iris" / "9" / "model.joblib").write_bytes(b"broken")
    server = server_factory(model_repo, CACHE="always")
    def one(i: int) -> int:
        resp = server.fresh("POST", "/predict/iris", json=[5.1, 3.5, 1.4, i % 4 / 10])
        assert resp.status_code == 200
        return int(server.fresh("GET", "/status").json()["pid"])

    with ThreadPoolExecutor(16) as pool:  # concurrent, so both workers take connections
        pids = set(pool.map(one, range(40)))
    server.post("/predict/batch", json={"model": "iris", "instances": [[1, 2, 3, 4]] * 10})
    server.post("/predict/iris", json=[1, 2])
    assert len(pids) == 2
    assert server.get("/metrics").headers["Content-Type"].startswith("text/plain; version=")
    text = scrape_metrics(server)
    assert sample(text, "predictions_total", model="iris", version="2") == 50
    assert sample(text, "http_requests_total", route="/predict/<model>", method="POST",
                  status="200") == 40
    assert sample(text, "http_requests_total", route="/predict/<model>", method="POST",
                  status="422") == 1
    hits = sample(text, "prediction_cache_lookups_total", result="hit")
    misses = sample(text, "prediction_cache_lookups_total", result="miss")
    # 4 distinct rows, two per-worker caches: every lookup is counted once, in either
    # worker. How many hit depends on timing (concurrent requests for one row, gathered in
    # one micro-batch, all miss), never on the sum; the batch's 10 equal rows all miss.
    assert hits + misses == 50 and hits > 0 and misses >= 10
    assert sample(text, "model_load_failures_total", model="iris") == 2  # once per worker
    assert sample(text, "batch_rows_count") == 41
    assert sample(text, "http_request_duration_seconds_count", route="/predict/batch") == 1
    assert "http_requests_in_flight" in text


def test_metrics_key_and_cors_are_opt_in(server_factory: Callable[..., LiveServer],
                                         model_repo: Path, live_server: LiveServer) -> None:
    server = server_factory(model_repo, WORKERS="1", METRICS_KEY="scrape",
                            CORS_ORIGINS="https://dash.example")
    assert server.get("/metrics").status_code == 401
    assert server.get("/metrics", headers={"X-API-Key": "scrape"}).status_code == 200
    pre = server.request("OPTIONS", "/predict/iris", headers={
        "Origin": "https://dash.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Content-Type"})
    assert pre.headers["Access-Control-Allow-Origin"] == "https://dash.example"
    other = server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2],
                        headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
    # The shared server sets no CORS_ORIGINS (nor METRICS_KEY): the defaults.
    resp = live_server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2],
                            headers={"Origin": "https://dash.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers  # off by default
