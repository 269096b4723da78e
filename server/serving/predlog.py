"""The prediction log: one record per predicted row, buffered per worker and written in
batches off the request path.

``record`` (on the request path) only appends a reference to the outcome to a bounded
buffer. A writer loop wakes every PREDICTION_LOG_FLUSH_SECONDS (or as soon as
PREDICTION_LOG_BATCH_ROWS are waiting), turns the buffer into rows and writes them in one
transaction, both in a native thread (``offload``). When the database is down, slow or full
the rows stay buffered and the writer retries with a growing pause; beyond the buffer's bound
the oldest rows are dropped and counted. Predictions never wait for, or fail because of, the
log.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from server.runtime import prometheus
from server.serving.batching import cooperate
from server.serving.dataplane import Outcome
from server.serving.logstore import LogRefused, LogStore, LogUnavailable

log = logging.getLogger(__name__)

RETENTION_EVERY = 3600.0  # seconds between two retention passes of one worker
MAX_BACKOFF = 10.0
ROWS_SLICE = 200  # requests whose rows are built between two turns of the event loop


@dataclass(frozen=True)
class Origin:
    """Where a prediction came from, captured by the front door while it has the request."""

    request_id: str
    door: str  # native, batch, ab, stream, csv, tfserving, v2, websocket
    api_key: str | None = None  # the key's hash, never the key
    experiment: str | None = None
    arm: str | None = None


# A request's row numbers for a predict call: the first one (the rest follow on), or each.
RowNumbers = int | list[int]


@dataclass
class _Entry:
    ts: float
    origin: Origin
    outcome: Outcome
    X: np.ndarray
    rows: RowNumbers = 0  # a stream logs chunk by chunk; CSV skips its rejected rows


class PredictionLog:
    def __init__(self, store: LogStore, *, sample: float = 1.0, inputs: bool = True,
                 buffer_rows: int = 20_000, flush_seconds: float = 0.5,
                 batch_rows: int = 5000, retention_days: float = 0.0,
                 offload: Callable[..., Any] | None = None) -> None:
        self.store = store
        self.sample = sample
        self.inputs = inputs
        self.buffer_rows = buffer_rows
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.retention_days = retention_days
        self._offload = offload or (lambda fn, *a: fn(*a))
        self._pending: deque[_Entry] = deque()
        self._pending_rows = 0
        self._wake = threading.Event()
        # Reads (GET /predictions, quality, feedback) share gevent's threadpool with this
        # writer and the DNS resolver: at most two at once per worker.
        self.reads = threading.BoundedSemaphore(2)
        self._started = False
        self.state = "starting"
        self.last_error: str | None = None
        self.last_write: float | None = None
        self.written = 0
        self.dropped = 0
        self._next_purge = time.time() + random.uniform(5, 60)  # workers spread their passes

    # -- the request path --------------------------------------------------------------------
    def record(self, outcome: Outcome, X: np.ndarray, origin: Origin, rows: RowNumbers = 0
               ) -> None:
        """Queue one request's rows (or none, by PREDICTION_LOG_SAMPLE; a stream's chunks
        are sampled by their request, so a request is logged whole or not at all)."""
        if self.sample < 1.0 and (random.Random(origin.request_id).random() >= self.sample):
            return
        n = len(outcome)
        if n == 0:
            return
        self._pending.append(_Entry(time.time(), origin, outcome, X, rows))
        self._pending_rows += n
        if self._pending_rows > self.buffer_rows:
            self._drop_oldest()
        if self._pending_rows >= self.batch_rows:
            self._wake.set()

    def _drop_oldest(self) -> None:
        dropped = 0
        while self._pending_rows > self.buffer_rows and len(self._pending) > 1:
            entry = self._pending.popleft()
            rows = len(entry.outcome)
            self._pending_rows -= rows
            dropped += rows
        if dropped:
            self.dropped += dropped
            prometheus.LOG_DROPPED.inc(dropped)

    # -- the writer --------------------------------------------------------------------------
    def start(self) -> None:
        """The writer loop: a greenlet under gevent (``threading`` is patched), else a thread."""
        if not self._started:
            self._started = True
            threading.Thread(target=self._run, daemon=True, name="prediction-log").start()
            atexit.register(self.close)  # a worker's last rows are not lost at a restart

    def _run(self) -> None:
        pause = self.flush_seconds
        while True:
            self._wake.wait(pause)
            self._wake.clear()
            pause = self.flush_seconds if self.flush() else min(MAX_BACKOFF, pause * 2 + 0.5)
            if self.state == "ok" and self.retention_days > 0 and time.time() >= self._next_purge:
                self._purge()

    def flush(self) -> bool:
        """Write what is buffered now, ``batch_rows`` rows per statement with the loop's
        other greenlets run between them; False when the database is out (what was not
        written stays buffered, ahead of newer rows)."""
        if not self._pending:
            if self.state == "starting":
                return self._check()
            return True
        entries = list(self._pending)
        self._pending.clear()
        self._pending_rows = 0
        done = 0
        while done < len(entries):
            group: list[_Entry] = []
            rows = 0
            while done + len(group) < len(entries) and (not group or rows < self.batch_rows):
                entry = entries[done + len(group)]
                group.append(entry)
                rows += len(entry.outcome)
            try:
                self._write(self._rows(group))
            except LogUnavailable as exc:
                self._failed(str(exc))
                left = entries[done:]
                # Back in front of whatever arrived meanwhile, within the bound.
                self._pending.extendleft(reversed(left))
                self._pending_rows += sum(len(e.outcome) for e in left)
                self._drop_oldest()
                return False
            except Exception as exc:  # noqa: BLE001 - a bug in building rows must not kill the loop
                log.exception("prediction log: rows dropped")
                self._failed(f"{type(exc).__name__}: {exc}")
                self._count_dropped(rows)
            done += len(group)
            cooperate()
        self.last_write = time.time()
        self._recovered()
        return True

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """One statement in a native thread. Rows the database refuses as data (not as an
        outage) are found by halving the batch: only they are dropped, and counted."""
        try:
            self._offload(self.store.insert, rows)
        except LogRefused as exc:
            if len(rows) == 1:
                log.error("prediction log refused a row: dropped", extra={"err": str(exc)})
                self.last_error = str(exc)
                prometheus.LOG_FAILURES.inc()
                self._count_dropped(1)
                return
            half = len(rows) // 2
            self._write(rows[:half])
            self._write(rows[half:])
            return
        self.written += len(rows)
        prometheus.LOG_WRITTEN.inc(len(rows))

    def _count_dropped(self, rows: int) -> None:
        self.dropped += rows
        prometheus.LOG_DROPPED.inc(rows)

    def close(self, deadline: float = 3.0) -> None:
        """At exit: write what is buffered, in this thread, for at most ``deadline`` s."""
        if not self._pending:
            return
        self._offload = lambda fn, *a: fn(*a)  # the hub may be gone by now
        self.store.timeout = min(self.store.timeout, deadline)
        with contextlib.suppress(Exception):
            self.flush()

    def _check(self) -> bool:
        try:
            self._offload(self.store.migrate)
        except LogUnavailable as exc:
            self._failed(str(exc))
            return False
        self._recovered()
        return True

    def _failed(self, reason: str) -> None:
        if self.state != "down":
            log.warning("prediction log unavailable, buffering", extra={"err": reason})
        self.state = "down"
        self.last_error = reason
        prometheus.LOG_FAILURES.inc()

    def _recovered(self) -> None:
        if self.state == "down":
            log.info("prediction log writing again")
        self.state = "ok"

    def _rows(self, entries: list[_Entry]) -> list[tuple[Any, ...]]:
        """The entries' rows, features and answers as JSON text, built on the event loop's
        thread (the native thread that writes them then holds the GIL only for C calls) a
        slice at a time, with the loop's other greenlets run between slices: building a
        flush's few thousand rows at once held every request in flight for ~10 ms."""
        out: list[tuple[Any, ...]] = []
        for start in range(0, len(entries), ROWS_SLICE):
            if start:
                cooperate()
            self._build(entries[start:start + ROWS_SLICE], out)
        return out

    def _build(self, entries: list[_Entry], out: list[tuple[Any, ...]]) -> None:
        dumps = orjson.dumps
        for e in entries:
            o, lv = e.origin, e.outcome.model
            results = e.outcome.results
            n = len(results)
            hit = 1 if e.outcome.cached == n else 0 if e.outcome.cached == 0 else None
            ms = round(e.outcome.model_seconds * 1000, 4)
            X = np.ascontiguousarray(e.X, dtype=np.float64)
            features = X.tolist() if self.inputs else None
            classifier = lv.task == "classification"
            for i, result in enumerate(results):
                digest = hashlib.sha256(X[i].tobytes()).hexdigest()[:32]
                pred = result.get("prediction")
                out.append((
                    e.ts, o.request_id, e.rows + i if isinstance(e.rows, int) else e.rows[i],
                    lv.name, lv.version, o.door,
                    o.experiment, o.arm, o.api_key,
                    dumps(features[i]).decode() if features is not None else None, digest,
                    dumps(result).decode(),
                    str(result.get("label", pred)) if classifier else None,
                    None if classifier or pred is None else float(pred),
                    ms, hit,
                ))

    def _purge(self) -> None:
        self._next_purge = time.time() + RETENTION_EVERY
        before = time.time() - self.retention_days * 86400
        try:
            removed = self._offload(self.store.purge, before)
        except LogUnavailable as exc:
            self._failed(str(exc))
            return
        if removed:
            log.info("prediction log retention", extra={"removed": removed})

    # -- figures -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"state": self.state, "backend": self.store.dialect, "where": self.store.where,
                "pending": self._pending_rows, "written": self.written, "dropped": self.dropped,
                "sample": self.sample, "inputs": "on" if self.inputs else "hashed",
                "retention_days": self.retention_days or None,
                "last_write": self.last_write, "last_error": self.last_error}


def classifier_quality(confusion: list[tuple[str, str, int]],
                       classes: list[str] | None = None) -> dict[str, Any]:
    """Accuracy and per-class precision/recall from (predicted, true, count) triples; a ratio
    with nothing to divide is null."""
    total = sum(n for _, _, n in confusion)
    correct = sum(n for p, t, n in confusion if p == t)
    names = list(classes or [])
    names += sorted({c for p, t, _ in confusion for c in (p, t)} - set(names))
    per_class: dict[str, dict[str, Any]] = {}
    for name in names:
        tp = sum(n for p, t, n in confusion if p == name and t == name)
        predicted = sum(n for p, _, n in confusion if p == name)
        actual = sum(n for _, t, n in confusion if t == name)
        per_class[name] = {"precision": tp / predicted if predicted else None,
                           "recall": tp / actual if actual else None, "support": actual}
    return {"labelled": total, "accuracy": correct / total if total else None,
            "classes": per_class}


def regressor_quality(count: int, mae: float, mse: float) -> dict[str, Any]:
    return {"labelled": count, "mae": mae if count else None,
            "rmse": mse ** 0.5 if count else None}
