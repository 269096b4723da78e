"""SSE predictions, CSV scoring, server events, artifact downloads and WebSockets against a
real gunicorn with gevent workers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import sseclient
from simple_websocket import Client
from sklearn import datasets

from tests.answers import assert_close
from tests.conftest import LiveServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

IRIS = datasets.load_iris().data


def events(resp: requests.Response) -> Iterator[tuple[str, str]]:
    """(event name, data) pairs, parsed by an SSE client library."""
    for ev in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
        yield ev.event, ev.data


STREAM_ENV = {"WORKERS": "1", "CACHE": "off", "STREAM_MAX_ROWS": "100000",
              "STREAM_CHUNK_ROWS": "200", "MODEL_POLL_SECONDS": "0"}


@pytest.fixture(scope="module")
def stream_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[LiveServer]:
    """One server for the tests that change nothing on disk and count nothing they do not
    send themselves (a server of its own for each cost a boot and a stop)."""
    tmp = tmp_path_factory.mktemp("streaming")
    server = LiveServer(tmp / "logs", Path(shutil.copytree(demo_repo, tmp / "models")),
                        **STREAM_ENV).start()
    yield server
    server.stop(quick=True)


def big_rows(n: int) -> list[list[float]]:
    rng = np.random.default_rng(0)
    return (IRIS[rng.integers(0, len(IRIS), n)] + rng.normal(0, 0.01, (n, 4))).round(4).tolist()


def test_events_arrive_while_the_rest_is_computed(stream_server: LiveServer) -> None:
    rows = big_rows(50_000)
    t0 = time.monotonic()
    resp = stream_server.post("/predict/stream", json={"model": "iris", "version": "2",
                                                       "instances": rows}, stream=True)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    first = None
    predictions: list[dict[str, Any]] = []
    progress: list[dict[str, Any]] = []
    names = []
    for name, data in events(resp):
        first = first or time.monotonic() - t0
        names.append(name)
        if data == "[DONE]":
            break
        (progress if name == "progress" else predictions).append(json.loads(data))
    total = time.monotonic() - t0
    # Streamed, not buffered: events keep coming for a good part of the request (the
    # part before the first one is mostly parsing the 50,000-row body).
    assert first is not None and total - first > total / 3, (first, total)
    assert names[-1] == "message" and [p["index"] for p in predictions] == list(range(50_000))
    assert progress[-1] == {"done": 50_000, "total": 50_000} and len(progress) == 250
    batch = stream_server.post("/predict/batch", json={"model": "iris", "version": "2",
                                                       "instances": rows[:1000]}).json()
    # iris v2, a forest: the same bits in chunks of 200 rows as in one call
    assert [p["probabilities"] for p in predictions[:1000]] == batch["probabilities"]


def test_disconnect_stops_the_work_and_slow_clients_hold_no_one(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    # A server of its own: its stream counters must be this test's alone.
    stream_server = server_factory(model_repo, **STREAM_ENV)
    body = json.dumps({"model": "iris", "version": "2", "instances": big_rows(100_000)})
    raw = socket.create_connection(("127.0.0.1", stream_server.port))
    raw.sendall((f"POST /predict/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body.encode())
    received = b""
    while b"data: " not in received:
        chunk = raw.recv(65536)
        assert chunk, received
        received += chunk
    # The stream's client now reads nothing: the worker must go on serving everyone else.
    slowest = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        assert stream_server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2]).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 1.0
    raw.close()  # gone without reading: the next write fails and the stream stops
    status = wait_until(lambda: (s := stream_server.get("/status").json())["streams"]
                        ["cancelled"] == 1 and s, 15)
    assert status["streams"]["rows"] < 100_000 and status["streams"]["completed"] == 0


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "iris", "instances": [[1, 2, 3, 4]] * 100_001}, 413, "too_many_rows"),
    ({"model": "iris", "instances": [[1, 2, 3, 4], [1, 2, 3]]}, 422, "validation_error"),
    ({"model": "iris", "instances": [[1, 2, 3, "x"]]}, 422, "validation_error"),
    ({"model": "ghost", "instances": [[1, 2, 3, 4]]}, 404, "model_not_found"),
    ({"model": "iris", "instances": []}, 422, "validation_error"),
])
def test_bad_stream_bodies_are_refused_before_streaming(
    stream_server: LiveServer, body: dict[str, Any], status: int, code: str
) -> None:
    resp = stream_server.post("/predict/stream", json=body)
    assert resp.status_code == status and resp.json()["code"] == code


def _csv(data: np.ndarray, names: list[str]) -> bytes:
    lines = [",".join(names + ["row_id"])]
    lines += [",".join(repr(v) for v in row) + f",r{i}" for i, row in enumerate(data.tolist())]
    return ("\n".join(lines) + "\n").encode()


def test_csv_round_trip_of_100k_rows_in_flat_memory(
        server_factory: Callable[..., LiveServer], model_repo: Path) -> None:
    # The CSV stream's own memory: the prediction log's buffer has its own bound and test
    # (test_prediction_log.py), which would otherwise add up to its 20,000 rows here.
    stream_server = server_factory(model_repo, WORKERS="1", CACHE="off",
                                   STREAM_MAX_ROWS="100000", STREAM_CHUNK_ROWS="200",
                                   MODEL_POLL_SECONDS="0", PREDICTION_LOG="off")
    cancer = datasets.load_breast_cancer()
    names = stream_server.get("/models/breast_cancer").json()["versions"][0]["feature_names"]
    rng = np.random.default_rng(1)
    data = cancer.data[rng.integers(0, len(cancer.data), 100_000)]
    body = _csv(data, names)
    assert len(body) > 20e6
    stream_server.post("/predict/csv?model=breast_cancer", data=_csv(data[:2000], names),
                       headers={"Content-Type": "text/csv"})  # warm up
    before = stream_server.get("/status").json()["rss_mb"]
    resp = stream_server.post("/predict/csv?model=breast_cancer", data=io.BytesIO(body),
                              headers={"Content-Type": "text/csv"}, stream=True, timeout=120)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/csv")
    lines = [line for line in resp.iter_lines() if line]
    after = stream_server.get("/status").json()["rss_mb"]
    assert len(lines) == 100_001
    assert lines[0].decode() == ",".join(names + ["row_id", "prediction", "label", "confidence",
                                                 "error"])
    sample = [lines[i].decode().split(",") for i in (1, 50_000, 100_000)]
    assert [s[30] for s in sample] == ["r0", "r49999", "r99999"]
    batch = stream_server.post("/predict/batch", json={
        "model": "breast_cancer", "instances": [data[0].tolist()]}).json()
    # Row 0 of a many-row chunk against a one-row call: breast_cancer's LogisticRegression
    # product (gemm vs gemv) may round differently; the CSV's repr floats are exact.
    assert_close(float(sample[0][33]), batch["confidences"][0])
    assert after - before < 40, (before, after)  # the 20 MB body is never held in memory


def test_csv_progress_events_and_bad_rows(stream_server: LiveServer) -> None:
    good = "\n".join(f"{r[0]},{r[1]},{r[2]},{r[3]}" for r in IRIS.tolist() * 20)
    body = ("sepal_length,sepal_width,petal_length,petal_width\n" + good +
            "\n1,2,x,4\n1,2,nan,4\n1,2\n").encode()
    resp = stream_server.post("/predict/csv?model=iris", data=body, stream=True,
                              headers={"Content-Type": "text/csv",
                                       "Accept": "text/event-stream"})
    got = list(events(resp))
    progress = [json.loads(d) for n, d in got if n == "progress"]
    assert len(progress) == 4 and progress[-1]["rows"] == 3003 and progress[-1]["errors"] == 3
    assert progress[0]["bytes"] <= progress[-1]["bytes"]
    assert json.loads(got[-2][1]) == {"status": "complete", "rows": 3003, "errors": 3}
    assert got[-1][1] == "[DONE]"
    plain = list(csv.reader(io.StringIO(stream_server.post(
        "/predict/csv?model=iris", data=body, headers={"Content-Type": "text/csv"}).text)))
    # the same reasons as python -m server.score gives; the short row keeps its place and the
    # output stays aligned
    assert [row[-1] for row in plain[-3:]] == [
        "not a number for feature 'petal_length': 'x'",
        "NaN or infinity for feature 'petal_length'", "expected 4 values, got 2"]
    assert {len(row) for row in plain} == {len(plain[0])}


@pytest.mark.parametrize(("query", "body", "headers", "status", "code"), [
    ("?model=iris", b"a,b\n1,2\n", {"Content-Type": "text/csv"}, 422, "validation_error"),
    ("?model=ghost", b"a\n1\n", {"Content-Type": "text/csv"}, 404, "model_not_found"),
    ("", b"a\n1\n", {"Content-Type": "text/csv"}, 422, "validation_error"),
    ("?model=iris", b"", {"Content-Type": "text/csv"}, 422, "validation_error"),
    ("?model=iris", b"{}", {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
])
def test_bad_csv_requests(stream_server: LiveServer, query: str, body: bytes,
                          headers: dict[str, str], status: int, code: str) -> None:
    resp = stream_server.post("/predict/csv" + query, data=body, headers=headers)
    assert resp.status_code == status and resp.json()["code"] == code


def test_server_events_reach_subscribers_from_every_worker(
    server_factory: Callable[..., LiveServer], model_repo: Path, admin: dict[str, str]
) -> None:
    server = server_factory(model_repo, MODEL_POLL_SECONDS="0")
    resp = requests.get(server.url + "/stream/events", stream=True, timeout=15)
    seen: list[tuple[str, dict[str, Any]]] = []

    def read() -> None:
        for name, data in events(resp):
            seen.append((name, json.loads(data)))
            if name == "version_added":
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: any(n == "metrics" and d["workers"] == 2 for n, d in seen), 10)
    shutil.copytree(model_repo / "iris" / "1", model_repo / "iris" / "7")
    server.post("/admin/reload", headers=admin)
    reader.join(10)
    resp.close()
    assert seen[0] == ("message", {"type": "hello",
                                   "models": ["breast_cancer", "diabetes", "iris"]})
    added = [d for n, d in seen if n == "version_added"]
    assert added and added[0]["model"] == "iris" and added[0]["version"] == "7"
    metrics = [d for n, d in seen if n == "metrics"][-1]
    for key in ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "cache_hit_ratio",
                "rss_mb", "models_loaded", "workers"):
        assert key in metrics


TRAVERSALS = [
    "/models/..%2F..%2Fetc/versions/1/artifact",
    "/models/iris/versions/..%2F..%2F..%2Fetc%2Fpasswd/artifact",
    "/models/iris/versions/%2Fetc%2Fpasswd/artifact",
    "/models/%2E%2E/versions/1/artifact",
    "/models/iris/versions/1%2F..%2F2/artifact",
    "/download/model/..",
    "/download/model/%2E%2E%2F%2E%2E%2Fetc",
    "/download/model/%2Fetc%2Fpasswd",
    "/download/model/iris%00",
    "/models/iris/versions/6/artifact",  # a symlink to a file outside the repository
    "/models/iris/versions/0/artifact",
]


def test_artifact_download_and_traversal_attempts(
    server_factory: Callable[..., LiveServer], model_repo: Path, tmp_path: Path,
    admin: dict[str, str],
) -> None:
    (tmp_path / "secret.joblib").write_bytes((model_repo / "iris" / "1" /
                                             "model.joblib").read_bytes())
    (model_repo / "iris" / "6").mkdir()
    (model_repo / "iris" / "6" / "model.joblib").symlink_to(tmp_path / "secret.joblib")
    server = server_factory(model_repo, MODEL_POLL_SECONDS="0")
    sha = server.get("/models/iris").json()["versions"][0]["sha256"]
    resp = server.get("/models/iris/versions/1/artifact", headers=admin)
    assert resp.status_code == 200 and resp.headers["ETag"] == f'"{sha}"'
    assert hashlib.sha256(resp.content).hexdigest() == sha
    latest = server.get("/download/model/iris", headers=admin)
    assert hashlib.sha256(latest.content).hexdigest() == \
        server.get("/models/iris").json()["versions"][1]["sha256"]
    assert server.get("/models/iris/versions/stable/artifact", headers=admin).content == \
        resp.content
    cached = server.get("/models/iris/versions/1/artifact",
                        headers={**admin, "If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and not cached.content
    assert server.get("/models/iris/versions/1/artifact").status_code == 401
    for path in TRAVERSALS:
        got = server.get(path, headers=admin)
        assert got.status_code == 404, path
        assert got.json()["code"].endswith("not_found"), path


def test_fifty_websocket_clients(stream_server: LiveServer) -> None:
    url = f"ws://127.0.0.1:{stream_server.port}/ws/predict"

    def client(n: int) -> list[dict[str, Any]]:
        ws = Client.connect(url)
        answers = []
        try:
            for i in range(5):
                ws.send(json.dumps({"model": "iris", "features": IRIS[(n + i) % 150].tolist(),
                                    "id": f"{n}-{i}"}))
                answers.append(json.loads(ws.receive(timeout=10)))
        finally:
            ws.close()
        return answers

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(client, range(50)))
    for n, answers in enumerate(results):
        assert [a["id"] for a in answers] == [f"{n}-{i}" for i in range(5)]
        assert all(a["model"] == "iris" and "label" in a for a in answers)


def test_websocket_bad_messages_keep_the_socket_open(stream_server: LiveServer) -> None:
    ws = Client.connect(f"ws://127.0.0.1:{stream_server.port}/ws/predict")
    try:
        for bad, code in [("not json", "bad_json"), ('{"features": [1, 2], "id": 7}',
                                                      "validation_error"),
                          ('{"model": "ghost", "features": [1], "id": "g"}', "model_not_found"),
                          ('{"model": "iris", "features": [1, NaN, 3, 4]}', "validation_error"),
                          ('{"model": "iris", "features": ' + "[" * 40 + "]" * 40 + "}",
                           "bad_json")]:
            ws.send(bad)
            answer = json.loads(ws.receive(timeout=5))
            assert answer["code"] == code and answer["error"]
        ws.send(json.dumps({"model": "iris", "features": [5.1, 3.5, 1.4, 0.2], "id": 1}))
        answer = json.loads(ws.receive(timeout=5))
        assert answer["id"] == 1 and answer["label"] == "setosa"
    finally:
        ws.close()


def test_monitor_pushes_figures_every_second_to_several_clients(
    stream_server: LiveServer,
) -> None:
    clients = [Client.connect(f"ws://127.0.0.1:{stream_server.port}/ws/monitor")
               for _ in range(3)]
    try:
        for _ in range(5):
            stream_server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2])
        for ws in clients:
            got = [json.loads(ws.receive(timeout=5)) for _ in range(3)]
            gaps = [b["ts"] - a["ts"] for a, b in zip(got, got[1:])]
            assert all(0.7 < gap < 1.6 for gap in gaps), gaps
            for figures in got:
                assert figures["workers"] == 1 and figures["models_loaded"] == 4
                assert figures["rss_mb_total"] > 0
            assert got[-1]["requests_total"] >= 5
    finally:
        for ws in clients:
            ws.close()
