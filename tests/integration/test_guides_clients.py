"""The guides' clients (shared/seeds) are understood: ``model_version``, a body
``request_id``, and ``POST /predict?user_id=`` routed through the model's experiment."""

from __future__ import annotations

import pytest

from tests.conftest import LiveServer

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.mark.parametrize(("path", "body"), [
    ("/predict/iris?model_version=1", {"features": ROW}),
    ("/predict", {"model": "iris", "model_version": 1, "features": ROW}),
    ("/predict", {"model": "iris", "model_version": "stable", "features": ROW}),
])
def test_model_version_is_an_alias_of_version(live_server: LiveServer, path: str,
                                              body: dict[str, object]) -> None:
    answer = live_server.post(path, json=body)
    assert answer.status_code == 200 and answer.json()["version"] == "1"


def test_model_version_in_a_batch(live_server: LiveServer) -> None:
    answer = live_server.post("/predict/batch", json={"model": "iris", "model_version": "1",
                                                      "instances": [ROW, ROW]})
    assert answer.status_code == 200 and answer.json()["version"] == "1"


@pytest.mark.parametrize("path", ["/predict/iris", "/predict/batch", "/predict/ab"])
def test_a_body_request_id_is_the_requests_id(live_server: LiveServer, path: str) -> None:
    body: dict[str, object] = {"/predict/iris": {"features": ROW},
            "/predict/batch": {"model": "iris", "instances": [ROW]},
            "/predict/ab": {"experiment": "iris-ab", "user_id": "u1",
                            "features": ROW}}[path]  # type: ignore[assignment]
    answer = live_server.post(path, json={**body, "request_id": "order-42.a:b"})
    assert answer.status_code == 200
    assert answer.json()["request_id"] == answer.headers["X-Request-ID"] == "order-42.a:b"


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "", "semi;colon"])
def test_a_malformed_body_request_id_is_422(live_server: LiveServer, bad: str) -> None:
    answer = live_server.post("/predict/iris", json={"features": ROW, "request_id": bad})
    assert answer.status_code == 422
    assert answer.json()["details"][0]["loc"] == ["request_id"]


@pytest.mark.parametrize("user", ["u42", "u7", "alice", "bob"])
def test_predict_with_user_id_goes_through_the_experiment(live_server: LiveServer,
                                                          user: str) -> None:
    ab = live_server.post("/predict/ab", json={"experiment": "iris-ab", "user_id": user,
                                               "features": ROW}).json()
    by_query = live_server.post(f"/predict?user_id={user}",
                                json={"model": "iris", "features": ROW}).json()
    by_body = live_server.post("/predict/iris", json={"features": ROW, "user_id": user}).json()
    for routed in (by_query, by_body):
        assert (routed["experiment"], routed["arm"], routed["version"]) == (
            "iris-ab", ab["arm"], ab["version"])


def test_a_named_version_or_a_model_without_experiment_is_served_directly(
        live_server: LiveServer) -> None:
    pinned = live_server.post("/predict/iris/versions/1?user_id=u42", json=ROW).json()
    assert pinned["version"] == "1" and "experiment" not in pinned
    other = live_server.post("/predict/diabetes?user_id=u42",
                             json=[0.0] * 10).json()
    assert "experiment" not in other and "prediction" in other
