"""MODEL_MEMORY_MB: a per-worker budget for loaded versions.

Under a budget a scan loads nothing new: a version is recorded as ``UNLOADED`` (its artifact
hashed, not deserialized) and loads on its first request. The load runs in a native thread
(``server.runtime.offload.Background``), so under gevent the worker's other requests go on
while it unpickles (sharing the GIL with it); requests for the same version wait for that one
load, each at most MODEL_LOAD_WAIT_SECONDS (then 503 ``version_loading`` + Retry-After; the
load goes on and the next request finds it done). After a load, the least recently used
versions are unloaded until the loaded ones fit, except those named by a label or an
experiment and the one just loaded: a single version larger than the budget still serves.

A version's size is its estimator's pickle size (``server.model.formats.memory_bytes``): the
bytes of every array plus the objects around them, whatever format it was loaded from.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.model.repository import Stamp, VersionOnDisk
from server.runtime import prometheus
from server.runtime.offload import Background

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model, version)


@dataclass(frozen=True)
class UnloadedVersion:
    """A version found on disk, not in memory: it loads on its first request."""

    found: VersionOnDisk
    sha256: str
    memory_bytes: int | None  # as measured when it was last loaded; None before
    budget: MemoryBudget = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.found.name

    @property
    def version(self) -> str:
        return self.found.version

    @property
    def stamp(self) -> Stamp:
        return self.found.stamp

    def describe(self) -> dict[str, Any]:
        loading = self.budget.is_loading((self.name, self.version))
        return {"version": self.version, "state": "LOADING" if loading else "UNLOADED",
                "loaded": False, "sha256": self.sha256,
                "memory_mb": mb(self.memory_bytes) if self.memory_bytes is not None else None}


def mb(n: int) -> float:
    return round(n / 1_000_000, 3)


class MemoryBudget:
    """The bookkeeping of one worker's budget: when each version was last used, the loads in
    flight, and the counts /status shows. The registry owns the models and the swaps."""

    def __init__(self, limit_mb: float, wait_seconds: float) -> None:
        self.limit_bytes = int(limit_mb * 1_000_000)
        self.wait_seconds = wait_seconds
        # Versions an experiment names (model, version or label): never unloaded. Set by
        # create_app (experiments live above this layer).
        self.pinned: Callable[[], set[Key]] = set
        self._tick = itertools.count()
        self._used: dict[Key, int] = {}
        self._loads: dict[Key, tuple[Stamp, Background]] = {}
        self._lock = threading.Lock()
        self.loads = 0
        self.unloads = 0
        self.load_seconds = 0.0

    def touch(self, key: Key) -> None:
        self._used[key] = next(self._tick)

    def last_used(self, key: Key) -> int:
        return self._used.get(key, -1)

    def is_loading(self, key: Key) -> bool:
        return key in self._loads

    def start(self, key: Key, stamp: Stamp, load: Callable[[], Any]) -> Background:
        """The load of ``key`` at ``stamp`` in flight, started now unless one already is."""
        with self._lock:
            running = self._loads.get(key)
            if running is not None and running[0] == stamp:
                return running[1]

            def timed() -> tuple[Any, float]:
                began = time.perf_counter()
                return load(), time.perf_counter() - began

            task = Background(timed)
            self._loads[key] = (stamp, task)
            self.loads += 1
            return task

    def finish(self, key: Key, task: Background) -> Any:
        """What the finished ``task`` loaded; counted once, by the first request to ask."""
        outcome, seconds = task.result()
        with self._lock:
            first = self._loads.get(key, (None, None))[1] is task
            if first:
                del self._loads[key]
        if first:  # in the worker's own thread: the metrics' locks are the event loop's
            self.load_seconds += seconds
            prometheus.MODEL_LOAD_TIME.observe(seconds)
            prometheus.MODEL_LOADS.labels(key[0]).inc()
            if getattr(outcome, "error", None) is not None:  # a FailedVersion
                prometheus.LOAD_FAILURES.labels(key[0]).inc()
        return outcome

    def unloaded(self, key: Key) -> None:
        self.unloads += 1
        prometheus.MODEL_UNLOADS.labels(key[0]).inc()

    def forget(self, key: Key) -> None:
        self._used.pop(key, None)

    def status(self, loaded: dict[Key, int]) -> dict[str, Any]:
        return {"budget_mb": mb(self.limit_bytes), "loaded_mb": mb(sum(loaded.values())),
                "loaded_versions": len(loaded), "loading": len(self._loads),
                "loads": self.loads, "unloads": self.unloads,
                "load_seconds": round(self.load_seconds, 3)}

    def victims(self, loaded: dict[Key, int], keep: set[Key]) -> list[Key]:
        """The least recently used loaded versions outside ``keep`` to unload so that the
        rest fit the budget (as many as that takes, or every candidate)."""
        excess = sum(loaded.values()) - self.limit_bytes
        out: list[Key] = []
        for key in sorted((k for k in loaded if k not in keep), key=self.last_used):
            if excess <= 0:
                break
            out.append(key)
            excess -= loaded[key]
        return out
