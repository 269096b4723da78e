"""Prometheus metrics, summed over every gunicorn worker (multiprocess mode).

``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` in the master before any worker
imports prometheus_client, and removes a dead worker's files in ``child_exit``. Without it
(a single process, e.g. the Flask test client) the default registry is used.

In multiprocess mode every increment would be a locked write into the worker's mmap file
(eight per predict request). In gevent workers, increments add up in the worker and are
written every FLUSH_SECONDS, when this worker serves ``/metrics``, and when it exits: a scrape
may see another worker's last quarter second late, which no Prometheus interval notices. A
worker killed with SIGKILL loses at most its last FLUSH_SECONDS of counts.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

FLUSH_SECONDS = 0.25
_queue: list[Any] = []


def _deferred_value_class(base: Any) -> Any:
    """``base`` (prometheus-client's mmap-backed value class) with increments kept in the
    process until ``flush()``."""

    class DeferredValue(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pending = 0.0
            self._queued = False

        def inc(self, amount: float) -> None:
            self._pending += amount
            if not self._queued:
                self._queued = True
                _queue.append(self)

        def write_pending(self) -> None:
            amount, self._pending, self._queued = self._pending, 0.0, False
            if amount:
                super().inc(amount)

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._pending = 0.0
            super().set(value, timestamp)

        def get(self) -> float:
            return float(super().get()) + self._pending

    return DeferredValue


def flush() -> None:
    """Write this worker's pending increments to its metric files."""
    while _queue:
        pending = _queue[:]
        del _queue[:len(pending)]
        for value in pending:
            value.write_pending()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_SECONDS)
        flush()


def _forget_pending() -> None:
    """In a forked child: what the parent had counted is the parent's to write."""
    for value in _queue:
        value._pending, value._queued = 0.0, False
    _queue.clear()


def _cooperative() -> bool:
    """Deferred increments rely on gevent: with no preemption between bytecodes an increment
    and a flush cannot interleave. Under real threads every increment is written at once."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("threading"))


_deferred = bool(getattr(values.ValueClass, "_multiprocess", False)) and _cooperative()
if _deferred and not hasattr(values.ValueClass, "write_pending"):  # not twice on a re-import
    # Before any metric below is made: each child takes its value class at creation.
    values.ValueClass = _deferred_value_class(values.ValueClass)
    atexit.register(flush)
    os.register_at_fork(after_in_child=_forget_pending)


def start_flushing() -> None:
    """Write pending increments every FLUSH_SECONDS (a greenlet under gevent)."""
    if _deferred:
        threading.Thread(target=_flush_forever, daemon=True, name="metrics-flush").start()


REQUESTS = Counter("http_requests_total", "HTTP requests answered.",
                   ["route", "method", "status"])
LATENCY = Histogram("http_request_duration_seconds", "Time to the response headers.",
                    ["route"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                        1, 2.5, 5, 10))
IN_FLIGHT = Gauge("http_requests_in_flight", "Requests being handled.",
                  multiprocess_mode="livesum")
PREDICTIONS = Counter("predictions_total", "Rows predicted.", ["model", "version"])
CACHE = Counter("prediction_cache_lookups_total", "Cache lookups by result.", ["result"])
BATCH_ROWS = Histogram("batch_rows", "Rows per prediction call.",
                       buckets=(1, 2, 5, 10, 50, 100, 250, 500, 1000, 5000, 20000, 100000))
MICRO_BATCH_ROWS = Histogram("micro_batch_rows", "One-row requests per micro-batched model call.",
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ERRORS = Counter("http_errors_total", "Error answers by the machine code of their body.",
                 ["code"])
MODEL_TIME = Histogram("prediction_duration_seconds", "Model time of one prediction call.",
                       ["model", "version"], buckets=(.0001, .00025, .0005, .001, .0025, .005,
                                                      .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
LOAD_FAILURES = Counter("model_load_failures_total", "Model versions that failed to load.",
                        ["model"])
MODEL_LOADS = Counter("model_loads_total", "Versions loaded on first request (MODEL_MEMORY_MB).",
                      ["model"])
MODEL_UNLOADS = Counter("model_unloads_total", "Versions unloaded to fit MODEL_MEMORY_MB.",
                        ["model"])
MODEL_LOAD_TIME = Histogram("model_load_duration_seconds", "Time to load a version on its first "
                            "request (MODEL_MEMORY_MB).", buckets=(.01, .025, .05, .1, .25, .5,
                                                                   1, 2.5, 5, 10, 30, 60))
LOG_WRITTEN = Counter("prediction_log_written_total", "Rows written to the prediction log.")
LOG_DROPPED = Counter("prediction_log_dropped_total", "Rows the prediction log dropped: its "
                      "per-worker buffer was full while the database was down or slow.")
LOG_FAILURES = Counter("prediction_log_write_failures_total",
                       "Prediction log writes that failed (retried later).")
# Drift scores over the window, computed every few seconds by one worker per server (the one
# holding RUNTIME_DIR/drift.lock) from every worker's counts: "livemostrecent" shows the
# latest value any live worker set, so a new leader takes over where a dead one stopped.
FEATURE_DRIFT = Gauge("model_feature_drift_psi", "PSI of a feature's live values against the "
                      "version's training profile, over DRIFT_WINDOW_SECONDS.",
                      ["model", "version", "feature"], multiprocess_mode="livemostrecent")
PREDICTION_DRIFT = Gauge("model_prediction_drift_psi", "PSI of the version's predictions "
                         "against those on its training data, over DRIFT_WINDOW_SECONDS.",
                         ["model", "version"], multiprocess_mode="livemostrecent")
DRIFT_DROPPED = Counter("drift_rows_dropped_total", "Served rows missing from the drift "
                        "counts: a flush backlog, rows that did not fit the profile, or (from "
                        "the instances' sum) Redis away for longer than the window, or a push "
                        "that timed out (it may have been applied: never sent twice).")
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The method label's values; anything else counts as "other" (a client must not be able to
# create a label value per made-up method).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_children: dict[tuple[Any, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: the hot path counts into the same few children
    on every request, and ``labels()`` validates and locks each time."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        if len(_children) > 10_000:  # bounded whatever label values come in
            _children.clear()
        found = _children[key] = metric.labels(*labels)
    return found


def exposition() -> bytes:
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
