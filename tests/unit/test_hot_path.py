"""The per-request shortcuts: request ids without a syscall, remembered metric children, the
access line written without a LogRecord, and gunicorn's access formatting skipped."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from gunicorn.config import Config

from server.errors import ApiError
from server.http.context import new_request_id
from server.model.predict import Columns, predict_columns, to_matrix
from server.model.registry import ModelRegistry
from server.runtime import prometheus as metrics
from server.runtime.logs import AccessLog, JsonFormatter
from server.runtime.worker import QuietLogger


def test_request_ids_are_32_hex_and_distinct() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_metric_children_are_remembered_and_count_as_labels_do() -> None:
    first = metrics.child(metrics.REQUESTS, "/x", "GET", "200")
    assert metrics.child(metrics.REQUESTS, "/x", "GET", "200") is first
    before = first._value.get()
    metrics.child(metrics.REQUESTS, "/x", "GET", "200").inc()
    assert metrics.REQUESTS.labels("/x", "GET", "200")._value.get() == before + 1


@pytest.fixture
def json_root() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_access_line_is_what_the_json_formatter_writes(json_root: io.StringIO) -> None:
    fields = {"request_id": "r1", "status": 200, "latency_ms": 1.5, "model": None}
    AccessLog().write(fields)
    logging.getLogger("server.access").info("request", extra=fields)
    fast, slow = (orjson.loads(line) for line in json_root.getvalue().splitlines())
    assert set(fast) == set(slow)
    assert {k: v for k, v in fast.items() if k != "ts"} == {k: v for k, v in slow.items()
                                                          if k != "ts"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fast["ts"])


def test_access_line_follows_the_log_level(json_root: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    log = AccessLog()
    assert not log.enabled()
    logging.getLogger().setLevel(logging.INFO)
    assert log.enabled()


def test_gunicorn_access_formatting_is_skipped_only_when_its_logger_is_off() -> None:
    cfg = Config()
    cfg.set("logconfig_dict", {"version": 1, "disable_existing_loggers": False, "loggers": {
        "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False}}})
    assert not QuietLogger(cfg).access_log_enabled
    cfg = Config()
    cfg.set("accesslog", "-")
    assert QuietLogger(cfg).access_log_enabled


@pytest.mark.parametrize(("model", "version"), [("iris", "1"), ("iris", "2"),
                                                ("diabetes", "1"), ("breast_cancer", "1")])
def test_columns_hold_the_per_row_answers(registry: ModelRegistry, model: str,
                                          version: str) -> None:
    lv = registry.resolve(model, version)
    X = np.random.default_rng(5).normal(0.5, 1.0, (40, lv.n_features or 1))
    columns = predict_columns(lv, X)
    rows = columns.rows()
    assert len(columns) == len(rows) == 40
    assert Columns.from_rows(rows).rows() == rows
    assert Columns.concat([predict_columns(lv, X[:15]), predict_columns(lv, X[15:])]).rows() \
        == rows  # forests and trees give the same bits in any chunking
    if columns.probabilities is not None:
        assert columns.probability_maps() == [r["probabilities"] for r in rows]


def test_list_rows_take_one_numpy_pass_and_ragged_rows_are_named(
        registry: ModelRegistry) -> None:
    lv = registry.resolve("iris", "1")
    rows: list[list[float]] = [[1.0, 2.0, 3.0, 4.0], [5, 6, 7, 8]]
    assert to_matrix(lv, rows, ["instances"]).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ApiError) as err:
        to_matrix(lv, [*rows, [1.0, 2.0]], ["instances"])
    assert err.value.status == 422
    assert (err.value.details or [{}])[0]["loc"] == ["instances", 2]


def test_metric_increments_are_written_at_flush_and_read_with_what_is_pending() -> None:
    class Written:  # stands in for prometheus-client's mmap-backed value
        def __init__(self) -> None:
            self.value = 0.0
            self.writes = 0

        def inc(self, amount: float) -> None:
            self.value += amount
            self.writes += 1

        def set(self, value: float, timestamp: float | None = None) -> None:
            self.value = value

        def get(self) -> float:
            return self.value

    deferred = metrics._deferred_value_class(Written)()
    for _ in range(5):
        deferred.inc(1.0)
    deferred.inc(-1.0)
    assert deferred.writes == 0 and deferred.get() == 4.0
    metrics.flush()
    assert deferred.writes == 1 and deferred.value == 4.0 and deferred.get() == 4.0
    metrics.flush()
    assert deferred.writes == 1  # nothing pending, nothing written


def test_access_line_takes_loggings_own_path_when_the_logger_is_configured(
        json_root: io.StringIO) -> None:
    seen: list[str] = []

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(record.getMessage())
            return False  # routed elsewhere: nothing reaches the root's stream

    access = logging.getLogger("server.access")
    access.addFilter(keep := Keep())
    try:
        AccessLog().write({"request_id": "r2"})
    finally:
        access.removeFilter(keep)
    assert seen == ["request"] and json_root.getvalue() == ""
