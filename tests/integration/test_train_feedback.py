"""POST /train/stream {"source": "feedback"} against a real gunicorn: predictions logged with
request ids get their true classes through POST /feedback, a run trains on exactly those rows
(labels mapped back to class values, rows that don't fit skipped and counted in the first
event) and the new version serves; requests that cannot train get a JSON error before any
stream."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_iris

from tests.conftest import ADMIN_TOKEN, LiveServer, free_port, wait_until
from tests.integration.test_training import (
    CSV,
    IRIS_HEADER,
    both_workers_up,
    epochs_of,
    everywhere,
    run,
    versions,
)

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROWS = list(range(0, 150, 2))[:60]  # every other iris row: 25 setosa, 25 versicolor, 10 virginica
UNKNOWN = ["daisy", "tulip"]  # feedback whose label is not a class of iris


def predict(server: LiveServer, prefix: str, rows: list[int]) -> list[str]:
    """One logged prediction per iris row, each with its own request id."""
    data = load_iris().data
    ids = []
    for i in rows:
        rid = f"{prefix}-{i}"
        resp = server.post("/predict/iris", json={"features": data[i].tolist(),
                                                  "request_id": rid})
        assert resp.status_code == 200 and resp.json()["request_id"] == rid, resp.text
        ids.append(rid)
    return ids


def wait_logged(server: LiveServer, admin: dict[str, str], ids: list[str],
                model: str = "iris") -> None:
    """Until every worker has written these rows (each flushes its own buffer)."""
    def written() -> bool:
        resp = server.get("/predictions", params={"model": model, "limit": "1000"},
                          headers=admin)
        if resp.status_code != 200:  # e.g. 503 while the log's database is busy: again
            return False
        return set(ids) <= {r["request_id"] for r in resp.json()["predictions"]}

    wait_until(written, 20, every=0.2)


def give_feedback(server: LiveServer, labels: dict[str, str]) -> None:
    items = [{"request_id": rid, "label": label} for rid, label in labels.items()]
    body = server.post("/feedback", json={"items": items}).json()
    assert body["recorded"] == len(items), body


@pytest.fixture(scope="module")
def fed(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory,
        ) -> Iterator[LiveServer]:
    """A server whose log holds 60 iris predictions with their true class names, and two
    more whose feedback names no class of iris."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    tmp = tmp_path_factory.mktemp("feedback")
    repo = Path(shutil.copytree(demo_repo, tmp / "models"))
    server = both_workers_up(LiveServer(tmp / "logs", repo, MODEL_POLL_SECONDS="0",
                                        CACHE="off").start())
    iris = load_iris()
    ids = predict(server, "fb", ROWS)
    odd = predict(server, "odd", [1, 3])
    wait_logged(server, admin, ids + odd)
    truth = {rid: str(iris.target_names[iris.target[i]]) for rid, i in zip(ids, ROWS)}
    give_feedback(server, {**truth, **dict(zip(odd, UNKNOWN))})
    yield server
    server.stop(quick=True)


def test_feedback_trains_a_new_version_that_serves(
    fed: LiveServer, admin: dict[str, str],
) -> None:
    before = versions(fed, "iris")
    events = run(fed, admin, json={"model": "iris", "source": "feedback", "epochs": 30})
    first = events[0][1]
    assert first["status"] == "started" and isinstance(first["pid"], int)
    assert first["source"] == "feedback" and first["rows"] == len(ROWS)
    assert first["skipped"] == {"not_a_class": 2}
    assert "'daisy'" in first["note"] and "'tulip'" in first["note"]
    assert [e["epoch"] for e in epochs_of(events)] == list(range(1, 31))
    assert events[-1] == ("message", "[DONE]")
    done = events[-2][1]
    assert done["status"] == "complete", events[-2]
    new = done["version"]
    assert new not in before
    everywhere(fed, "iris", before | {new})

    iris = load_iris()
    answer = fed.post(f"/predict/iris/versions/{new}",
                      json={"features": iris.data[0].tolist()}).json()
    assert answer["version"] == new and answer["label"] == "setosa"
    batch = fed.post("/predict/batch", json={"model": "iris", "version": new,
                                             "instances": iris.data.tolist()}).json()
    # Trained on 45 of the 60 rows (25 % held out), it still tells the classes apart.
    assert np.mean(np.array(batch["predictions"]) == iris.target) > 0.7
    latest = fed.get("/models/iris").json()["versions"][-1]
    assert latest["version"] == new
    assert latest["class_names"] == ["setosa", "versicolor", "virginica"]
    assert latest["description"] == "SGD trained by /train/stream"


