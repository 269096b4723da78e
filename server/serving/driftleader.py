"""The drift leader: one worker per server, the holder of ``RUNTIME_DIR/drift.lock``, scores
every version with a profile every few seconds (``DriftMonitor`` calls it), sets the
Prometheus gauges and publishes a ``drift`` event when a feature's (or the prediction's)
status changes. The statuses told so far are kept in ``RUNTIME_DIR/drift.statuses.json``
(replaced whole), so that a new leader, after a restart, tells each change once. The lock is
let go when the worker's process exits: another worker takes over."""

from __future__ import annotations

import fcntl
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from server.model.loaded import LoadedVersion
from server.runtime import prometheus
from server.runtime.events import EventLog
from server.serving.driftscores import scores
from server.serving.driftstore import version_key, write_atomically

log = logging.getLogger(__name__)

PREDICTION = "(prediction)"  # the prediction's status among the features' in the statuses


def _status_key(lv: LoadedVersion) -> str:
    assert lv.profile is not None
    return f"{version_key(lv.name, lv.version)}/{lv.profile.fingerprint}"


class DriftLeader:
    """Leads when it holds the lock (taken when free, at each ``refresh``)."""

    def __init__(self, runtime_dir: Path, events: EventLog | None, min_rows: int,
                 window_counts: Callable[[LoadedVersion], np.ndarray]) -> None:
        self.events = events
        self.min_rows = min_rows
        self.window_counts = window_counts  # a version's counts over the window
        self._lock_path = Path(runtime_dir) / "drift.lock"
        self._status_path = Path(runtime_dir) / "drift.statuses.json"
        self.fd: int | None = None  # the lock file's descriptor while this worker leads
        self._statuses: dict[str, dict[str, str]] = {}  # "model/version/fp" -> name -> status
        # Versions whose gauges hold a figure: their feature names, and whether the
        # prediction has one too (set to NaN once the window empties or the version goes).
        self._gauged: dict[tuple[str, str], tuple[list[str], bool]] = {}

    @property
    def leading(self) -> bool:
        return self.fd is not None

    def _lead(self) -> bool:
        """True while this worker holds the server's drift lock (taken when free)."""
        if self.fd is not None:
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
        self.fd = fd
        try:  # where the previous leader left the statuses: a change is told once
            saved = orjson.loads(self._status_path.read_bytes())
            if isinstance(saved, dict):
                self._statuses = saved
        except (OSError, orjson.JSONDecodeError):
            pass
        return True

    def refresh(self, versions: list[LoadedVersion]) -> None:
        """When this worker leads: the scores of ``versions`` (those with a profile), as
        gauges and events."""
        if not self._lead():
            return
        changed = False
        for lv in versions:
            changed |= self._score(lv)
        scored = {(lv.name, lv.version) for lv in versions}
        for pair in set(self._gauged) - scored:  # a version gone, or without a profile now
            self._clear_gauges(pair)
        current = {_status_key(lv) for lv in versions}
        for gone in set(self._statuses) - current:  # not loaded, or another profile now
            del self._statuses[gone]
            changed = True
        if changed:
            try:
                write_atomically(self._status_path, orjson.dumps(self._statuses))
            except OSError as exc:
                log.warning("drift statuses not saved", extra={"err": str(exc)})

    def _score(self, lv: LoadedVersion) -> bool:
        profile = lv.profile
        assert profile is not None
        found = scores(profile, self.window_counts(lv), self.min_rows, detail=False)
        pair = (lv.name, lv.version)
        if found["status"] == "not_enough_rows":
            self._clear_gauges(pair)  # the window emptied: no figure rather than an old one
            return False
        self._set_gauges(pair, found)
        now = {name: s["status"] for name, s in found["features"].items()}
        if found["prediction"] is not None:
            now[PREDICTION] = found["prediction"]["status"]
        key = _status_key(lv)
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
