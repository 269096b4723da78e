"""Micro-batching in real gevent workers: concurrent one-row predicts of a forest are gathered
into fewer model calls, and every answer, batched or not, is still the estimator's own one-row
answer, to the bit."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import requests

from tests.conftest import LiveServer, scrape_metrics


def batched_calls(server: LiveServer) -> tuple[float, float]:
    """(calls, rows) of the micro_batch_rows histogram, summed over the workers."""
    text = scrape_metrics(server)
    count = re.search(r"^micro_batch_rows_count (\S+)$", text, re.M)
    total = re.search(r"^micro_batch_rows_sum (\S+)$", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def test_concurrent_one_row_predicts_are_batched_and_exact(live_server: LiveServer,
                                                           demo_repo: Path) -> None:
    rows = np.random.default_rng(11).normal(4.0, 2.0, (240, 4)).round(6)
    before = batched_calls(live_server)

    def ask(i: int) -> dict:  # type: ignore[type-arg]
        with requests.Session() as s:
            version = "1" if i % 2 else "2"
            resp = s.post(live_server.url + "/predict", timeout=20,
                          json={"model": "iris", "version": version, "features": rows[i].tolist()})
            assert resp.status_code == 200, resp.text
            return resp.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(ask, range(len(rows))))
    calls, batched_rows = (a - b for a, b in zip(batched_calls(live_server), before))
    # Version 2 (the forest) is batched; version 1 (logistic regression) always goes alone.
    assert batched_rows == len(rows) // 2
    assert calls < batched_rows, "no two concurrent requests ever shared a model call"
    models = {v: joblib.load(demo_repo / "iris" / v / "model.joblib") for v in ("1", "2")}
    for i, got in enumerate(answers):
        est = models["1" if i % 2 else "2"]
        x = rows[i:i + 1]
        assert got["prediction"] == est.predict(x)[0]
        assert list(got["probabilities"].values()) == est.predict_proba(x)[0].tolist()

