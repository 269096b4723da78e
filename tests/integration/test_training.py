"""POST /train/stream against a real gunicorn: epochs stream as SSE, the new version is served
by every worker, bad requests get JSON errors before any stream, and a client that leaves
stops the training process."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sklearn.datasets import load_iris

from tests.conftest import LiveServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROW = {"features": [6.3, 2.5, 5.0, 1.9]}
IRIS_HEADER = "sepal_length,sepal_width,petal_length,petal_width,target"
EPOCH_KEYS = {"epoch", "total_epochs", "loss", "accuracy"}
CSV = {"Content-Type": "text/csv"}
BODY_LIMIT = 4_000_000


def sse(resp: requests.Response) -> Iterator[tuple[str, str]]:
    """(event name, data) per SSE event, the way an EventSource reads them; pings skipped."""
    name, data = "message", list[str]()
    for raw in resp.iter_lines():
        line = raw.decode() if isinstance(raw, bytes) else raw
        if line == "":
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def run(server: LiveServer, admin: dict[str, str], **kw: Any) -> list[tuple[str, Any]]:
    """The whole stream of one training run, JSON data decoded (``[DONE]`` kept as is)."""
    kw["headers"] = {**admin, **kw.get("headers", {})}
    resp = server.fresh("POST", "/train/stream", stream=True, timeout=30, **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    with resp:
        return [(n, d if d == "[DONE]" else json.loads(d)) for n, d in sse(resp)]


def epochs_of(events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [d for _, d in events if isinstance(d, dict) and "epoch" in d]


def versions(server: LiveServer, model: str) -> set[str]:
    """The versions one worker serves (a fresh connection: any worker)."""
    info = server.fresh("GET", f"/models/{model}").json()
    return {v["version"] for v in info["versions"]}


def everywhere(server: LiveServer, model: str, expected: set[str]) -> None:
    """Wait until both workers serve exactly ``expected`` (siblings reload on a signal)."""
    wait_until(lambda: all(versions(server, model) == expected for _ in range(8)), 5)


def both_workers_up(server: LiveServer) -> LiveServer:
    """/ready answers from the first worker; a worker still booting when a run ends would
    miss the reload signal (its reloader starts after it), so wait until both answer."""
    wait_until(lambda: len({server.fresh("GET", "/status").json()["pid"]
                            for _ in range(20)}) == 2, 20)
    return server


def trainer_repo(server: LiveServer) -> Path:
    return Path(server.env["MODEL_DIR"])


@pytest.fixture(scope="module")
def trainer(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the runs that don't care about exact version numbers."""
    tmp = tmp_path_factory.mktemp("training")
    repo = Path(shutil.copytree(demo_repo, tmp / "models"))
    shutil.copytree(repo / "iris" / "1", repo / "nodata" / "1")  # a model with no data/
    outside = tmp / "secret.csv"
    shutil.copy(repo / "iris" / "data" / "train.csv", outside)
    shutil.copytree(repo / "iris" / "1", repo / "linked" / "1")
    (repo / "linked" / "data").mkdir()
    (repo / "linked" / "data" / "train.csv").symlink_to(outside)
    server = LiveServer(tmp / "logs", repo, MODEL_POLL_SECONDS="0", CACHE="off",
                        MAX_BODY_BYTES=str(BODY_LIMIT)).start()
    yield both_workers_up(server)
    server.stop(quick=True)


def test_iris_run_streams_each_epoch_then_serves_the_new_version_everywhere(
    server_factory: Callable[..., LiveServer], model_repo: Path, admin: dict[str, str],
    tmp_path: Path,
) -> None:
    runtime = tmp_path / "runtime"
    server = both_workers_up(server_factory(model_repo, MODEL_POLL_SECONDS="0",
                                            RUNTIME_DIR=str(runtime)))
    events = run(server, admin, json={"model": "iris", "epochs": 20})
    assert events[0][1]["status"] == "started" and isinstance(events[0][1]["pid"], int)
    epochs = epochs_of(events)
    assert [e["epoch"] for e in epochs] == list(range(1, 21))
    assert all(set(e) == EPOCH_KEYS and e["total_epochs"] == 20 for e in epochs)
    assert all(isinstance(e["loss"], float) and isinstance(e["accuracy"], float) for e in epochs)
    assert epochs[-1]["accuracy"] > 0.8
    assert events[-2:] == [("message", {"status": "complete", "version": "3"}),
                           ("message", "[DONE]")]
    assert len(events) == 1 + 20 + 2

    # Registered in the worker that trained at once, in the other one by the reload signal.
    def all_answer_3(path: str) -> bool:
        answers = Counter(server.fresh("POST", path, json=ROW).json()["version"]
                          for _ in range(12))
        return answers == Counter({"3": 12})

    wait_until(lambda: all_answer_3("/predict/iris")
               and all_answer_3("/predict/iris/versions/3"), 5)
    info = server.get("/models/iris").json()
    assert info["latest"] == "3"
    assert info["versions"][-1]["description"] == "SGD trained by /train/stream"
    assert info["versions"][-1]["class_names"] == ["setosa", "versicolor", "virginica"]
    log = [json.loads(line) for line in (runtime / "events.jsonl").read_text().splitlines()]
    done = [e for e in log if e["type"] == "training_complete"]
    assert [(e["model"], e["version"], e["epochs"], e["accuracy"]) for e in done] == \
        [("iris", "3", 20, epochs[-1]["accuracy"])]


