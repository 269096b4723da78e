"""Per-worker dynamic micro-batching of one-row predictions.

Inside one gevent worker, concurrent one-row requests for the same loaded version are
gathered and predicted in one model call. The first request of a batch (the leader) waits
until the event loop has run every other ready greenlet once more without any joining, or
until ``max_delay`` has passed, or until ``max_size`` rows are in; then it predicts for all.
No request waits longer than ``max_delay`` for its batch to close.

A version is batched only when that pays and changes no answer (checked at load on probe
rows, see ``batch_mode``): stacked rows must give, bit for bit, what each row gets alone,
and one stacked call must save each row more than gathering costs it. A one-row
LogisticRegression call is a matrix-vector product whose last bits differ from a batch's
matrix-matrix product, and on our own arithmetic it costs ~20 us anyway: it goes alone.
A forest's one-row call (~300 us) is mostly fixed cost: it is batched.
A batch whose model call fails is retried row by row, so a bad row fails only itself.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from server.model.loaded import LoadedVersion
from server.runtime import prometheus

log = logging.getLogger(__name__)

Predict = Callable[[LoadedVersion, np.ndarray], list[dict[str, Any]]]

# About what gathering costs each request of a batch (an event, a timeout, two greenlet
# switches: ~30 us measured with py-spy under wrk); a batch must save each row more.
MIN_GAIN_US = 50.0
TIMED_BATCH = 8  # rows in the batch whose saving is timed at load


def batch_mode(lv: LoadedVersion, predict: Predict, probes: int = 32) -> LoadedVersion:
    """Return ``lv`` with ``microbatch`` "stack" when one call on stacked probe rows answers
    each row bit for bit as a one-row call does, and a batch of TIMED_BATCH rows saves each
    row at least MIN_GAIN_US; else "off", with the reason in ``microbatch_note``. The
    timings are taken at load, so a borderline model may come out either way; the answers
    are exact both ways."""
    if not lv.n_features:
        return replace(lv, microbatch="off", microbatch_note="unknown feature count")
    rng = np.random.default_rng(7)
    P = rng.normal(0.0, 3.0, (probes, lv.n_features))
    try:
        alone, one_row = [], []
        for i in range(probes):
            t0 = time.perf_counter()
            alone.append(predict(lv, P[i:i + 1])[0])
            one_row.append(time.perf_counter() - t0)
        together = predict(lv, P)
        stacked = []
        for _ in range(3):  # timed at a batch size that load really makes (2-8 rows)
            t0 = time.perf_counter()
            predict(lv, P[:TIMED_BATCH])
            stacked.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a model that fails on probes is simply not batched
        log.info("micro-batching probe failed",
                 extra={"model": lv.name, "version": lv.version,
                        "err": f"{type(exc).__name__}: {exc}"[:200]})
        return replace(lv, microbatch="off", microbatch_note="the probe rows failed")
    single_us = statistics.median(one_row) * 1e6
    lv = replace(lv, row_us=single_us)  # also what CACHE=auto weighs (serving.cachepolicy)
    if together != alone:
        return replace(lv, microbatch="off", microbatch_note=(
            "a batched call's answers differ from one-row answers (in the last bits)"))
    gain_us = single_us - min(stacked) / TIMED_BATCH * 1e6
    if gain_us < MIN_GAIN_US:
        return replace(lv, microbatch="off", microbatch_note=(
            f"a one-row call costs {single_us:.0f} us; batching would save {gain_us:.0f} us "
            f"a row, less than the {MIN_GAIN_US:.0f} us gathering costs"))
    return replace(lv, microbatch="stack", microbatch_note=(
        f"a one-row call costs {single_us:.0f} us; batching saves {gain_us:.0f} us a row"))


class _Batch:
    __slots__ = ("lv", "rows", "results", "done", "full")

    def __init__(self, lv: LoadedVersion, row: np.ndarray) -> None:
        from gevent.event import Event

        self.lv = lv
        self.rows: list[np.ndarray] = [row]
        self.results: list[list[dict[str, Any]] | BaseException] = []
        self.done = Event()
        self.full = False

    def run(self, predict: Predict) -> None:
        X = np.vstack(self.rows) if len(self.rows) > 1 else self.rows[0]
        try:
            self.results = [[r] for r in predict(self.lv, X)]
        except Exception:  # noqa: BLE001 - retried alone below: each row gets its own answer
            self.results = []
            for row in self.rows:
                try:
                    self.results.append(predict(self.lv, row))
                except Exception as exc:  # noqa: BLE001 - this row's own error, raised to it
                    self.results.append(exc)
        prometheus.MICRO_BATCH_ROWS.observe(len(self.rows))

    def outcome(self, index: int) -> list[dict[str, Any]]:
        result = self.results[index]
        if isinstance(result, BaseException):
            raise result
        return result


class MicroBatcher:
    """Gathers one-row predictions per loaded version (gevent workers only)."""

    def __init__(self, predict: Predict, max_size: int, max_delay_ms: float) -> None:
        self.predict = predict
        self.max_size = max_size
        self.max_delay = max_delay_ms / 1000.0
        self._open: dict[int, _Batch] = {}
        self.batches = 0
        self.rows = 0

    def submit(self, lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
        """Predict one row (``X`` of shape (1, n)), batched with its concurrent peers."""
        if lv.microbatch == "off":
            return self.predict(lv, X)
        key = id(lv)
        batch = self._open.get(key)
        if batch is not None and batch.lv is lv and not batch.full:
            index = len(batch.rows)
            batch.rows.append(X)
            if len(batch.rows) >= self.max_size:
                batch.full = True
                del self._open[key]
            batch.done.wait()
            return batch.outcome(index)
        batch = _Batch(lv, X)
        self._open[key] = batch
        try:
            self._gather(batch)
        finally:
            # Even if this greenlet is being killed, its batch-mates get their answers.
            if self._open.get(key) is batch:
                del self._open[key]
            batch.full = True
            try:
                batch.run(self.predict)
            finally:
                batch.done.set()
        self.batches += 1
        self.rows += len(batch.rows)
        return batch.outcome(0)

    def _gather(self, batch: _Batch) -> None:
        """Let the other ready greenlets run (and join) until none joins in a whole turn of
        the event loop, the batch is full, or the delay is over."""
        import gevent

        with gevent.Timeout(self.max_delay, False):
            while not batch.full:
                seen = len(batch.rows)
                gevent.idle()
                if len(batch.rows) == seen:
                    return

    def status(self) -> dict[str, Any]:
        return {"max_size": self.max_size, "max_delay_ms": self.max_delay * 1000,
                "batches": self.batches, "rows": self.rows,
                "mean_rows": round(self.rows / self.batches, 2) if self.batches else None}


def gevent_active() -> bool:
    """Batching relies on cooperative scheduling: only under gevent's monkey patches."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("socket"))


def cooperate(longest: float = 0.01) -> None:
    """Let the worker's other greenlets run until the event loop is idle (every ready request
    had its turn), for at most ``longest`` seconds so that a busy worker cannot starve the
    caller. A no-op outside gevent. (``gevent.sleep(0)`` was not enough: requests waiting on
    I/O got about one turn per second of a chunked slow batch instead of 17.)"""
    if gevent_active():
        import gevent

        with gevent.Timeout(longest, False):
            gevent.idle()
