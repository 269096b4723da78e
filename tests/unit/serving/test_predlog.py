"""The prediction log's buffer and writer over a SQLite file: what a row holds, the bound and
what is dropped, a failed write kept for the next one, and the quality figures."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from server.model.loaded import LoadedVersion
from server.model.registry import ModelRegistry
from server.runtime import prometheus
from server.serving.dataplane import DataPlane, Outcome
from server.serving.logstore import LogStore, Query
from server.serving.predlog import Origin, PredictionLog, classifier_quality, regressor_quality

IRIS_X = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5],
                   [5.1, 3.5, 1.4, 0.2]])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    s = LogStore(f"sqlite:///{tmp_path / 'log.db'}", timeout=0.05)
    yield s
    s.close()


@pytest.fixture
def iris(registry: ModelRegistry) -> LoadedVersion:
    return registry.resolve("iris")


def fake(lv: LoadedVersion, rows: int, cached: int = 0, seconds: float = 0.001) -> Outcome:
    """An outcome of ``rows`` rows without calling the model."""
    return Outcome(lv, cached, [{"prediction": 0, "label": "setosa"} for _ in range(rows)],
                   seconds)


def record(plog: PredictionLog, lv: LoadedVersion, request_id: str, rows: int) -> None:
    plog.record(fake(lv, rows), np.zeros((rows, 4)), Origin(request_id, "native"))


def logged(store: LogStore) -> list[dict[str, Any]]:
    """Every logged row, in the order it was written."""
    return sorted(store.query(Query(limit=10_000)), key=lambda r: r["id"])


def requests_of(store: LogStore) -> list[str]:
    return [f"{r['request_id']}/{r['row_index']}" for r in logged(store)]


def counter(metric: Any) -> float:
    return float(metric._value.get())


# -- buffering and writing ------------------------------------------------------------------
def test_flush_writes_every_buffered_row_in_one_write(
        store: LogStore, registry: ModelRegistry, iris: LoadedVersion) -> None:
    writes: list[str] = []

    def offload(fn: Any, *args: Any) -> Any:
        writes.append(fn.__name__)
        return fn(*args)

    plog = PredictionLog(store, offload=offload)
    written_before = counter(prometheus.LOG_WRITTEN)
    outcome = DataPlane(registry).predict_resolved(iris, IRIS_X[:3], ["features"])
    plog.record(outcome, IRIS_X[:3], Origin("req-1", "ab", "keyhash", "exp", "b"))
    record(plog, iris, "req-2", 2)
    assert plog.status()["pending"] == 5
    assert logged(store) == []  # nothing is written on the request path

    assert plog.flush() is True
    assert writes == ["insert"]
    assert requests_of(store) == ["req-1/0", "req-1/1", "req-1/2", "req-2/0", "req-2/1"]
    first = logged(store)[0]
    assert (first["model"], first["version"], first["door"], first["api_key"],
            first["experiment"], first["arm"]) == ("iris", iris.version, "ab", "keyhash",
                                                   "exp", "b")
    status = plog.status()
    assert {k: status[k] for k in ("state", "pending", "written", "dropped")} == {
        "state": "ok", "pending": 0, "written": 5, "dropped": 0}
    assert status["last_write"] is not None
    assert counter(prometheus.LOG_WRITTEN) == written_before + 5

    assert plog.flush() is True  # nothing waiting: nothing written
    assert writes == ["insert"]


@pytest.mark.parametrize(("buffer_rows", "sizes", "kept", "dropped"), [
    (6, [2, 2, 2], ["r0", "r1", "r2"], 0),  # exactly full
    (5, [2, 2, 2, 2], ["r2", "r3"], 4),
    (4, [1, 3], ["r0", "r1"], 0),
    (3, [1, 3], ["r1"], 1),
    (2, [3], ["r0"], 0),  # one request bigger than the buffer is kept whole
])
def test_buffer_drops_the_oldest_requests_beyond_buffer_rows(
        store: LogStore, iris: LoadedVersion, buffer_rows: int, sizes: list[int],
        kept: list[str], dropped: int) -> None:
    plog = PredictionLog(store, buffer_rows=buffer_rows)
    dropped_before = counter(prometheus.LOG_DROPPED)
    for i, size in enumerate(sizes):
        record(plog, iris, f"r{i}", size)
    assert plog.dropped == dropped
    assert counter(prometheus.LOG_DROPPED) == dropped_before + dropped
    assert plog.status()["pending"] == sum(sizes) - dropped
    assert plog.flush() is True
    assert sorted({r["request_id"] for r in logged(store)}) == kept


@pytest.mark.parametrize(("buffer_rows", "kept", "dropped"), [
    (100, ["a/0", "a/1", "b/0", "b/1", "c/0", "c/1"], 0),
    (5, ["b/0", "b/1", "c/0", "c/1"], 2),  # back in the buffer, a is now the oldest over
])
def test_failed_flush_keeps_its_rows_ahead_of_newer_ones_and_recovers(
        store: LogStore, iris: LoadedVersion, tmp_path: Path, buffer_rows: int,
        kept: list[str], dropped: int) -> None:
    def offload(fn: Any, *args: Any) -> Any:
        if not newer:  # a request arrives while the write is under way
            newer.append(True)
            record(plog, iris, "c", 2)
        return fn(*args)

    newer: list[bool] = []
    plog = PredictionLog(store, buffer_rows=buffer_rows, offload=offload)
    store.migrate()
    record(plog, iris, "a", 2)
    record(plog, iris, "b", 2)
    failures_before = counter(prometheus.LOG_FAILURES)
    locker = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        assert plog.flush() is False
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    assert plog.state == "down"
    assert "locked" in (plog.last_error or "")
    assert counter(prometheus.LOG_FAILURES) == failures_before + 1
    assert (plog.status()["pending"], plog.dropped) == (len(kept), dropped)
    assert logged(store) == []

    assert plog.flush() is True
    assert plog.state == "ok"
    assert requests_of(store) == kept
    assert (plog.written, plog.status()["pending"]) == (len(kept), 0)


@pytest.mark.parametrize(("reachable", "ok", "state"), [(True, True, "ok"),
                                                         (False, False, "down")])
def test_first_flush_checks_the_database(
        tmp_path: Path, reachable: bool, ok: bool, state: str) -> None:
    if not reachable:
        (tmp_path / "file").write_text("not a directory")
    s = LogStore(f"sqlite:///{tmp_path / ('db' if reachable else 'file/db') / 'log.db'}")
    try:
        plog = PredictionLog(s)
        assert plog.state == "starting"
        assert plog.flush() is ok
        assert plog.state == state
        assert (plog.last_error is None) is reachable
    finally:
        s.close()


@pytest.mark.parametrize(("sample", "rows"), [(0.0, 0), (1.0, 30)])
def test_sample_zero_logs_nothing_and_one_logs_everything(
        store: LogStore, iris: LoadedVersion, sample: float, rows: int) -> None:
    plog = PredictionLog(store, sample=sample)
    for i in range(30):
        record(plog, iris, f"r{i}", 1)
    assert plog.flush() is True
    assert len(logged(store)) == rows


# -- what a row holds -----------------------------------------------------------------------
@pytest.mark.parametrize("inputs", [True, False])
def test_features_are_logged_or_only_hashed(
        store: LogStore, registry: ModelRegistry, iris: LoadedVersion, inputs: bool) -> None:
    plog = PredictionLog(store, inputs=inputs)
    X = IRIS_X.astype(np.float32)  # hashed as float64, like every other input
    plog.record(DataPlane(registry).predict_resolved(iris, X, ["features"]), X,
                Origin("r", "native"))
    plog.flush()
    rows = logged(store)
    as64 = X.astype(np.float64)
    assert [r["features"] for r in rows] == (
        [orjson.dumps(x.tolist()).decode() for x in as64] if inputs else [None] * 4)
    assert [r["features_hash"] for r in rows] == [
        hashlib.sha256(x.tobytes()).hexdigest()[:32] for x in as64]
    assert rows[0]["features_hash"] == rows[3]["features_hash"]  # the same row twice
    assert rows[0]["features_hash"] != rows[1]["features_hash"]
    assert plog.status()["inputs"] == ("on" if inputs else "hashed")


@pytest.mark.parametrize("model", ["iris", "diabetes"])
def test_rows_store_the_label_of_a_classifier_and_the_value_of_a_regressor(
        store: LogStore, registry: ModelRegistry, model: str) -> None:
    lv = registry.resolve(model)
    assert lv.n_features is not None
    X = np.linspace(0.1, 0.9, 2 * lv.n_features).reshape(2, lv.n_features)
    outcome = DataPlane(registry).predict_resolved(lv, X, ["features"])
    plog = PredictionLog(store)
    plog.record(outcome, X, Origin("r", "native"))
    plog.flush()
    rows = logged(store)
    assert [orjson.loads(r["output"]) for r in rows] == outcome.results
    assert {r["model_ms"] for r in rows} == {round(outcome.model_seconds * 1000, 4)}
    if lv.task == "classification":
        assert [r["predicted"] for r in rows] == [res["label"] for res in outcome.results]
        assert all(isinstance(r["predicted"], str) for r in rows)
        assert [r["value"] for r in rows] == [None, None]
    else:
        assert [r["value"] for r in rows] == [float(res["prediction"])
                                             for res in outcome.results]
        assert [r["predicted"] for r in rows] == [None, None]


@pytest.mark.parametrize(("cached", "cache_hit"), [(3, 1), (0, 0), (1, None), (2, None)])
def test_cache_hit_is_one_when_all_rows_were_cached_zero_when_none_null_when_some(
        store: LogStore, iris: LoadedVersion, cached: int, cache_hit: int | None) -> None:
    plog = PredictionLog(store)
    plog.record(fake(iris, 3, cached=cached), np.zeros((3, 4)), Origin("r", "native"))
    plog.flush()
    assert [r["cache_hit"] for r in logged(store)] == [cache_hit] * 3


# -- quality figures ------------------------------------------------------------------------
def _cls(precision: float | None, recall: float | None, support: int) -> dict[str, Any]:
    return {"precision": precision, "recall": recall, "support": support}


@pytest.mark.parametrize(("confusion", "classes", "expected"), [
    pytest.param(
        [("a", "a", 3), ("a", "b", 1), ("b", "b", 2)], ["a", "b", "c"],
        {"labelled": 6, "accuracy": 5 / 6,
         "classes": {"a": _cls(3 / 4, 3 / 3, 3), "b": _cls(2 / 2, 2 / 3, 3),
                     "c": _cls(None, None, 0)}},
        id="a class never predicted nor seen has no precision or recall"),
    pytest.param(
        [("a", "b", 2)], ["a", "b"],
        {"labelled": 2, "accuracy": 0.0,
         "classes": {"a": _cls(0.0, None, 0), "b": _cls(None, 0.0, 2)}},
        id="a class never predicted has no precision"),
    pytest.param(
        [], ["a", "b"],
        {"labelled": 0, "accuracy": None,
         "classes": {"a": _cls(None, None, 0), "b": _cls(None, None, 0)}},
        id="no labelled rows: no accuracy"),
    pytest.param(
        [("z", "y", 1), ("a", "a", 1)], ["a"],
        {"labelled": 2, "accuracy": 1 / 2,
         "classes": {"a": _cls(1.0, 1.0, 1), "y": _cls(None, 0.0, 1), "z": _cls(0.0, None, 0)}},
        id="labels outside the classes follow them, sorted"),
    pytest.param(
        [("b", "a", 1), ("a", "a", 1)], None,
        {"labelled": 2, "accuracy": 1 / 2,
         "classes": {"a": _cls(1.0, 1 / 2, 2), "b": _cls(0.0, None, 0)}},
        id="without classes: the labels seen, sorted"),
])
def test_classifier_quality(confusion: list[tuple[str, str, int]], classes: list[str] | None,
                            expected: dict[str, Any]) -> None:
    quality = classifier_quality(confusion, classes)
    assert quality == expected
    assert list(quality["classes"]) == list(expected["classes"])


@pytest.mark.parametrize(("count", "mae", "mse", "expected"), [
    (4, 2.5, 9.0, {"labelled": 4, "mae": 2.5, "rmse": 3.0}),
    (0, 0.0, 0.0, {"labelled": 0, "mae": None, "rmse": None}),
])
def test_regressor_quality(count: int, mae: float, mse: float, expected: dict[str, Any]) -> None:
    assert regressor_quality(count, mae, mse) == expected


def test_a_row_the_database_refuses_is_dropped_alone(
        postgres_server: Any, iris: LoadedVersion) -> None:
    """PostgreSQL refuses a NUL character in text: the batch is halved until only that row is
    left out, and the rows around it are written (one client's bytes never cost others)."""
    import psycopg

    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS t_refused")
        conn.execute("CREATE DATABASE t_refused")
    store = LogStore(postgres_server.url.rsplit("/", 1)[0] + "/t_refused")
    try:
        plog = PredictionLog(store)
        for rid in ("good-1", "bad\x00id", "good-2", "good-3"):
            record(plog, iris, rid, 2)
        dropped = counter(prometheus.LOG_DROPPED)
        assert plog.flush() is True
        assert sorted(requests_of(store)) == ["good-1/0", "good-1/1", "good-2/0", "good-2/1",
                                              "good-3/0", "good-3/1"]
        assert (plog.written, plog.dropped) == (6, 2)
        assert counter(prometheus.LOG_DROPPED) == dropped + 2
        assert plog.state == "ok"
    finally:
        store.close()


def test_rows_keep_the_numbers_they_were_given(store: LogStore, iris: LoadedVersion) -> None:
    plog = PredictionLog(store)
    plog.record(fake(iris, 3), IRIS_X[:3], Origin("csv-1", "csv"), [0, 2, 5])
    plog.record(fake(iris, 2), IRIS_X[:2], Origin("stream-1", "stream"), 256)
    assert plog.flush() is True
    assert requests_of(store) == ["csv-1/0", "csv-1/2", "csv-1/5", "stream-1/256",
                                  "stream-1/257"]


def test_feedback_under_a_key_labels_only_that_keys_rows(store: LogStore,
                                                         iris: LoadedVersion) -> None:
    plog = PredictionLog(store)
    plog.record(fake(iris, 1), IRIS_X[:1], Origin("shared-id", "native", "key-a"))
    plog.record(fake(iris, 1), IRIS_X[:1], Origin("shared-id", "native", "key-b"))
    plog.flush()
    assert store.feedback([("shared-id", 0, "setosa", None)], "key-a") == [1]
    assert store.feedback([("shared-id", 0, "setosa", None)], "key-c") == [0]
    labelled = {r["api_key"]: r["true_label"] for r in logged(store)}
    assert labelled == {"key-a": "setosa", "key-b": None}