def test_admin_token_is_required(trainer: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = trainer.post("/train/stream", json={"model": "iris"}, headers=headers)
        assert resp.status_code == 401 and resp.json()["code"] == "unauthorized"


BAD = [
    ("unknown-model", {}, {}, {"model": "nope"}, 404, "model_not_found"),
    ("traversal-name", {}, {}, {"model": "../iris"}, 404, "model_not_found"),
    ("epochs-zero", {}, {}, {"model": "iris", "epochs": 0}, 422, "validation_error"),
    ("epochs-5000", {}, {}, {"model": "iris", "epochs": 5000}, 422, "validation_error"),
    ("epochs-string", {}, {}, {"model": "iris", "epochs": "x"}, 422, "validation_error"),
    ("epochs-numeric-string", {}, {}, {"model": "iris", "epochs": "5"}, 422, "validation_error"),
    ("epochs-bool", {}, {}, {"model": "iris", "epochs": True}, 422, "validation_error"),
    ("epochs-float", {}, {}, {"model": "iris", "epochs": 2.5}, 422, "validation_error"),
    ("no-model", {}, {}, {"epochs": 3}, 422, "validation_error"),
    ("unknown-field", {}, {}, {"model": "iris", "lr": 0.1}, 422, "validation_error"),
    ("no-training-data", {}, {}, {"model": "nodata"}, 404, "training_data_not_found"),
    ("data-symlink-outside", {}, {}, {"model": "linked"}, 404, "training_data_not_found"),
    ("bad-json", {"Content-Type": "application/json"}, {}, "{", 400, "bad_json"),
    ("wrong-type", {"Content-Type": "text/plain"}, {}, "model=iris", 415,
     "unsupported_media_type"),
    ("csv-unknown-model", CSV, {"model": "nope"}, "a,target\n1,0\n", 404, "model_not_found"),
    ("csv-no-model", CSV, {}, "a,target\n1,0\n", 422, "validation_error"),
    ("csv-epochs-x", CSV, {"model": "iris", "epochs": "x"}, IRIS_HEADER + "\n", 422,
     "validation_error"),
    ("csv-epochs-0", CSV, {"model": "iris", "epochs": "0"}, IRIS_HEADER + "\n", 422,
     "validation_error"),
    ("csv-missing-feature", CSV, {"model": "iris"},
     "sepal_length,sepal_width,petal_length,target\n5.1,3.5,1.4,0\n", 422, "validation_error"),
    ("csv-missing-target", CSV, {"model": "iris"},
     "sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n", 422,
     "validation_error"),
    ("csv-empty", CSV, {"model": "iris"}, "", 400, "empty_body"),
    ("csv-too-large", CSV, {"model": "iris"}, "x" * (BODY_LIMIT + 1), 413, "body_too_large"),
]


@pytest.mark.parametrize(("headers", "params", "body", "status", "code"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_requests_get_json_errors_before_any_stream(
    trainer: LiveServer, admin: dict[str, str], headers: dict[str, str],
    params: dict[str, str], body: Any, status: int, code: str,
) -> None:
    kw: dict[str, Any] = {"data": body} if isinstance(body, str) else {"json": body}
    resp = trainer.post("/train/stream", headers={**admin, **headers}, params=params, **kw)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["code"] == code


def test_posted_csv_trains_on_its_columns_and_ignores_extra_ones(
    trainer: LiveServer, admin: dict[str, str],
) -> None:
    iris = load_iris()
    # Columns reordered and an extra one: matched by name, the extra one ignored.
    lines = ["note,target,petal_width,petal_length,sepal_width,sepal_length"]
    lines += [f"r{i},{t},{r[3]},{r[2]},{r[1]},{r[0]}"
              for i, (r, t) in enumerate(zip(iris.data, iris.target, strict=True))]
    before = versions(trainer, "iris")
    events = run(trainer, admin, data="\n".join(lines), headers=CSV,
                 params={"model": "iris", "epochs": "15"})
    assert len(epochs_of(events)) == 15 and epochs_of(events)[-1]["accuracy"] > 0.8
    new = events[-2][1]["version"]
    assert new not in before
    everywhere(trainer, "iris", before | {new})
    batch = trainer.post("/predict/batch", json={"model": "iris", "version": new,
                                                 "instances": iris.data.tolist()}).json()
    assert batch["version"] == new
    assert np.mean(np.array(batch["predictions"]) == iris.target) > 0.8


def test_csv_row_that_does_not_parse_ends_in_an_error_event(
    trainer: LiveServer, admin: dict[str, str],
) -> None:
    body = IRIS_HEADER + "\n5.1,3.5,1.4,0.2,0\n4.9,x,1.4,0.2,0\n"
    before = versions(trainer, "iris")
    events = run(trainer, admin, data=body, headers=CSV, params={"model": "iris"})
    assert events[0][1]["status"] == "started"
    assert events[-2] == ("error", {"error": "CSV line 3: not a number", "code": "bad_csv"})
    assert events[-1] == ("message", "[DONE]") and len(events) == 3
    everywhere(trainer, "iris", before)


def test_regression_reports_r2_as_accuracy(trainer: LiveServer, admin: dict[str, str]) -> None:
    events = run(trainer, admin, json={"model": "diabetes", "epochs": 8})
    epochs = epochs_of(events)
    assert len(epochs) == 8 and all(set(e) == EPOCH_KEYS for e in epochs)
    assert epochs[-1]["loss"] > 100  # an MSE in squared disease-progression units
    assert 0.2 < epochs[-1]["accuracy"] < 1
    new = events[-2][1]["version"]
    everywhere(trainer, "diabetes", {"1", new})
    latest = trainer.get("/models/diabetes").json()["versions"][-1]
    assert latest["version"] == new and latest["task"] == "regression"
    assert latest["metrics"]["r2"] == round(epochs[-1]["accuracy"], 4)
    answer = trainer.post("/predict/diabetes", json={"features": [0.0] * 10}).json()
    assert answer["version"] == new and isinstance(answer["prediction"], float)


def test_concurrent_runs_on_one_model_make_distinct_versions(
    trainer: LiveServer, admin: dict[str, str],
) -> None:
    before = versions(trainer, "breast_cancer")
    done: list[str] = []

    def one() -> None:
        events = run(trainer, admin, json={"model": "breast_cancer", "epochs": 5})
        done.append(events[-2][1]["version"])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 2 and len(set(done)) == 2, done
    everywhere(trainer, "breast_cancer", before | set(done))
    assert not list((trainer_repo(trainer) / "breast_cancer").glob(".staging-*"))


def big_iris_csv(copies: int) -> str:
    """Iris repeated with a little noise: big enough that each epoch takes a while."""
    iris = load_iris()
    rng = np.random.default_rng(0)
    X = np.tile(iris.data, (copies, 1)) + rng.normal(0, 0.05, (150 * copies, 4))
    y = np.tile(iris.target, copies)
    rows = (",".join(f"{v:.2f}" for v in x) + f",{t}"
            for x, t in zip(X.tolist(), y.tolist(), strict=True))
    return IRIS_HEADER + "\n" + "\n".join(rows) + "\n"


def test_client_that_disconnects_stops_the_training_process(
    trainer: LiveServer, admin: dict[str, str],
) -> None:
    body = big_iris_csv(600)  # 90,000 rows, about 2 MB: 1000 epochs would take long
    assert len(body) < BODY_LIMIT
    before = versions(trainer, "iris")
    resp = trainer.fresh("POST", "/train/stream", data=body, headers={**admin, **CSV},
                         params={"model": "iris", "epochs": "1000"}, stream=True, timeout=30)
    assert resp.status_code == 200
    stream = sse(resp)
    pid = json.loads(next(stream)[1])["pid"]
    assert json.loads(next(stream)[1])["epoch"] == 1
    os.kill(pid, 0)  # still training
    t0 = time.monotonic()
    resp.close()

    def gone() -> bool:
        try:
            os.kill(pid, 0)  # a zombie would still answer: the worker must reap it too
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, 10)
    assert time.monotonic() - t0 < 5
    everywhere(trainer, "iris", before)
    assert not list((trainer_repo(trainer) / "iris").glob(".staging-*"))
