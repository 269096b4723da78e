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

Scores (``server.serving.driftscores``) cover the window: the current minute and the
previous DRIFT_WINDOW_SECONDS / 60. One worker per server, the holder of
``RUNTIME_DIR/drift.lock``, computes them every SCORE_SECONDS for every version with a
profile: it sets the Prometheus gauges and publishes a ``drift`` event when a feature's (or
the prediction's) status changes. ``GET /models/<m>/versions/<v>/drift`` computes them on
demand in whichever worker answers.

Redis is optional and fail-open, like the cache: a failed flush keeps its deltas for the next
one (those older than the window are dropped and counted), a breaker skips Redis for
REDIS_BREAKER_SECONDS, and readers fall back to this server's own counts with a note.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from server.model.loaded import LoadedVersion
from server.model.profile import Profile
from server.model.registry import ModelRegistry
from server.runtime import prometheus
from server.runtime.events import EventLog
from server.serving.dataplane import Outcome
from server.serving.driftscores import scores
from server.serving.driftstore import RedisCounts, RedisUnavailable, WorkerFiles, version_key

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
SCORE_SECONDS = 2.0
MAX_PENDING = 20_000  # requests waiting for the next flush; beyond, their rows are not counted
PREDICTION = "(prediction)"  # the prediction's status among the features' in the leader's memory
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


@dataclass
class _Counts:
    """One version's counts in this worker, against one profile."""

    profile: Profile
    minutes: dict[int, np.ndarray] = field(default_factory=dict)
    total: np.ndarray | None = None

    def add(self, minute: int, vec: np.ndarray) -> None:
        found = self.minutes.get(minute)
        self.minutes[minute] = vec if found is None else found + vec
        self.total = vec.copy() if self.total is None else self.total + vec


