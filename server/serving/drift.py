"""Live drift monitoring: every version's served rows counted into its reference profile's
bins, per minute, summed over the workers of a server and, with Redis, over instances.

On the request path ``observe`` only takes a reference to the rows and their answers, within
a budget of DRIFT_SAMPLE_ROWS_PER_SECOND rows per worker and version (beyond it a batch,
stream chunk or CSV chunk is sampled: a random subset of its rows, drawn later; requests
once the second's budget is spent are only counted as served). Once a second a greenlet of
the worker (``threading`` is gevent's) bins what was taken, vectorised per version (one
``searchsorted`` per feature column and one ``bincount``), adds it to the worker's minute
buckets, writes them to RUNTIME_DIR for the other workers and, with Redis, adds the deltas
to the minute's hash in one pipeline. Nothing on the request path waits for a file or Redis.

Scores (``server.serving.driftscores``) cover the window: DRIFT_WINDOW_SECONDS / 60 minutes,
the current one and those before it. One worker per server (``server.serving.driftleader``)
computes them every SCORE_SECONDS for every version with a profile: it sets the Prometheus
gauges and publishes a ``drift`` event when a feature's (or the prediction's) status
changes. ``GET /models/<m>/versions/<v>/drift`` computes them in
whichever worker answers, at most once per REPORT_SECONDS and version in that worker
(requests meanwhile, and those that come while it is computed, get that answer).

Redis is optional and fail-open, like the cache: a breaker skips Redis for
REDIS_BREAKER_SECONDS, and readers fall back to this server's own counts with a note. A
flush that Redis refused (or that the breaker kept back) keeps its deltas for the next one;
one that failed after it may have reached Redis (a timeout, a connection lost mid-reply)
drops them and counts them in ``drift_rows_dropped_total``, since HINCRBY sent twice counts
twice. Deltas older than the window are dropped and counted too.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from server.model.loaded import LoadedVersion
from server.model.profile import Profile
from server.model.registry import ModelRegistry
from server.runtime import prometheus
from server.runtime.events import EventLog
from server.runtime.offload import offload
from server.serving.dataplane import Outcome
from server.serving.driftleader import DriftLeader
from server.serving.driftredis import RedisCounts, RedisUnavailable
from server.serving.driftscores import scores
from server.serving.driftstore import MinuteCounts, WorkerFiles, version_key, worker_alive

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
SCORE_SECONDS = 2.0
REPORT_SECONDS = 1.0  # how long a worker reuses a version's drift answer
MAX_PENDING = 20_000  # requests waiting for the next flush; beyond, their rows are not counted
SCOPE_WORKERS = "all workers of this server"
SCOPE_REDIS = "all instances (redis)"

# One request's rows as taken on the request path: the version, its answers and rows (None
# when the budget was spent), how many rows to count, how many were served, the second.
Entry = tuple[LoadedVersion, Outcome | None, np.ndarray | None, int, int, int]


def _predictions(outcome: Outcome) -> list[Any]:
    """The answers' predictions in whichever form the outcome holds them: building columns
    from a single prediction's row (or rows from a batch's columns) costs more than
    counting it."""
    rows = outcome._results  # Outcome (dataplane.py) has no public accessor for this yet
    if rows is not None:
        return [r["prediction"] for r in rows]
    return outcome.columns.predictions


class DriftMonitor:
    """One worker's drift counting, sharing and scoring (see the module's docstring)."""

    def __init__(self, registry: ModelRegistry, runtime_dir: Path, events: EventLog | None = None,
                 *, window_seconds: int = 3600, min_rows: int = 500,
                 sample_rows_per_second: int = 1000, client: redis.Redis | None = None,
                 breaker_seconds: float = 2.0, clock: Callable[[], float] = time.time,
                 seed: int | None = None, pid: int | None = None,
                 alive: Callable[[int], bool] = worker_alive) -> None:
        self.registry = registry
        self.window_seconds = window_seconds
        self.window_minutes = max(1, math.ceil(window_seconds / 60))
        self.min_rows = min_rows
        self.budget = sample_rows_per_second
        self.clock = clock
        self.files = WorkerFiles(runtime_dir, pid, alive)
        self.redis = RedisCounts(client, self.window_minutes, breaker_seconds, clock) \
            if client is not None else None
        self.leader = DriftLeader(runtime_dir, events, min_rows,
                                  lambda lv: self.window_counts(lv)[0])
        self._rng = np.random.default_rng(seed)
        self._pending: list[Entry] = []
        self._budgets: dict[Profile, list[int]] = {}  # per version: [second, rows left]
        self._counts: dict[str, MinuteCounts] = {}
        # Redis deltas not yet written: (version key, fingerprint) -> minute -> counts
        self._deltas: dict[tuple[str, str], dict[int, np.ndarray]] = {}
        self._last_minute: int | None = None
        self._lock = threading.Lock()  # over the counts: flush changes them, reports read
        self._flushing = threading.Lock()  # one flush at a time
        # Drift answers: (version key, fingerprint) -> (clock when computed, answer), and a
        # lock per key so that one request computes while the others wait for its answer.
        self._reports: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._computing: dict[tuple[str, str], threading.Lock] = {}
        self._started = False
        self.sampled_out = 0  # rows served but not counted: over the per-second budget
        # Rows not counted: too many requests waiting, rows that did not fit the profile; or
        # not shared: Redis down for longer than the window, a push that may have reached it
        self.dropped = 0

    # -- the request path --------------------------------------------------------------------
    def observe(self, outcome: Outcome, X: np.ndarray) -> None:
        """Take one request's rows for counting (a no-op for a version with no profile)."""
        lv = outcome.model
        if lv.profile is None:
            return
        n = len(X)
        second = int(self.clock())
        budget = self._budgets.get(lv.profile)  # [second, rows left in it]
        if budget is None or budget[0] != second:
            budget = self._budgets[lv.profile] = [second, self.budget]
        take = n if n <= budget[1] else budget[1]
        budget[1] -= take
        if len(self._pending) >= MAX_PENDING:
            self._drop(n)
            return
        if take:
            self._pending.append((lv, outcome, X, take, n, second))
        else:
            self._pending.append((lv, None, None, 0, n, second))

    # -- the worker's greenlet ---------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self.files.remove_stale()
        except OSError as exc:
            log.warning("drift: stale files not removed", extra={"err": str(exc)})
        threading.Thread(target=self._run, daemon=True, name="drift").start()

    def _run(self) -> None:
        """Until the worker exits (which also lets go of the leader's lock)."""
        next_score = time.monotonic() + SCORE_SECONDS
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - monitoring must never take the worker down
                log.exception("drift flush failed")
            if time.monotonic() >= next_score:
                next_score = time.monotonic() + SCORE_SECONDS
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001
                    log.exception("drift scoring failed")

    def flush(self) -> None:
        """Count what was taken since the last flush, share it, and push it to Redis. The
        counts change under ``_lock`` only (a report may read them meanwhile); the files and
        Redis are written outside it."""
        with self._flushing:
            with self._lock:
                versions, items = self._count_pending()
            if versions is not None:
                self._write(versions)
            if items:
                self._push(items)

    def _count_pending(self) -> tuple[dict[str, dict[str, Any]] | None,
                                      list[tuple[str, list[str], np.ndarray]]]:
        pending, self._pending = self._pending, []
        second = int(self.clock())
        minute_now = second // 60
        self._budgets = {p: b for p, b in self._budgets.items() if b[0] >= second - 1}
        groups: dict[tuple[str, str, int], list[Entry]] = {}
        for entry in pending:
            lv = entry[0]
            assert lv.profile is not None
            group = (version_key(lv.name, lv.version), lv.profile.fingerprint, entry[5] // 60)
            groups.setdefault(group, []).append(entry)
        ticked = minute_now != self._last_minute  # a minute closed: the file says so
        self._last_minute = minute_now
        for (key, fp, minute), entries in groups.items():
            profile = entries[-1][0].profile
            assert profile is not None
            try:
                vec = self._count(profile, entries)
            except Exception:  # noqa: BLE001 - rows that do not fit the profile are skipped
                log.exception("drift: rows not counted", extra={"version": key})
                self._drop(sum(e[4] for e in entries))
                continue
            counts = self._counts.get(key)
            if counts is None or counts.profile.fingerprint != fp:
                counts = self._counts[key] = MinuteCounts(profile, minute_now,
                                                          self.window_minutes)
            counts.add(minute, vec)
            if self.redis is not None:
                deltas = self._deltas.setdefault((key, fp), {})
                deltas[minute] = deltas[minute] + vec if minute in deltas else vec.copy()
        self._forget(minute_now)
        versions = {key: counts.shared() for key, counts in self._counts.items()} \
            if groups or ticked else None
        return versions, self._take_deltas(minute_now)

    def _drop(self, rows: int) -> None:
        self.dropped += rows
        prometheus.DRIFT_DROPPED.inc(rows)

    def _count(self, profile: Profile, entries: list[Entry]) -> np.ndarray:
        cells = profile.cells
        matrices: list[np.ndarray] = []
        answers: list[Any] = []
        served = 0
        for _, outcome, X, take, n, _ in entries:
            served += n
            if not take or outcome is None or X is None:
                continue
            predictions = _predictions(outcome)
            if take < n:  # over the budget: a random subset of the request's rows
                picked = np.sort(self._rng.choice(n, take, replace=False))
                X = X[picked]
                predictions = [predictions[i] for i in picked.tolist()]
            matrices.append(X)
            answers.extend(predictions)
        if matrices:
            vec = cells.count(np.vstack(matrices) if len(matrices) > 1 else matrices[0], answers)
        else:
            vec = np.zeros(cells.size, dtype=np.int64)
        unsampled = served - int(vec[cells.rows])
        vec[cells.served] += unsampled
        self.sampled_out += unsampled
        return vec

    def _profiled(self) -> list[LoadedVersion]:
        """Every loaded version with a profile."""
        return [lv for entry in list(self.registry.models.values())
                for lv in list(entry.versions.values()) if lv.profile is not None]

    def _current(self) -> set[tuple[str, str]]:
        """(version key, fingerprint) of every loaded version with a profile."""
        return {(version_key(lv.name, lv.version), lv.profile.fingerprint)
                for lv in self._profiled() if lv.profile is not None}

    def refresh(self) -> None:
        """When this worker leads: gauges and events of every version with a profile."""
        self.leader.refresh(self._profiled())

    def _forget(self, minute_now: int) -> None:
        """Close the minutes before ``minute_now`` and drop those that left the window;
        forget versions that are gone or changed, and their answers."""
        current = self._current()
        for key, counts in list(self._counts.items()):
            if (key, counts.profile.fingerprint) not in current:
                del self._counts[key]
            else:
                counts.close(minute_now)
        for done in set(self._computing) - current:
            self._reports.pop(done, None)
            self._computing.pop(done, None)

    def _write(self, versions: dict[str, dict[str, Any]]) -> None:
        try:
            self.files.write(versions)
        except OSError as exc:
            log.warning("drift counts not written", extra={"err": str(exc)})

    def _take_deltas(self, minute_now: int) -> list[tuple[str, list[str], np.ndarray]]:
        """The Redis deltas to push now (``_deltas`` emptied), as (key, cell names, counts)."""
        if self.redis is None or not self._deltas:
            return []
        oldest = minute_now - self.window_minutes + 1
        items = []
        for (key, fp), minutes in self._deltas.items():
            counts = self._counts.get(key)
            for minute in list(minutes):
                if minute < oldest or counts is None or counts.profile.fingerprint != fp:
                    # Redis was away for the whole window (or the version went): these rows
                    # will never be shared.
                    self._drop(int(minutes.pop(minute)[-2]))  # the "rows" cell
            if counts is not None:
                model, _, version = key.rpartition("/")
                names = counts.profile.cells.names
                items += [(RedisCounts.key(model, version, fp, m), names, v)
                          for m, v in minutes.items()]
        self._deltas = {}
        return items

    def _push(self, items: list[tuple[str, list[str], np.ndarray]]) -> None:
        assert self.redis is not None
        try:
            self.redis.push(items)
        except RedisUnavailable as exc:
            if exc.maybe_applied:  # sent again, they could count twice: lost, and counted
                self._drop(sum(int(vec[-2]) for _, _, vec in items))  # the "rows" cell
                return
            with self._lock:  # never reached Redis: kept for the next flush
                for key, _, vec in items:
                    _, model, version, fp, minute = key.split(":")
                    kept = self._deltas.setdefault((version_key(model, version), fp), {})
                    m = int(minute)
                    kept[m] = kept[m] + vec if m in kept else vec

    # -- reading -----------------------------------------------------------------------------
    def window_range(self) -> range:
        """The window's minutes: this one and the ``window_minutes - 1`` before it."""
        minute_now = int(self.clock()) // 60
        return range(minute_now - self.window_minutes + 1, minute_now + 1)

    def local_counts(self, lv: LoadedVersion) -> tuple[np.ndarray, np.ndarray]:
        """(window, since start) of one version over this server's workers."""
        profile = lv.profile
        assert profile is not None
        key, fp, size = version_key(lv.name, lv.version), profile.fingerprint, profile.cells.size
        minutes = self.window_range()
        window, total = self.files.others(key, fp, size, minutes)
        with self._lock:
            mine = self._counts.get(key)
            if mine is not None and mine.profile.fingerprint == fp:
                window += mine.window(minutes.start, minutes.stop - 1)
                total += mine.total
        return window, total

    def window_counts(self, lv: LoadedVersion) -> tuple[np.ndarray, str, str | None]:
        """The window's counts, their scope and a note when they are not what was asked for
        (Redis configured but unavailable)."""
        profile = lv.profile
        assert profile is not None
        note = None
        if self.redis is not None:
            try:
                return self.redis.window(lv.name, lv.version, profile.fingerprint,
                                         profile.cells, self.window_range()), SCOPE_REDIS, None
            except RedisUnavailable as exc:
                note = (f"Redis unavailable ({exc}): counts of this server's workers only, "
                        "other instances left out")
        return self.local_counts(lv)[0], SCOPE_WORKERS, note

    def report(self, lv: LoadedVersion) -> dict[str, Any]:
        """The drift answer of one version (shared: not to be changed by the caller),
        computed at most once per REPORT_SECONDS in this worker: the scores of a wide
        profile take tens of milliseconds."""
        if lv.profile is None:
            return self._report(lv)
        key = (version_key(lv.name, lv.version), lv.profile.fingerprint)
        with self._computing.setdefault(key, threading.Lock()):
            now = self.clock()
            found = self._reports.get(key)
            if found is not None and 0 <= now - found[0] < REPORT_SECONDS:
                return found[1]
            body = self._report(lv)
            self._reports[key] = (now, body)
            return body

    def _report(self, lv: LoadedVersion) -> dict[str, Any]:
        body: dict[str, Any] = {"model": lv.name, "version": lv.version,
                                "window_seconds": self.window_seconds,
                                "min_rows": self.min_rows}
        profile = lv.profile
        if profile is None:
            body.update(status="no_reference", reason=lv.profile_note or "no reference profile",
                        rows=None, reference_rows=None, features={}, prediction=None)
            return body
        window, scope, note = self.window_counts(lv)
        total = self.local_counts(lv)[1]
        body.update(reference_rows=profile.rows, reference_created=profile.created or None,
                    counts_scope=scope, note=note)
        # Pure numpy and scipy: in a native thread under gevent, the other requests go on.
        body.update(offload(scores, profile, window, self.min_rows))
        since = scores(profile, total, self.min_rows, detail=False,
                       span="since the server started")
        since.pop("worst_feature")
        body["since_start"] = {"counts_scope": SCOPE_WORKERS, **since}
        return body

    def status(self) -> dict[str, Any]:
        """This worker's side of drift monitoring, for GET /status."""
        return {"state": "on", "window_seconds": self.window_seconds,
                "pending": len(self._pending), "sampled_out": self.sampled_out,
                "dropped": self.dropped, "leader": self.leader.leading,
                "redis": self.redis.status() if self.redis is not None else None}
