"""Issue 24, items 7 and 9, on a real gunicorn: Open Inference tensors hold only what their
datatype can (no NaN or infinity in binary data either, no INT8 300 in JSON data), and an A/B
experiment takes one outcome per user it served, counted against the arm that served them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import LiveServer, RedisServer, wait_until

# Starts servers of its own: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

INFER = "/v2/models/iris/infer"
NAN, INF = float("nan"), float("inf")
# numpy's name for each datatype's little-endian binary layout (the protocol's).
NUMPY = {"FP64": "<f8", "FP32": "<f4", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4",
         "INT16": "<i2", "INT8": "i1", "UINT64": "<u8", "UINT32": "<u4", "UINT16": "<u2",
         "UINT8": "u1", "BOOL": "?"}
INTS = [t for t in NUMPY if "INT" in t]
FLOATS = ["FP64", "FP32", "FP16"]


def json_infer(server: LiveServer, datatype: str, first: Any) -> requests.Response:
    """One iris row of ``datatype`` whose first element is ``first`` (the rest are small
    numbers every datatype holds), as JSON data."""
    rest = [True, False, True] if datatype == "BOOL" else [3, 1, 0]
    body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": datatype,
                        "data": [first, *rest]}]}
    # json.dumps writes NaN, Infinity and integers of any size, as a client's encoder may.
    return server.post(INFER, data=json.dumps(body), headers={"Content-Type": "application/json"})


def binary_infer(server: LiveServer, datatype: str, blob: bytes) -> requests.Response:
    """One iris row sent as raw tensor bytes (the binary tensor data extension)."""
    header = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": datatype,
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return requests.post(server.url + INFER, data=header + blob, timeout=10,
                         headers={"Inference-Header-Content-Length": str(len(header))})


def row_bytes(datatype: str, first: Any) -> bytes:
    rest = [True, False, True] if datatype == "BOOL" else [3, 1, 0]
    return np.array([first, *rest], dtype=NUMPY[datatype]).tobytes()


def assert_refused(resp: requests.Response, words: str) -> None:
    """The protocol's INVALID_ARGUMENT: 400 with ``{"error"}`` only, saying what is wrong."""
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body) == {"error"} and words in body["error"], body


# --- Item 7: a tensor holds what its datatype can -------------------------------------------
def _bounds(datatype: str) -> tuple[int, int]:
    info = np.iinfo(NUMPY[datatype])
    return int(info.min), int(info.max)


# Each datatype's extremes, which it holds (as JSON data and as binary data).
HELD = [*[(t, edge) for t in INTS for edge in _bounds(t)],
        ("FP16", 65504.0), ("FP16", -65504.0), ("FP32", 3.4e38), ("FP32", -3.4e38),
        ("FP64", 1.7e308), ("FP64", -1.7e308), ("BOOL", True), ("BOOL", False)]
# One past each extreme, and what a datatype cannot hold at all: refused as JSON data.
NOT_HELD = [*[(t, lo - 1) for t in INTS for lo, _ in [_bounds(t)]],
            *[(t, hi + 1) for t in INTS for _, hi in [_bounds(t)]],
            ("INT8", 300), ("UINT64", -1), ("INT32", 10**400),
            ("FP16", 70000), ("FP16", -70000.0), ("FP32", 1e39), ("FP32", -1e39),
            ("FP64", 10**400), ("FP64", -(10**400)),
            ("BOOL", 2), ("BOOL", 1), ("BOOL", "true"), ("BOOL", None)]


@pytest.mark.parametrize(("datatype", "value"), HELD, ids=[f"{t}:{v}" for t, v in HELD])
def test_a_datatype_holds_its_extremes(live_server: LiveServer, datatype: str,
                                       value: Any) -> None:
    for resp in (json_infer(live_server, datatype, value),
                 binary_infer(live_server, datatype, row_bytes(datatype, value))):
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["shape"] == [1]


@pytest.mark.parametrize(("datatype", "value"), NOT_HELD,
                         ids=[f"{t}:{str(v)[:12]}" for t, v in NOT_HELD])
def test_json_data_beyond_its_datatype_is_refused(live_server: LiveServer, datatype: str,
                                                  value: Any) -> None:
    resp = json_infer(live_server, datatype, value)
    assert_refused(resp, "element 0")


NON_FINITE = [(t, v) for t in FLOATS for v in (NAN, INF, -INF)]


@pytest.mark.parametrize(("datatype", "value"), NON_FINITE,
                         ids=[f"{t}:{v}" for t, v in NON_FINITE])
def test_nan_and_infinity_are_refused_alike_in_json_and_binary_data(
    live_server: LiveServer, datatype: str, value: float
) -> None:
    as_json = json_infer(live_server, datatype, value)
    as_binary = binary_infer(live_server, datatype, row_bytes(datatype, value))
    assert_refused(as_json, "NaN or infinity")
    assert_refused(as_binary, "NaN or infinity")
    assert as_binary.json()["error"] == as_json.json()["error"]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("datatype", ["INT32", "UINT8", "BOOL"])
def test_nan_and_infinity_in_json_data_of_other_datatypes(live_server: LiveServer,
                                                          datatype: str, value: float) -> None:
    assert_refused(json_infer(live_server, datatype, value), "element 0")


def test_binary_bool_holds_only_zero_and_one(live_server: LiveServer) -> None:
    blob = bytes([2, 0, 1, 1])  # numpy would read 2 as True; the protocol's BOOL is one 0/1 byte
    assert_refused(binary_infer(live_server, "BOOL", blob), "element 0")
    assert binary_infer(live_server, "BOOL", bytes([1, 0, 1, 1])).status_code == 200


