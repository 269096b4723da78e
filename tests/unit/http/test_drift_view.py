"""GET /models/<m>/versions/<v>/drift through the Flask test client: the answer's shape, a
label as the version, 404 for unknown targets, ``drift_off`` under DRIFT=off, rows that
came through the A/B door counted with the prediction log off, and the worker's drift
counting in GET /status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from server import create_app
from server.config import Settings
from tests.conftest import wait_until


def make(demo_repo: Path, runtime: Path, **settings: object) -> FlaskClient:
    app = create_app(Settings(model_dir=demo_repo, model_poll_seconds=0, cache="off",
                              runtime_dir=str(runtime), prediction_log="off",
                              drift_min_rows=5, **settings))  # type: ignore[arg-type]
    return app.test_client()


@pytest.fixture(scope="module")
def client(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    with make(demo_repo, tmp_path_factory.mktemp("runtime")) as c:
        yield c


def test_the_answer_names_its_window_rows_and_scores(client: FlaskClient) -> None:
    for i in range(6):
        assert client.post("/predict/ab", json={"experiment": "iris-ab", "user_id": f"u{i}",
                                                "features": [5.1, 3.5, 1.4, 0.2]}).status_code \
            == 200

    def counted() -> int:
        return sum(client.get(f"/models/iris/versions/{v}/drift").json["rows"]  # type: ignore
                   for v in ("stable", "canary"))

    wait_until(lambda: counted() == 6, 5)  # the worker's flush, once a second
    body = client.get("/models/iris/versions/stable/drift").json
    assert body is not None and body["version"] == "1" and body["window_seconds"] == 3600
    assert set(body["features"]) == {"sepal_length", "sepal_width", "petal_length",
                                     "petal_width"}
    assert body["counts_scope"] == "all workers of this server"


@pytest.mark.parametrize(("path", "code"), [
    ("/models/nope/versions/1/drift", "model_not_found"),
    ("/models/iris/versions/7/drift", "version_not_found"),
])
def test_unknown_targets_are_404(client: FlaskClient, path: str, code: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 404 and resp.json is not None and resp.json["code"] == code


def test_status_shows_this_workers_drift_counting(client: FlaskClient) -> None:
    drift = client.get("/status").json["drift"]  # type: ignore[index]
    assert drift["state"] == "on" and drift["window_seconds"] == 3600
    assert drift["redis"] is None and drift["dropped"] == 0
    assert {"pending", "sampled_out", "leader"} <= set(drift)


def test_drift_off_answers_404_drift_off(demo_repo: Path, tmp_path: Path) -> None:
    with make(demo_repo, tmp_path, drift="off") as c:
        assert c.post("/predict/iris", json={"features": [5.1, 3.5, 1.4, 0.2]}).status_code \
            == 200
        resp = c.get("/models/iris/versions/1/drift")
        status = c.get("/status").json
    assert resp.status_code == 404 and resp.json is not None
    assert resp.json["code"] == "drift_off"
    assert status is not None and status["drift"] == {"state": "off"}
