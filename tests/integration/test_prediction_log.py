"""The prediction log on a real gunicorn (2 workers) with SQLite and a real PostgreSQL: every
door's rows land in GET /predictions, feedback gives the accuracy computed by hand, and the
database dying under load fails no prediction."""

from __future__ import annotations

import signal
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from simple_websocket import Client
from sklearn.datasets import load_iris

from tests.conftest import LiveServer, PostgresServer, free_port, rss_mb, scrape_metrics, wait_until

pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logged(request: pytest.FixtureRequest, demo_repo: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two workers logging to SQLite, or to the session's PostgreSQL (a database of its own)."""
    tmp = tmp_path_factory.mktemp("plog")
    url = f"sqlite:///{tmp / 'log.db'}"
    if request.param == "postgresql":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        url = _fresh_database(pg, "plog_doors")
    server = LiveServer(tmp, demo_repo, WORKERS="2", PREDICTION_LOG=url,
                        PREDICTION_LOG_FLUSH_SECONDS="0.1", MODEL_POLL_SECONDS="0").start()
    yield server
    server.stop(quick=True)


def _fresh_database(pg: PostgresServer, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


def _logged(server: LiveServer, admin: dict[str, str], request_id: str) -> list[dict[str, Any]]:
    resp = server.get(f"/predictions?request_id={request_id}", headers=admin)
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"]  # type: ignore[no-any-return]


def _wait_logged(server: LiveServer, admin: dict[str, str], request_id: str,
                 rows: int = 1) -> list[dict[str, Any]]:
    return wait_until(lambda: (found := _logged(server, admin, request_id))
                      and len(found) >= rows and found, 15)  # type: ignore[no-any-return]


def _native(server: LiveServer, rid: str) -> None:
    resp = server.post("/predict/iris", json={"features": ROW, "request_id": rid})
    assert resp.status_code == 200, resp.text


def _batch(server: LiveServer, rid: str) -> None:
    resp = server.post("/predict/batch", json={"model": "iris", "instances": [ROW, ROW, ROW],
                                               "request_id": rid})
    assert resp.status_code == 200, resp.text


def _tfserving(server: LiveServer, rid: str) -> None:
    resp = server.post("/v1/models/iris:predict", json={"instances": [ROW, ROW]},
                       headers={"X-Request-ID": rid})
    assert resp.status_code == 200, resp.text


def _v2_json(server: LiveServer, rid: str) -> None:
    resp = server.post("/v2/models/iris/infer", json={
        "id": rid, "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64",
                               "data": ROW + ROW}]}, headers={"X-Request-ID": rid})
    assert resp.status_code == 200, resp.text


def _v2_binary(server: LiveServer, rid: str) -> None:
    head = (b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32",'
            b'"parameters":{"binary_data_size":16}}]}')
    resp = server.post("/v2/models/iris/infer", data=head + struct.pack("<4f", *ROW),
                       headers={"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream",
                                "X-Request-ID": rid})
    assert resp.status_code == 200, resp.text


def _stream(server: LiveServer, rid: str) -> None:
    resp = server.post("/predict/stream", json={"model": "iris", "instances": [ROW] * 5},
                       headers={"X-Request-ID": rid})
    assert resp.status_code == 200 and resp.text.rstrip().endswith("[DONE]"), resp.text


def _csv(server: LiveServer, rid: str) -> None:
    body = "sepal_length,sepal_width,petal_length,petal_width\n" + \
        "\n".join(",".join(map(str, ROW)) for _ in range(4)) + "\n"
    resp = server.post("/predict/csv?model=iris", data=body,
                       headers={"Content-Type": "text/csv", "X-Request-ID": rid})
    assert resp.status_code == 200, resp.text


def _ab(server: LiveServer, rid: str) -> None:
    resp = server.post("/predict/ab", json={"experiment": "iris-ab", "user_id": "u-log",
                                            "features": ROW, "request_id": rid})
    assert resp.status_code == 200, resp.text


def _websocket(server: LiveServer, rid: str) -> None:
    ws = Client.connect(server.url.replace("http", "ws") + "/ws/predict")
    try:
        ws.send(f'{{"model": "iris", "features": [5.1, 3.5, 1.4, 0.2], "request_id": "{rid}"}}')
        assert '"prediction"' in ws.receive(timeout=10)
    finally:
        ws.close()


DOORS: dict[str, tuple[Callable[[LiveServer, str], None], int]] = {
    "native": (_native, 1), "batch": (_batch, 3), "tfserving": (_tfserving, 2),
    "v2": (_v2_json, 2), "v2-binary": (_v2_binary, 1), "stream": (_stream, 5),
    "csv": (_csv, 4), "ab": (_ab, 1), "websocket": (_websocket, 1),
}