BAD = [  # (id, query, JSON body or CSV text, status, code)
    ("unknown-source", {}, {"model": "iris", "source": "log"}, 422, "validation_error"),
    ("bad-since", {}, {"model": "iris", "source": "feedback", "since": "yesterday"}, 422,
     "validation_error"),
    ("since-bool", {}, {"model": "iris", "source": "feedback", "since": True}, 422,
     "validation_error"),
    ("since-without-feedback", {}, {"model": "iris", "since": 0}, 422, "validation_error"),
    ("unknown-model", {}, {"model": "nope", "source": "feedback"}, 404, "model_not_found"),
    ("unknown-label", {}, {"model": "iris", "source": "feedback", "version": "gold"}, 404,
     "version_not_found"),
    # Every row was predicted by version 2 (latest): version 1 has no feedback.
    ("no-rows-of-version", {}, {"model": "iris", "source": "feedback", "version": "1"}, 422,
     "not_enough_feedback"),
    ("no-rows-since", {}, {"model": "iris", "source": "feedback",
                           "since": "2999-01-01T00:00:00Z"}, 422, "not_enough_feedback"),
    ("query-version", {"model": "iris", "source": "feedback", "version": "stable"}, None, 422,
     "not_enough_feedback"),
    ("query-bad-since", {"model": "iris", "source": "feedback", "since": "noon"}, None, 422,
     "validation_error"),
    ("csv-and-feedback", {"model": "iris", "source": "feedback"}, IRIS_HEADER + "\n", 422,
     "validation_error"),
]


@pytest.mark.parametrize(("params", "body", "status", "code"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_requests_that_cannot_train_get_json_errors_before_any_stream(
    fed: LiveServer, admin: dict[str, str], params: dict[str, str], body: Any, status: int,
    code: str,
) -> None:
    kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {}
    headers = dict(admin)
    if isinstance(body, str):
        kw["data"], headers = body, {**headers, **CSV}
    before = versions(fed, "iris")
    resp = fed.post("/train/stream", params=params, headers=headers, **kw)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["code"] == code
    if code == "not_enough_feedback":
        assert "0 usable labelled row(s)" in resp.json()["error"]
    assert versions(fed, "iris") == before


def test_too_little_feedback_says_how_many_rows_there_are(
    fed: LiveServer, admin: dict[str, str],
) -> None:
    # A regressor's truth is a value; the fixture gave diabetes none.
    ids = []
    for i in range(3):
        rid = f"dia-{i}"
        assert fed.post("/predict/diabetes", json={"features": [0.01 * i] * 10,
                                                   "request_id": rid}).status_code == 200
        ids.append(rid)
    wait_logged(fed, admin, ids, "diabetes")
    body = fed.post("/feedback", json={"items": [{"request_id": rid, "value": 150.0 + i}
                                                 for i, rid in enumerate(ids)]}).json()
    assert body["recorded"] == 3
    resp = fed.post("/train/stream", headers=admin,
                    json={"model": "diabetes", "source": "feedback"})
    assert resp.status_code == 422 and resp.json()["code"] == "not_enough_feedback"
    assert "'diabetes' has 3 usable labelled row(s)" in resp.json()["error"]
    assert "at least 4" in resp.json()["error"]


@pytest.mark.parametrize(("env", "status", "code"), [
    ({"PREDICTION_LOG": "off"}, 404, "prediction_log_off"),
    ({"PREDICTION_LOG_INPUTS": "off"}, 422, "features_not_logged"),
    ({"PREDICTION_LOG": "postgresql://nobody@127.0.0.1:{port}/log"}, 503,
     "prediction_log_unavailable"),
], ids=["log-off", "inputs-off", "database-down"])
def test_a_log_that_cannot_be_trained_from_is_a_json_error(
    server_factory: Callable[..., LiveServer], model_repo: Path, admin: dict[str, str],
    env: dict[str, str], status: int, code: str,
) -> None:
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    server = server_factory(model_repo, WORKERS="2", **env)
    if env.get("PREDICTION_LOG_INPUTS") == "off":  # rows and feedback, but no features
        ids = predict(server, "hashed", list(range(0, 150, 15)))
        wait_logged(server, admin, ids)
        give_feedback(server, {rid: "setosa" for rid in ids})
    resp = server.post("/train/stream", headers=admin,
                       json={"model": "iris", "source": "feedback"})
    assert resp.status_code == status, resp.text
    assert resp.json()["code"] == code
    assert versions(server, "iris") == {"1", "2"}