def test_non_finite_values_in_a_later_binary_input_are_refused(live_server: LiveServer) -> None:
    """One input per feature, the bad value in the third: its name is in the answer."""
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    values = [5.1, 3.5, NAN, 0.2]
    blobs = [np.array([v], "<f4").tobytes() for v in values]
    header = json.dumps({"inputs": [
        {"name": n, "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}
        for n in names]}).encode()
    resp = requests.post(live_server.url + INFER, data=header + b"".join(blobs), timeout=10,
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert_refused(resp, "input 'petal_length'")
    assert live_server.get("/ready").status_code == 200


# --- Item 9: one outcome per user the experiment served -------------------------------------
ROW = [5.1, 3.5, 1.4, 0.2]


def serve(server: LiveServer, user: str) -> str:
    """The arm ``user`` is served through ``iris-ab`` (a new connection: any worker)."""
    resp = server.fresh("POST", "/predict/ab",
                        json={"experiment": "iris-ab", "user_id": user, "features": ROW})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["arm"])


def outcome(server: LiveServer, user: str, value: float = 1) -> requests.Response:
    return server.fresh("POST", "/experiments/iris-ab/outcome",
                        json={"user_id": user, "value": value})


def arms(server: LiveServer) -> dict[str, Any]:
    return server.get("/experiments/iris-ab").json()["arms"]  # type: ignore[no-any-return]


@pytest.fixture
def redis_ab(server_factory: Callable[..., LiveServer], model_repo: Path,
             redis_server: RedisServer) -> LiveServer:
    """Two workers sharing a real Redis."""
    return server_factory(model_repo, REDIS_URL=redis_server.url, MODEL_POLL_SECONDS="0")


def test_an_outcome_for_a_user_never_served_is_409_not_served(redis_ab: LiveServer) -> None:
    for user in ("never-seen", "x" * 256, "ünïcode ☃", 7):
        resp = outcome(redis_ab, user)  # type: ignore[arg-type]
        assert resp.status_code == 409, resp.text
        body = resp.json()
        assert body["code"] == "not_served" and "was not served" in body["error"]
    assert all(a["outcomes"] == 0 for a in arms(redis_ab).values())


def test_a_second_outcome_for_a_user_is_409_on_every_worker(redis_ab: LiveServer) -> None:
    arm = serve(redis_ab, "u-once")
    first = outcome(redis_ab, "u-once", 1)
    assert first.status_code == 200 and first.json()["arm"] == arm
    for value in (1, 0, 1, 0, 1, 0):  # new connections: both workers refuse it
        again = outcome(redis_ab, "u-once", value)
        assert again.status_code == 409 and again.json()["code"] == "outcome_recorded", again.text
        assert "already" in again.json()["error"]
    serve(redis_ab, "u-once")  # served again: still one outcome per user
    assert outcome(redis_ab, "u-once").status_code == 409
    counted = arms(redis_ab)
    assert counted[arm]["outcomes"] == 1 and counted[arm]["successes"] == 1
    assert sum(a["outcomes"] for a in counted.values()) == 1


def test_concurrent_outcomes_for_one_user_count_once(redis_ab: LiveServer) -> None:
    users = [f"race-{i}" for i in range(5)]
    served = {u: serve(redis_ab, u) for u in users}
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda u: outcome(redis_ab, u).status_code, users * 20))
    assert Counter(statuses) == {200: 5, 409: 95}
    assert {a: v["outcomes"] for a, v in arms(redis_ab).items() if v["outcomes"]} == \
        dict(Counter(served.values()))


def test_the_outcome_counts_for_the_arm_that_served_the_user(
    redis_ab: LiveServer, model_repo: Path, admin: dict[str, str]
) -> None:
    users = [f"moved-{i}" for i in range(30)]
    served = {u: serve(redis_ab, u) for u in users}
    treated = [u for u in users if served[u] == "treatment"]
    assert treated
    # Everyone is now assigned to control; those served by treatment stay treatment's.
    (model_repo / "experiments.json").write_text(json.dumps({"iris-ab": {
        "model": "iris", "arms": {"control": {"version": "1", "weight": 1},
                                  "treatment": {"version": "2", "weight": 0}}}}))
    redis_ab.post("/admin/reload", headers=admin)
    wait_until(lambda: all(redis_ab.fresh("GET", "/experiments/iris-ab").json()["arms"]
                           ["treatment"]["weight"] == 0 for _ in range(6)), 5)
    for user in users:
        resp = outcome(redis_ab, user)
        assert resp.status_code == 200 and resp.json()["arm"] == served[user], resp.text
    assert arms(redis_ab)["treatment"]["outcomes"] == len(treated)
    claimed = redis_ab.post("/experiments/iris-ab/outcome",
                            json={"user_id": users[0], "value": 1, "arm": "control"})
    assert claimed.status_code == 422 and claimed.json()["details"][0]["loc"] == ["arm"]


def test_without_redis_a_worker_takes_outcomes_of_the_users_it_served(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    server = server_factory(model_repo, WORKERS="1")
    resp = outcome(server, "nobody")
    assert resp.status_code == 409 and resp.json()["code"] == "not_served"
    assert "REDIS_URL" in resp.json()["error"]  # says why another worker may not know the user
    arm = serve(server, "somebody")
    assert outcome(server, "somebody", 0).json()["arm"] == arm
    again = outcome(server, "somebody", 1)
    assert again.status_code == 409 and again.json()["code"] == "outcome_recorded"
    # /predict with a user_id serves through the experiment too.
    assert server.post("/predict/iris", json={"features": ROW, "user_id": "via-predict"}).ok
    assert outcome(server, "via-predict").status_code == 200
    assert sum(a["outcomes"] for a in arms(server).values()) == 2
