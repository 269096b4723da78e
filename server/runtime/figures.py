"""Live figures of every worker: each worker writes a snapshot of its last second to
RUNTIME_DIR every second; readers (``/ws/monitor``, ``/stream/events``, the dashboard)
merge the fresh snapshots of all workers."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger(__name__)

SAMPLE_CAP = 2000  # latencies kept per worker per second (a uniform sample beyond this)
STALE_SECONDS = 3.0


def resident_mb() -> float:
    """This process's resident set size in MB (Linux /proc; 0 when unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


class WorkerFigures:
    """Counts one worker's requests and streams; snapshots them once a second."""

    def __init__(self, runtime_dir: Path, extra: Callable[[], dict[str, Any]]) -> None:
        self.path = runtime_dir / f"metrics-{os.getpid()}.json"
        self.extra = extra
        self.requests = 0
        self.errors = 0
        self.streams = {"started": 0, "completed": 0, "cancelled": 0, "rows": 0}
        self._window: list[float] = []
        self._seen = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last: dict[str, Any] = {}

    def observe(self, latency_ms: float, status: int) -> None:
        with self._lock:
            self.requests += 1
            self.errors += status >= 500
            self._seen += 1
            if len(self._window) < SAMPLE_CAP:
                self._window.append(latency_ms)
            else:  # reservoir sampling keeps the percentiles honest under load
                j = random.randrange(self._seen)
                if j < SAMPLE_CAP:
                    self._window[j] = latency_ms

    def stream(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.streams[key] += n

    def snapshot(self, seconds: float) -> dict[str, Any]:
        with self._lock:
            window, seen = self._window, self._seen
            self._window, self._seen = [], 0
        return {
            "pid": os.getpid(), "ts": time.time(), "rps": round(seen / seconds, 2),
            "latencies_ms": [round(x, 3) for x in window], "requests": self.requests,
            "server_errors": self.errors, "rss_mb": resident_mb(), "streams": dict(self.streams),
            **self.extra(),
        }

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="metrics").start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = time.monotonic() - 1.0
        while True:
            now = time.monotonic()
            try:
                self.last = self.snapshot(now - last)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_bytes(orjson.dumps(self.last))
                tmp.replace(self.path)
            except Exception:  # noqa: BLE001 - figures must never take the worker down
                log.exception("metrics snapshot failed")
            last = now
            if self._stop.wait(1.0):
                return


def summary(runtime_dir: Path) -> dict[str, Any]:
    """All fresh worker snapshots merged: the figures /ws/monitor and the dashboard show."""
    now = time.time()
    snaps = []
    for path in runtime_dir.glob("metrics-*.json"):
        try:
            snap = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if now - snap.get("ts", 0) <= STALE_SECONDS:
            snaps.append(snap)
    latencies = [x for s in snaps for x in s.get("latencies_ms", [])]
    hits = sum(s.get("cache", {}).get("hits", 0) for s in snaps)
    misses = sum(s.get("cache", {}).get("misses", 0) for s in snaps)
    streams: dict[str, int] = {}
    for s in snaps:
        for k, v in s.get("streams", {}).items():
            streams[k] = streams.get(k, 0) + v
    p50 = p99 = None
    if latencies:
        p50, p99 = (round(float(v), 3) for v in np.percentile(latencies, [50, 99]))
    return {
        "ts": now,
        "workers": len(snaps),
        "requests_per_second": round(sum(s.get("rps", 0) for s in snaps), 2),
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "requests_total": sum(s.get("requests", 0) for s in snaps),
        "cache_hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "cache": {"hits": hits, "misses": misses},
        "rss_mb": {str(s["pid"]): s.get("rss_mb") for s in snaps},
        "rss_mb_total": round(sum(s.get("rss_mb", 0) for s in snaps), 1),
        "models_loaded": max((s.get("models_loaded", 0) for s in snaps), default=0),
        "predictions": sum(s.get("predictions", 0) for s in snaps),
        "per_model": _merge_counts(s.get("per_model", {}) for s in snaps),
        "streams": streams,
    }


def _merge_counts(parts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out
