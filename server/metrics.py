"""Prometheus metrics, summed over every gunicorn worker (multiprocess mode).

``gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` in the master before any worker
imports prometheus_client, and removes a dead worker's files in ``child_exit``. Without it
(a single process, e.g. the Flask test client) the default registry is used.
"""

from __future__ import annotations

import os
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
)

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
LOAD_FAILURES = Counter("model_load_failures_total", "Model versions that failed to load.",
                        ["model"])
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
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
