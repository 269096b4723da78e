"""Predictions over a real gunicorn equal the loaded estimator called in-process, to the bit."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import orjson
import pytest
from sklearn import datasets

from tests.conftest import LiveServer

IRIS = datasets.load_iris().data
NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]


def _estimator(repo: Path, name: str, version: str):  # type: ignore[no-untyped-def]
    return joblib.load(repo / name / version / "model.joblib")


@pytest.mark.parametrize(
    ("path", "body", "version"),
    [
        ("/predict", {"model": "iris", "features": [5.1, 3.5, 1.4, 0.2]}, "2"),
        ("/predict", {"model": "iris", "version": "1", "features": [5.1, 3.5, 1.4, 0.2]}, "1"),
        ("/predict", {"model": "iris", "version": 1, "features": [5.1, 3.5, 1.4, 0.2]}, "1"),
        ("/predict/iris", {"version": "stable", "features": [5.1, 3.5, 1.4, 0.2]}, "1"),
        ("/predict/iris", {"version": "canary", "features": [5.1, 3.5, 1.4, 0.2]}, "2"),
        ("/predict/iris", {"version": "latest", "features": [5.1, 3.5, 1.4, 0.2]}, "2"),
        ("/predict/iris?version=stable", {"features": [5.1, 3.5, 1.4, 0.2]}, "1"),
        ("/predict/iris?version=1", {"version": "2", "features": [5.1, 3.5, 1.4, 0.2]}, "2"),
        ("/predict/iris/versions/1", {"features": [5.1, 3.5, 1.4, 0.2]}, "1"),
        ("/predict/iris/versions/canary", {"features": [5.1, 3.5, 1.4, 0.2]}, "2"),
        ("/predict/iris", [5.1, 3.5, 1.4, 0.2], "2"),
        ("/predict/iris?version=1", [5.1, 3.5, 1.4, 0.2], "1"),
        ("/predict/iris", {"features": dict(zip(NAMES, [5.1, 3.5, 1.4, 0.2]))}, "2"),
        ("/predict/iris", {"features": dict(zip(reversed(NAMES), [0.2, 1.4, 3.5, 5.1]))}, "2"),
    ],
    ids=["default-latest", "version-string", "version-int", "label-stable", "label-canary",
         "latest", "query-label", "body-beats-query", "path-version", "path-label",
         "bare-list", "bare-list-query", "named-features", "named-any-order"],
)
def test_version_choice_and_feature_forms(
    live_server: LiveServer, demo_repo: Path, path: str, body: object, version: str
) -> None:
    resp = live_server.post(path, json=body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["model"] == "iris" and got["version"] == version
    est = _estimator(demo_repo, "iris", version)
    row = np.array([[5.1, 3.5, 1.4, 0.2]])
    proba = est.predict_proba(row)[0].tolist()
    assert got["prediction"] == est.predict(row)[0] == 0
    assert got["label"] == "setosa"
    assert got["probabilities"] == dict(zip(CLASSES, proba))
    assert got["confidence"] == proba[0]
    assert got["cached"] is False
    assert got["request_id"] == resp.headers["X-Request-ID"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_every_iris_row_matches_in_process_to_the_bit(
    live_server: LiveServer, demo_repo: Path, version: str
) -> None:
    est = _estimator(demo_repo, "iris", version)
    resp = live_server.post("/predict/batch",
                            json={"model": "iris", "version": version, "instances": IRIS.tolist()})
    assert resp.status_code == 200
    got = orjson.loads(resp.content)
    # Exact for LogisticRegression too: the server makes the same 150-row call (one chunk).
    proba = est.predict_proba(IRIS)
    assert got["count"] == len(IRIS)
    assert got["predictions"] == est.predict(IRIS).tolist()
    assert got["labels"] == [CLASSES[p] for p in est.predict(IRIS)]
    assert got["probabilities"] == [dict(zip(CLASSES, r)) for r in proba.tolist()]
    assert got["confidences"] == proba.max(axis=1).tolist()
    assert got["cached"] == 0
    for i in range(0, len(IRIS), 25):  # one row: the same numbers as a one-row call in-process
        single = live_server.post("/predict/iris",
                                  json={"version": version, "features": IRIS[i].tolist()}).json()
        expected = est.predict_proba(IRIS[i : i + 1])[0].tolist()
        assert single["probabilities"] == dict(zip(CLASSES, expected))


def test_regressor_answers_a_float_without_probabilities(
    live_server: LiveServer, demo_repo: Path
) -> None:
    data = datasets.load_diabetes().data
    est = _estimator(demo_repo, "diabetes", "1")
    single = live_server.post("/predict/diabetes", json={"features": data[0].tolist()}).json()
    assert single["prediction"] == est.predict(data[:1])[0]
    assert isinstance(single["prediction"], float)
    assert "probabilities" not in single and "confidence" not in single and "label" not in single
    batch = live_server.post("/predict/batch",
                             json={"model": "diabetes", "instances": data[:100].tolist()}).json()
    assert batch["predictions"] == est.predict(data[:100]).tolist()  # the same 100-row call
    assert set(batch) == {"model", "version", "count", "predictions", "cached", "request_id"}


def test_pipeline_classifier_with_named_features(live_server: LiveServer, demo_repo: Path) -> None:
    data = datasets.load_breast_cancer()
    info = live_server.get("/models/breast_cancer").json()
    names = info["versions"][0]["feature_names"]
    row = dict(zip(names, data.data[3].tolist()))
    got = live_server.post("/predict/breast_cancer", json={"features": row}).json()
    est = _estimator(demo_repo, "breast_cancer", "1")
    assert got["probabilities"] == dict(zip(["malignant", "benign"],
                                            est.predict_proba(data.data[3:4])[0].tolist()))


def test_batch_accepts_named_rows_and_max_batch(live_server: LiveServer) -> None:
    rows = [dict(zip(NAMES, r)) for r in IRIS[:1000 % 150].tolist()]
    resp = live_server.post("/predict/batch", json={"model": "iris", "instances": rows})
    assert resp.status_code == 200 and resp.json()["count"] == len(rows)
    full = {"model": "iris", "version": "stable", "instances": (IRIS.tolist() * 7)[:1000]}
    resp = live_server.post("/predict/batch", json=full)
    assert resp.status_code == 200 and resp.json()["count"] == 1000
    assert resp.json()["version"] == "1"


def test_health_ready_status_and_models(live_server: LiveServer) -> None:
    assert live_server.get("/health").json() == {"status": "ok"}
    ready = live_server.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"breast_cancer": ["1"], "diabetes": ["1"],
                                      "iris": ["1", "2"]}
    status = live_server.get("/status").json()
    assert status["models"]["iris"]["labels"] == {"stable": "1", "canary": "2"}
    assert status["uptime_seconds"] >= 0 and "cache" in status
    models = live_server.get("/models").json()["models"]
    assert [m["name"] for m in models] == ["breast_cancer", "diabetes", "iris"]
    iris = live_server.get("/models/iris").json()
    assert iris["latest"] == "2"
    v1, v2 = iris["versions"]
    assert v1["state"] == v2["state"] == "AVAILABLE"
    assert v1["feature_names"] == NAMES and v1["class_names"] == CLASSES
    assert v1["estimator"] == "LogisticRegression" and v2["estimator"] == "RandomForestClassifier"
    assert len(v1["sha256"]) == 64


def test_access_log_is_one_json_object_per_line(live_server: LiveServer) -> None:
    live_server.post("/predict", json={"model": "iris", "features": [1, 2, 3, 4]},
                     headers={"X-Request-ID": "log-probe-1"})
    def logged() -> dict | None:  # type: ignore[type-arg]
        # Complete lines only: the workers are writing to this file while we read it.
        for line in live_server.log_text().split("\n")[:-1]:
            record = orjson.loads(line)  # every line must be JSON
            if record.get("request_id") == "log-probe-1":
                return record
        return None
    from tests.conftest import wait_until
    record = wait_until(logged, 5)
    assert record["route"] == "/predict" and record["status"] == 200
    assert record["model"] == "iris" and record["version"] == "2"
    assert record["latency_ms"] >= 0
    assert "1, 2, 3, 4" not in live_server.log_text()  # no feature values in logs
