"""One table of faults sent to every front door of a real server: each door answers in its
own protocol's error shape with the same status class, and the row-by-row doors (SSE
stream, CSV over HTTP, offline scoring) reject the same row for the same reason."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from simple_websocket import Client, ConnectionClosed

from server.jobs.score import main as score_main
from tests.conftest import LiveServer, websocket_handshake

MAX_ROWS = 5
MAX_BODY = 4096
HEADER = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
GOOD = [5.1, 3.5, 1.4, 0.2]

# fault -> (model, version, rows); the bad row, when there is one, is row 1 of 3
FAULTS: dict[str, tuple[str, str | None, list[list[Any]]]] = {
    "unknown_model": ("nope", None, [GOOD]),
    "unknown_version": ("iris", "99", [GOOD]),
    "too_many_rows": ("iris", None, [GOOD] * (MAX_ROWS + 1)),
    "wrong_width": ("iris", None, [GOOD, [5.555, 3.666, 1.777, 0.888, 9.999], GOOD]),
    "non_numeric": ("iris", None, [GOOD, [5.1, "abc", 1.4, 0.2], GOOD]),
    "body_too_large": ("iris", None, [[*GOOD[:3], "x" * MAX_BODY]]),
}
# what each row fault is rejected for, in the same words at every row-by-row door
ROW_REASONS = {
    "wrong_width": "expected 4 values, got 5",
    "non_numeric": "not a number for feature 'sepal_width': 'abc'",
}
NATIVE = {"unknown_model": (404, "model_not_found"), "unknown_version": (404, "version_not_found"),
          "too_many_rows": (413, "too_many_rows"), "wrong_width": (422, "validation_error"),
          "non_numeric": (422, "validation_error"), "body_too_large": (413, "body_too_large")}
# TF Serving and the Open Inference Protocol say 400 (INVALID_ARGUMENT) where we say 422.
MESSAGE_ONLY = {fault: 400 if status == 422 else status for fault, (status, _) in NATIVE.items()}


@pytest.fixture(scope="module")
def doors_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("doors"), demo_repo, MAX_BATCH=str(MAX_ROWS),
                        STREAM_MAX_ROWS=str(MAX_ROWS), MAX_BODY_BYTES=str(MAX_BODY),
                        MODEL_POLL_SECONDS="0").start()
    yield server
    server.stop(quick=True)


# -- the doors: each sends a fault and checks its protocol's error shape ---------------------
def native_error(resp: requests.Response) -> tuple[int, str]:
    body = resp.json()
    assert set(body) >= {"error", "code", "request_id"} and body["error"], body
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return resp.status_code, body["code"]


def message_error(resp: requests.Response) -> int:
    body = resp.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    return resp.status_code


def native_predict(s: LiveServer, model: str, version: str | None, rows: list[Any]) -> Any:
    path = f"/predict/{model}" + (f"/versions/{version}" if version else "")
    if len(rows) > 1:
        return native_batch(s, model, version, rows)
    return native_error(s.post(path, json={"features": rows[0]}))


def native_batch(s: LiveServer, model: str, version: str | None, rows: list[Any]) -> Any:
    body = {"model": model, "instances": rows, **({"version": version} if version else {})}
    return native_error(s.post("/predict/batch", json=body))


def tf_predict(s: LiveServer, model: str, version: str | None, rows: list[Any]) -> Any:
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    return message_error(s.post(path, json={"instances": rows}))


def oip_infer(s: LiveServer, model: str, version: str | None, rows: list[Any]) -> Any:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    if len({len(r) for r in rows}) > 1:  # a tensor has one width: send the odd row alone
        rows = [r for r in rows if len(r) != len(GOOD)]
    flat, width = [v for r in rows for v in r], len(rows[0])
    tensor = {"name": "input-0", "datatype": "FP64", "shape": [len(rows), width], "data": flat}
    return message_error(s.post(path, json={"inputs": [tensor]}))


def sse_stream(s: LiveServer, model: str, version: str | None, rows: list[Any]) -> Any:
    body = {"model": model, "instances": rows, **({"version": version} if version else {})}
    resp = s.post("/predict/stream", json=body, stream=True)
    try:
        assert resp.headers["Content-Type"].startswith("application/json")  # before streaming
        return native_error(resp)
    finally:
        resp.close()


def websocket(s: LiveServer, model: str, version: str | None, rows: list[Any]) -> Any:
    ws = Client.connect(f"ws://127.0.0.1:{s.port}/ws/predict")
    try:
        ws.send(json.dumps({"model": model, "features": rows[0], "id": "f",
                            **({"version": version} if version else {})}))
        try:
            answer = json.loads(ws.receive(timeout=5))
        except ConnectionClosed as closed:
            return "closed", closed.reason  # the protocol's answer to an oversized message
        assert set(answer) >= {"error", "code", "status", "id"} and answer["id"] == "f", answer
        return answer["status"], answer["code"]
    finally:
        with contextlib.suppress(ConnectionClosed):
            ws.close()


DOORS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "predict": (native_predict, NATIVE),
    "batch": (native_batch, NATIVE),
    "tfserving": (tf_predict, MESSAGE_ONLY),
    "oip": (oip_infer, MESSAGE_ONLY),
    "sse": (sse_stream, NATIVE),
    # one row per message: no row limit; an oversized message closes with 1009
    "websocket": (websocket, {**NATIVE, "too_many_rows": None,
                              "body_too_large": ("closed", 1009)}),
}


@pytest.mark.parametrize(("door", "fault"), [(door, fault) for door, (_, expected) in
                                             DOORS.items() for fault in FAULTS
                                             if expected[fault] is not None])
def test_every_door_answers_a_fault_in_its_own_shape(doors_server: LiveServer, door: str,
                                                      fault: str) -> None:
    send, expected = DOORS[door]
    if door in ("predict", "websocket") and fault in ROW_REASONS:
        rows = [FAULTS[fault][2][1]]  # the one bad row, as a single prediction
    else:
        rows = FAULTS[fault][2]
    got = send(doors_server, FAULTS[fault][0], FAULTS[fault][1], rows)
    assert got == expected[fault]
    status = got[0] if isinstance(got, tuple) else got
    assert status == "closed" or 400 <= status < 500


# -- row-by-row doors: the same row, the same reason --------------------------------------
def csv_body(rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    return out.getvalue()


def stream_rejects(s: LiveServer, rows: list[list[Any]]) -> list[tuple[int, str]]:
    resp = s.post("/predict/stream", json={"model": "iris", "instances": rows})
    assert resp.status_code == 422
    return [(d["loc"][1], d["msg"]) for d in resp.json()["details"]]


def http_csv_rejects(s: LiveServer, rows: list[list[Any]]) -> list[tuple[int, str]]:
    resp = s.post("/predict/csv?model=iris", data=csv_body(rows),
                  headers={"Content-Type": "text/csv"})
    assert resp.status_code == 200
    out = list(csv.DictReader(io.StringIO(resp.text)))
    assert len(out) == len(rows)
    lines = list(csv.reader(io.StringIO(resp.text)))
    assert {len(line) for line in lines} == {len(lines[0])}  # the output stays aligned
    return [(i, r["error"]) for i, r in enumerate(out) if r["error"]]


def offline_rejects(tmp: Path, model_dir: Path, rows: list[list[Any]]) -> list[tuple[int, str]]:
    source, scored = tmp / "in.csv", tmp / "out.csv"
    source.write_text(csv_body(rows))
    assert score_main(["iris", str(source), str(scored), "--model-dir", str(model_dir)]) == 0
    rejects = list(csv.DictReader(io.StringIO(Path(f"{scored}.rejects.csv").read_text())))
    out = list(csv.reader(io.StringIO(scored.read_text())))
    assert {len(line) for line in out} == {len(out[0])}
    return [(int(r["row"]) - 1, r["reason"]) for r in rejects]


@pytest.mark.parametrize("fault", list(ROW_REASONS))
def test_row_doors_reject_the_same_row_for_the_same_reason(
    doors_server: LiveServer, demo_repo: Path, tmp_path: Path, fault: str
) -> None:
    rows = FAULTS[fault][2]
    expected = [(1, ROW_REASONS[fault])]
    assert stream_rejects(doors_server, rows) == expected
    assert http_csv_rejects(doors_server, rows) == expected
    assert offline_rejects(tmp_path, demo_repo, rows) == expected


# -- draining: not ready on every protocol, no new streams, answers still served --------------
def test_draining_is_not_ready_at_every_door(demo_repo: Path,
                                             server_factory: Callable[..., LiveServer]) -> None:
    server = server_factory(demo_repo, WORKERS="1", DRAIN_SECONDS="6", MODEL_POLL_SECONDS="0")
    assert server.get("/v2/health/ready").status_code == 200
    server.signal(signal.SIGTERM)
    time.sleep(0.5)
    ready = server.fresh("GET", "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    v2 = server.fresh("GET", "/v2/health/ready")
    assert (v2.status_code, v2.json()) == (503, {"ready": False})
    model_ready = server.fresh("GET", "/v2/models/iris/ready")
    assert model_ready.status_code == 503 and model_ready.json()["ready"] is False
    stream = server.fresh("POST", "/predict/stream",
                          json={"model": "iris", "instances": [GOOD]})
    assert stream.status_code == 503 and stream.json()["code"] == "draining"
    assert stream.headers["Retry-After"] == "1"
    refused = websocket_handshake(server.url + "/ws/predict")
    assert refused.status_code == 503 and refused.json()["code"] == "draining"
    # a one-shot prediction in the drain window is still answered: no request is lost
    answer = server.fresh("POST", "/predict/iris", json={"features": GOOD})
    assert answer.status_code == 200 and answer.json()["label"] == "setosa"


@pytest.mark.parametrize("threads", ["1", "2"])
def test_each_worker_runs_with_blas_threads(demo_repo: Path, threads: str,
                                            server_factory: Callable[..., LiveServer]) -> None:
    server = server_factory(demo_repo, WORKERS="1", BLAS_THREADS=threads,
                            MODEL_POLL_SECONDS="0")
    assert server.get("/status").json()["blas_threads"] == int(threads)