def test_every_door_logs_every_row(logged: LiveServer, admin: dict[str, str]) -> None:
    sent = {}
    for door, (send, rows) in DOORS.items():
        rid = f"log-{door}-{time.monotonic_ns()}"
        send(logged, rid)
        sent[door] = (rid, rows)
    for door, (rid, rows) in sent.items():
        found = _wait_logged(logged, admin, rid, rows)
        assert sorted(r["row"] for r in found) == list(range(rows)), door
        assert {r["model"] for r in found} == {"iris"}, door
        first = found[0]
        assert first["features"] == pytest.approx(ROW, abs=1e-6), door
        assert first["output"]["label"] == "setosa", door
        assert first["door"] == door.split("-")[0], door
    ab = _logged(logged, admin, sent["ab"][0])[0]
    assert ab["experiment"] == "iris-ab" and ab["arm"] in ("control", "treatment")


def test_feedback_gives_the_accuracy_computed_by_hand(logged: LiveServer,
                                                      admin: dict[str, str]) -> None:
    iris = load_iris()
    rng = np.random.default_rng(7)
    picks = rng.choice(len(iris.data), 100, replace=False)
    version = logged.get("/models/iris").json()["latest"]
    before = logged.get(f"/models/iris/versions/{version}/quality").json()
    predicted: dict[str, str] = {}
    truth: dict[str, str] = {}
    stamp = time.monotonic_ns()
    for n, i in enumerate(picks):
        rid = f"fb-{stamp}-{n}"
        resp = logged.post(f"/predict/iris/versions/{version}",
                           json={"features": iris.data[i].tolist(), "request_id": rid})
        predicted[rid] = resp.json()["label"]
        # Every fifth truth is deliberately another class, so the accuracy is not 1.
        true = int(iris.target[i]) if n % 5 else (int(iris.target[i]) + 1) % 3
        truth[rid] = str(iris.target_names[true])
    _wait_logged(logged, admin, f"fb-{stamp}-99")
    items = [{"request_id": rid, "label": label} for rid, label in truth.items()]
    resp = logged.post("/feedback", json={"items": items + [{"request_id": "never-sent",
                                                             "label": "setosa"}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["recorded"] == 100 and body["not_found"] == 1
    assert body["results"][-1] == {"request_id": "never-sent", "row": 0, "status": "not_found"}
    after = logged.get(f"/models/iris/versions/{version}/quality").json()
    labelled = after["labelled"] - before["labelled"]
    assert labelled == 100
    if before["labelled"] == 0:
        correct = sum(predicted[r] == truth[r] for r in truth)
        assert after["accuracy"] == correct / 100
        for name, figures in after["classes"].items():
            tp = sum(predicted[r] == name and truth[r] == name for r in truth)
            n_pred = sum(predicted[r] == name for r in truth)
            n_true = sum(truth[r] == name for r in truth)
            assert figures["precision"] == (tp / n_pred if n_pred else None), name
            assert figures["recall"] == (tp / n_true if n_true else None), name
            assert figures["support"] == n_true


def test_regressor_feedback_gives_mae_and_rmse(logged: LiveServer,
                                               admin: dict[str, str]) -> None:
    rid = f"reg-{time.monotonic_ns()}"
    resp = logged.post("/predict/batch", json={"model": "diabetes", "request_id": rid,
                                               "instances": [[0.01] * 10, [-0.02] * 10]})
    values = resp.json()["predictions"]
    _wait_logged(logged, admin, rid, 2)
    version = resp.json()["version"]
    before = logged.get(f"/models/diabetes/versions/{version}/quality").json()
    resp = logged.post("/feedback", json={"items": [
        {"request_id": rid, "row": 0, "value": values[0] + 3.0},
        {"request_id": rid, "row": 1, "value": values[1] - 4.0}]})
    assert resp.json()["recorded"] == 2
    after = logged.get(f"/models/diabetes/versions/{version}/quality").json()
    assert after["labelled"] - before["labelled"] == 2
    if before["labelled"] == 0:
        assert after["mae"] == pytest.approx(3.5)
        assert after["rmse"] == pytest.approx(((9 + 16) / 2) ** 0.5)


@pytest.mark.parametrize(("path", "status"), [
    ("/predictions?since=yesterday", 422), ("/predictions?limit=0", 422),
    ("/predictions?limit=5000", 422), ("/predictions?cursor=abc", 422),
    ("/predictions?limit=%D9%A1", 422), ("/predictions?request_id=a%00b", 422),
    ("/predictions?cursor=1.0_99999999999999999999999", 422),
    ("/predictions?since=1e12", 422), ("/models/iris/versions/1/quality?since=-1e12", 422),
])
def test_bad_queries_are_4xx(logged: LiveServer, admin: dict[str, str], path: str,
                             status: int) -> None:
    resp = logged.get(path, headers=admin)
    assert resp.status_code == status, resp.text
    assert resp.json()["code"] == "validation_error"


@pytest.mark.parametrize("body", [
    {"request_id": "x"}, {"request_id": "x", "label": "a", "value": 1.0},
    {"items": []}, {"request_id": "", "label": "a"}, {"request_id": "x", "value": "NaN"},
    {"request_id": "x", "row": -1, "label": "a"}, ["x"], {"request_id": "a\u0000b", "label": "a"},
    {"items": [{"request_id": "x", "label": "a"}] * 10_001},
])
def test_bad_feedback_is_422(logged: LiveServer, body: Any) -> None:
    resp = logged.post("/feedback", json=body)
    assert resp.status_code in (400, 422), resp.text


def test_reading_the_log_needs_the_admin_token(logged: LiveServer) -> None:
    assert logged.get("/predictions").status_code == 401


def test_pages_follow_the_next_cursor(logged: LiveServer, admin: dict[str, str]) -> None:
    rid = f"page-{time.monotonic_ns()}"
    logged.post("/predict/batch", json={"model": "iris", "instances": [ROW] * 7,
                                        "request_id": rid})
    _wait_logged(logged, admin, rid, 7)
    seen: list[int] = []
    path = f"/predictions?request_id={rid}&limit=3"
    while path:
        body = logged.get(path, headers=admin).json()
        seen += [r["row"] for r in body["predictions"]]
        path = f"/predictions?request_id={rid}&limit=3&cursor={body['next']}" \
            if body["next"] else ""
    assert sorted(seen) == list(range(7)) and len(seen) == 7


# --- settings ----------------------------------------------------------------------------
def test_inputs_off_stores_a_hash_and_sample_zero_logs_nothing(
        demo_repo: Path, server_factory: Callable[..., LiveServer], tmp_path: Path,
        admin: dict[str, str]) -> None:
    hashed = server_factory(demo_repo, WORKERS="1", PREDICTION_LOG_INPUTS="off",
                            PREDICTION_LOG=f"sqlite:///{tmp_path / 'hashed.db'}",
                            PREDICTION_LOG_FLUSH_SECONDS="0.1")
    rid = f"hash-{time.monotonic_ns()}"
    _native(hashed, rid)
    row = _wait_logged(hashed, admin, rid)[0]
    assert row["features"] is None and len(row["features_sha256"]) == 32
    silent = server_factory(demo_repo, WORKERS="1", PREDICTION_LOG_SAMPLE="0",
                            PREDICTION_LOG=f"sqlite:///{tmp_path / 'silent.db'}",
                            PREDICTION_LOG_FLUSH_SECONDS="0.1")
    for _ in range(20):
        _native(silent, "silent")
    time.sleep(0.5)
    assert _logged(silent, admin, "silent") == []


def test_log_off_serves_and_its_endpoints_say_so(
        demo_repo: Path, server_factory: Callable[..., LiveServer],
        admin: dict[str, str]) -> None:
    server = server_factory(demo_repo, WORKERS="1", PREDICTION_LOG="off")
    _native(server, "off")
    assert server.get("/ready").json()["prediction_log"] == "off"
    resp = server.get("/predictions", headers=admin)
    assert resp.status_code == 404 and resp.json()["code"] == "prediction_log_off"
    assert server.post("/feedback", json={"request_id": "x", "label": "a"}).status_code == 404


# --- fail-open ---------------------------------------------------------------------------
def test_database_unreachable_at_start_serves_and_counts_drops(
        demo_repo: Path, server_factory: Callable[..., LiveServer]) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    server = server_factory(demo_repo, WORKERS="1", PREDICTION_LOG=dead,
                            PREDICTION_LOG_BUFFER_ROWS="50", PREDICTION_LOG_FLUSH_SECONDS="0.1")
    for _ in range(20):
        resp = server.post("/predict/batch", json={"model": "iris", "instances": [ROW] * 5})
        assert resp.status_code == 200
    ready = server.get("/ready")
    assert ready.status_code == 200 and ready.json()["prediction_log"] == "down"
    status = server.get("/status").json()["prediction_log"]
    assert status["state"] == "down" and status["last_error"]
    assert status["pending"] <= 50 and status["dropped"] >= 50
    text = scrape_metrics(server)
    dropped = [line for line in text.splitlines()
               if line.startswith("prediction_log_dropped_total")]
    assert dropped and float(dropped[0].split()[-1]) >= 50


def test_a_locked_sqlite_never_stalls_predictions(
        demo_repo: Path, server_factory: Callable[..., LiveServer], tmp_path: Path,
        admin: dict[str, str]) -> None:
    """The writer waits up to 2 s per attempt on a database someone else holds locked; the
    worker's event loop does not wait with it (writes run in gevent's threadpool)."""
    db = tmp_path / "locked.db"
    server = server_factory(demo_repo, WORKERS="1", PREDICTION_LOG=f"sqlite:///{db}",
                            PREDICTION_LOG_FLUSH_SECONDS="0.1")
    _native(server, "warm")
    _wait_logged(server, admin, "warm")
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        worst = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            _native(server, "while-locked")
            worst = max(worst, time.perf_counter() - t0)
        # One busy wait of the writer is 2 s: a request never waited on it.
        assert worst < 1.0, worst
        assert server.get("/status").json()["prediction_log"]["pending"] > 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_until(lambda: _logged(server, admin, "while-locked"), 20)


def test_killing_postgres_under_load_fails_no_prediction_and_logging_resumes(
        demo_repo: Path, server_factory: Callable[..., LiveServer],
        admin: dict[str, str]) -> None:
    pg = PostgresServer()  # a cluster of its own: this test kills it
    pg.start()
    try:
        server = server_factory(demo_repo, WORKERS="2", PREDICTION_LOG=pg.url,
                                PREDICTION_LOG_FLUSH_SECONDS="0.1")
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with requests.Session() as s:
                while not stop.is_set():
                    r = s.post(server.url + "/predict/iris", json=ROW, timeout=10)
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        pg.signal(signal.SIGKILL)
        pg.proc.wait(10)  # type: ignore[union-attr]
        # The load goes on while the log is down, until /ready says so (or 10 s pass).
        try:
            wait_until(lambda: server.fresh("GET", "/ready").json()["prediction_log"] == "down",
                       10, 0.1)
        except AssertionError:
            pass  # the assertion below names what it said
        down = server.fresh("GET", "/ready").json()["prediction_log"]
        pg.proc = None
        pg.start()  # the same cluster and port
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(15)
        assert statuses and set(statuses) == {200}, set(statuses)
        assert down == "down"
        rid = f"after-{time.monotonic_ns()}"
        _native(server, rid)
        _wait_logged(server, admin, rid)
    finally:
        pg.stop()
        pg.remove()



def test_a_stuck_database_keeps_each_workers_memory_within_the_buffer(
        demo_repo: Path, server_factory: Callable[..., LiveServer], tmp_path: Path) -> None:
    """With the database locked for the whole run, each worker buffers at most
    PREDICTION_LOG_BUFFER_ROWS rows and drops the rest: 8 clients sending 500-row batches
    (200,000 rows, 40 times the buffer) grow a worker's RSS by far less than they would
    unbounded."""
    db = tmp_path / "stuck.db"
    server = server_factory(demo_repo, WORKERS="1", PREDICTION_LOG=f"sqlite:///{db}",
                            PREDICTION_LOG_BUFFER_ROWS="5000", CACHE="off",
                            PREDICTION_LOG_FLUSH_SECONDS="0.1")
    _native(server, "before-lock")
    pid = server.get("/status").json()["pid"]
    time.sleep(1.0)
    before = rss_mb(pid)
    holder = sqlite3.connect(db, isolation_level=None)
    rng = np.random.default_rng(3)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        deadline = time.monotonic() + 20  # a guard: the rows take a few seconds

        def load(seed: int) -> int:
            local = np.random.default_rng(seed)
            sent = 0
            with requests.Session() as s:
                while sent < 25_000 and time.monotonic() < deadline:
                    rows = local.normal(5, 2, (500, 4)).round(6).tolist()
                    r = s.post(server.url + "/predict/batch",
                               json={"model": "iris", "instances": rows}, timeout=10)
                    assert r.status_code == 200
                    sent += 500
            return sent

        threads_sent: list[int] = []
        workers = [threading.Thread(target=lambda seed=seed: threads_sent.append(load(seed)))
                   for seed in rng.integers(0, 1 << 30, 8).tolist()]
        for t in workers:
            t.start()
        for t in workers:
            t.join(30)
        status = server.get("/status").json()["prediction_log"]
        grown = rss_mb(pid) - before
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert sum(threads_sent) >= 50_000
    assert status["pending"] <= 5000 and status["dropped"] >= sum(threads_sent) - 20_000
    assert grown < 40, grown