class DriftMonitor:
    """One worker's drift counting, sharing and scoring (see the module's docstring)."""

    def __init__(self, registry: ModelRegistry, runtime_dir: Path, events: EventLog | None = None,
                 *, window_seconds: int = 3600, min_rows: int = 500,
                 sample_rows_per_second: int = 1000, client: redis.Redis | None = None,
                 breaker_seconds: float = 2.0, clock: Callable[[], float] = time.time,
                 seed: int | None = None, pid: int | None = None) -> None:
        self.registry = registry
        self.events = events
        self.window_seconds = window_seconds
        self.window_minutes = max(1, math.ceil(window_seconds / 60))
        self.min_rows = min_rows
        self.budget = sample_rows_per_second
        self.clock = clock
        self.files = WorkerFiles(runtime_dir, pid)
        self.redis = RedisCounts(client, self.window_minutes, breaker_seconds, clock) \
            if client is not None else None
        self._lock_path = Path(runtime_dir) / "drift.lock"
        self._status_path = Path(runtime_dir) / "drift.statuses.json"  # the leader's memory
        self._rng = np.random.default_rng(seed)
        self._pending: list[Entry] = []
        self._budgets: dict[Profile, list[int]] = {}  # per version: [second, rows left]
        self._counts: dict[str, _Counts] = {}
        # Redis deltas not yet written: (version key, fingerprint) -> minute -> counts
        self._deltas: dict[tuple[str, str], dict[int, np.ndarray]] = {}
        self._last_minute: int | None = None
        self._leader: int | None = None  # the lock file's descriptor while this worker leads
        self._statuses: dict[str, dict[str, str]] = {}  # "model/version/fp" -> name -> status
        # Versions whose gauges hold a figure: their feature names, and whether the
        # prediction has one too (set to NaN once the window empties or the version goes).
        self._gauged: dict[tuple[str, str], tuple[list[str], bool]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # over the counts: flush changes them, reports read
        self._flushing = threading.Lock()  # one flush at a time
        self._started = False
        self.sampled_out = 0  # rows served but not counted: over the per-second budget
        self.dropped = 0  # rows not counted: too many requests waiting, or Redis down too long

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

    def stop(self) -> None:
        """Stop the greenlet and give up leading (another worker takes over)."""
        self._stop.set()
        if self._leader is not None:
            os.close(self._leader)  # closing the descriptor releases the lock
            self._leader = None

    def _run(self) -> None:
        next_score = time.monotonic() + SCORE_SECONDS
        while not self._stop.wait(FLUSH_SECONDS):
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
                versions, closed, items = self._count_pending()
            if versions is not None:
                self._write(versions, closed)
            if items:
                self._push(items)

    def _count_pending(self) -> tuple[dict[str, dict[str, Any]] | None, bool,
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
        closed = minute_now != self._last_minute
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
                counts = self._counts[key] = _Counts(profile)
            counts.add(minute, vec)
            closed |= minute < minute_now
            if self.redis is not None:
                deltas = self._deltas.setdefault((key, fp), {})
                deltas[minute] = deltas[minute] + vec if minute in deltas else vec.copy()
        self._forget(minute_now)
        versions = self._snapshot(minute_now) if groups or closed else None
        return versions, closed, self._take_deltas(minute_now)

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

    def _forget(self, minute_now: int) -> None:
        """Drop minutes that left the window, and versions that are gone or changed."""
        oldest = minute_now - self.window_minutes
        for key, counts in list(self._counts.items()):
            model, _, version = key.rpartition("/")
            lv = self.registry.models.get(model)
            current = lv.versions.get(version) if lv is not None else None
            if current is None or current.profile is None or \
                    current.profile.fingerprint != counts.profile.fingerprint:
                del self._counts[key]
                continue
            for minute in [m for m in counts.minutes if m < oldest]:
                del counts.minutes[minute]

    def _snapshot(self, minute_now: int) -> dict[str, dict[str, Any]]:
        """What the files say: per version the open minute, the closed ones, the totals
        (the arrays are never changed in place, so they can be written after the lock)."""
        return {key: {
            "fp": counts.profile.fingerprint,
            "open": {str(m): v for m, v in counts.minutes.items() if m >= minute_now},
            "closed": {str(m): v for m, v in counts.minutes.items() if m < minute_now},
            "total": counts.total,
        } for key, counts in self._counts.items()}

    def _write(self, versions: dict[str, dict[str, Any]], closed: bool) -> None:
        try:
            self.files.write(versions, closed)
        except OSError as exc:
            log.warning("drift counts not written", extra={"err": str(exc)})

    def _take_deltas(self, minute_now: int) -> list[tuple[str, list[str], np.ndarray]]:
        """The Redis deltas to push now (``_deltas`` emptied), as (key, cell names, counts)."""
        if self.redis is None or not self._deltas:
            return []
        oldest = minute_now - self.window_minutes
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
        except RedisUnavailable:
            with self._lock:  # kept for the next flush
                for key, _, vec in items:
                    _, model, version, fp, minute = key.split(":")
                    kept = self._deltas.setdefault((version_key(model, version), fp), {})
                    m = int(minute)
                    kept[m] = kept[m] + vec if m in kept else vec

    # -- reading -----------------------------------------------------------------------------
    def window_range(self) -> range:
        minute_now = int(self.clock()) // 60
        return range(minute_now - self.window_minutes, minute_now + 1)

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
                for minute, vec in mine.minutes.items():
                    if minute in minutes:
                        window += vec
                if mine.total is not None:
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
        """The drift answer of one version."""
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
        body.update(scores(profile, window, self.min_rows))
        since = scores(profile, total, self.min_rows, detail=False,
                       span="since the server started")
        since.pop("worst_feature")
        body["since_start"] = {"counts_scope": SCOPE_WORKERS, **since}
        return body

    # -- the leader: gauges and events -------------------------------------------------------
    def _lead(self) -> bool:
        """True while this worker holds the server's drift lock (taken when free)."""
        if self._leader is not None:
            return True
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._leader = fd
        try:  # where the previous leader left the statuses: a change is told once
            saved = orjson.loads(self._status_path.read_bytes())
            if isinstance(saved, dict):
                self._statuses = saved
        except (OSError, orjson.JSONDecodeError):
            pass
        return True

    def refresh(self) -> None:
        """In the leader: scores of every version with a profile, as gauges and events."""
        if not self._lead():
            return
        changed = False
        scored = set()
        for entry in list(self.registry.models.values()):
            for lv in list(entry.versions.values()):
                if lv.profile is not None:
                    changed |= self._score(lv)
                    scored.add((lv.name, lv.version))
        for pair in set(self._gauged) - scored:  # a version gone, or without a profile now
            self._clear_gauges(pair)
        if changed:
            try:
                self._status_path.write_bytes(orjson.dumps(self._statuses))
            except OSError as exc:
                log.warning("drift statuses not saved", extra={"err": str(exc)})

    def _score(self, lv: LoadedVersion) -> bool:
        profile = lv.profile
        assert profile is not None
        window = self.window_counts(lv)[0]
        found = scores(profile, window, self.min_rows, detail=False)
        pair = (lv.name, lv.version)
        if found["status"] == "not_enough_rows":
            self._clear_gauges(pair)  # the window emptied: no figure rather than an old one
            return False
        self._set_gauges(pair, found)
        now = {name: s["status"] for name, s in found["features"].items()}
        if found["prediction"] is not None:
            now[PREDICTION] = found["prediction"]["status"]
        key = f"{version_key(lv.name, lv.version)}/{profile.fingerprint}"
        before = self._statuses.get(key, {})
        moved = {name: (before.get(name, "stable"), s) for name, s in now.items()
                 if before.get(name, "stable") != s}
        if before == now:
            return False
        self._statuses[key] = now
        if moved and self.events is not None:
            psis = {name: s["psi"] for name, s in found["features"].items()}
            if found["prediction"] is not None:
                psis[PREDICTION] = found["prediction"]["psi"]
            self.events.publish("drift", {
                "model": lv.name, "version": lv.version, "status": found["status"],
                "rows": found["rows"], "worst_feature": found["worst_feature"],
                "features": {n: {"from": a, "to": b, "psi": psis[n]}
                             for n, (a, b) in moved.items() if n != PREDICTION},
                "prediction": ({"from": moved[PREDICTION][0], "to": moved[PREDICTION][1],
                                "psi": psis[PREDICTION]} if PREDICTION in moved else None),
            })
        return True

    def _set_gauges(self, pair: tuple[str, str], found: dict[str, Any]) -> None:
        for name, s in found["features"].items():
            prometheus.FEATURE_DRIFT.labels(*pair, name).set(s["psi"])
        if found["prediction"] is not None:
            prometheus.PREDICTION_DRIFT.labels(*pair).set(found["prediction"]["psi"])
        self._gauged[pair] = (list(found["features"]), found["prediction"] is not None)

    def _clear_gauges(self, pair: tuple[str, str]) -> None:
        """NaN, as multiprocess mode cannot remove a series."""
        if pair not in self._gauged:
            return
        names, prediction = self._gauged.pop(pair)
        for name in names:
            prometheus.FEATURE_DRIFT.labels(*pair, name).set(math.nan)
        if prediction:
            prometheus.PREDICTION_DRIFT.labels(*pair).set(math.nan)

    def status(self) -> dict[str, Any]:
        return {"pending": len(self._pending), "sampled_out": self.sampled_out,
                "dropped": self.dropped, "leader": self._leader is not None,
                "redis": self.redis.status() if self.redis is not None else None}
