"""Where drift counts are shared: files in RUNTIME_DIR between the workers of one server, and
Redis between instances.

Counts are ``Cells`` vectors (``server.model.profile``) per version, profile and minute (the
Unix minute, ``int(time) // 60``, the same on every host).

- ``WorkerFiles``: each worker writes ``drift-<pid>.json`` (the current minute and the totals
  since it started) at most once a second, and ``drift-<pid>.closed.json`` (the finished
  minutes of the window) when a minute ends, so the bigger file is written once a minute
  whatever the window. A reader adds up every worker's files of this server (the gunicorn
  master's id is in each file: those of an earlier run are ignored and removed), preferring
  a minute's closed copy where it meets an open one mid-write.
- ``RedisCounts``: one hash per version, profile and minute,
  ``drift:<model>:<version>:<profile>:<minute>``, one field per non-zero cell, incremented
  with HINCRBY in one pipeline per flush and expiring a while after the window has passed
  it. Reads fetch the window's hashes in one pipeline; finished minutes are cached for a
  minute. Errors open a breaker, as the cache does; the caller falls back to the files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from server.model.profile import Cells

log = logging.getLogger(__name__)

Minutes = dict[int, np.ndarray]
EXPIRE_MARGIN_SECONDS = 600  # a minute's hash outlives the window by this much
CLOSED_CACHE_SECONDS = 60.0  # how long a finished minute read from Redis is reused


class RedisUnavailable(Exception):
    """Redis could not be read or written (or its breaker is open): use the local counts."""


def version_key(model: str, version: str) -> str:
    return f"{model}/{version}"


def server_id() -> str:
    """The gunicorn master (this worker's parent) and when it started: one id per server
    run, also where every run's master has the same pid (PID 1 in a container)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as fh:
            started = fh.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        started = ""
    return f"{ppid}:{started}"


def _vector(raw: Any, size: int) -> np.ndarray | None:
    vec = np.asarray(raw, dtype=np.int64)
    return vec if vec.shape == (size,) else None


# --- between the workers of one server ----------------------------------------------------
class WorkerFiles:
    def __init__(self, runtime_dir: Path, pid: int | None = None) -> None:
        self.dir = Path(runtime_dir)
        self.pid = pid or os.getpid()  # tests give two monitors of one process their own
        self.server = server_id()
        self.open_path = self.dir / f"drift-{self.pid}.json"
        self.closed_path = self.dir / f"drift-{self.pid}.closed.json"
        self._parsed: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def remove_stale(self) -> None:
        """Delete the files an earlier run of the server left in a reused RUNTIME_DIR."""
        for path in self.dir.glob("drift-*.json"):
            if not path.name[len("drift-"):].split(".")[0].isdigit():
                continue  # not a worker's
            doc = self._read(path)
            if doc is not None and doc.get("server") != self.server:
                path.unlink(missing_ok=True)

    def write(self, versions: dict[str, dict[str, Any]], closed: bool) -> None:
        """This worker's files: the open one always, the closed one when ``closed``. The
        closed one goes first, so a reader never misses a minute that moves between them."""
        base = {"pid": self.pid, "server": self.server, "ts": time.time()}
        if closed:
            self._replace(self.closed_path, {**base, "versions": {
                k: {"fp": v["fp"], "minutes": v["closed"]} for k, v in versions.items()}})
        self._replace(self.open_path, {**base, "versions": {
            k: {"fp": v["fp"], "minutes": v["open"], "total": v["total"]}
            for k, v in versions.items()}})

    @staticmethod
    def _replace(path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))
        tmp.replace(path)

    def _read(self, path: Path) -> dict[str, Any] | None:
        """A file's JSON, parsed again only when it changed."""
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            known = self._parsed.get(path)
            if known is not None and known[0] == stamp:
                return known[1]
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(doc, dict):
            return None
        self._parsed[path] = (stamp, doc)
        return doc

    def others(self, key: str, fp: str, size: int, minutes: range
               ) -> tuple[np.ndarray, np.ndarray]:
        """The window (``minutes``) and since-start totals of one version in the other
        workers' files of this server."""
        window = np.zeros(size, dtype=np.int64)
        total = np.zeros(size, dtype=np.int64)
        per_pid: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        paths = sorted(self.dir.glob("drift-*.json"))
        present = set(paths)
        self._parsed = {p: v for p, v in self._parsed.items() if p in present}
        for path in paths:
            pid, _, kind = path.name[len("drift-"):-len(".json")].partition(".")
            if pid == str(self.pid) or kind not in ("", "closed"):
                continue
            doc = self._read(path)
            if doc is None or doc.get("server") != self.server:
                continue
            entry = doc.get("versions", {}).get(key)
            if not isinstance(entry, dict) or entry.get("fp") != fp:
                continue
            found = per_pid.setdefault(pid, {"": {}, "closed": {}})[kind]
            for minute, raw in (entry.get("minutes") or {}).items():
                vec = _vector(raw, size)
                if vec is not None and int(minute) in minutes:
                    found[int(minute)] = vec
            if kind == "":
                vec = _vector(entry.get("total"), size)
                if vec is not None:
                    total += vec
        for parts in per_pid.values():
            # A minute in both files was being moved to the closed one: that copy is final.
            for vec in {**parts[""], **parts["closed"]}.values():
                window += vec
        return window, total


# --- between instances ----------------------------------------------------------------------
class RedisCounts:
    def __init__(self, client: redis.Redis, window_minutes: int, breaker_seconds: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.window_minutes = window_minutes
        self.breaker_seconds = breaker_seconds
        self.clock = clock
        self.expire = window_minutes * 60 + 60 + EXPIRE_MARGIN_SECONDS
        self._open_until = 0.0
        self.errors = 0
        self.last_error: str | None = None
        self._closed: dict[str, tuple[float, np.ndarray]] = {}  # key -> (read at, counts)

    @staticmethod
    def key(model: str, version: str, fp: str, minute: int) -> str:
        return f"drift:{model}:{version}:{fp}:{minute}"

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    def _fail(self, exc: Exception) -> RedisUnavailable:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.available:
            log.warning("drift counts: redis unavailable", extra={"err": self.last_error})
        self._open_until = time.monotonic() + self.breaker_seconds
        return RedisUnavailable(self.last_error)

    def push(self, deltas: Iterable[tuple[str, list[str], np.ndarray]]) -> None:
        """Add ``(key, cell names, counts)`` into their hashes: one pipeline, no transaction
        (each HINCRBY stands alone). Raises ``RedisUnavailable``; nothing is retried here."""
        if not self.available:
            raise RedisUnavailable(self.last_error or "breaker open")
        pipe = self.client.pipeline(transaction=False)
        commands = 0
        for key, names, vec in deltas:
            for i in np.flatnonzero(vec).tolist():
                pipe.hincrby(key, names[i], int(vec[i]))
                commands += 1
            pipe.expire(key, self.expire)
        if not commands:
            return
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise self._fail(exc) from exc
        self._open_until = 0.0

    def window(self, model: str, version: str, fp: str, cells: Cells, minutes: range
               ) -> np.ndarray:
        """The counts of one version over ``minutes``, every instance's."""
        if not self.available:
            raise RedisUnavailable(self.last_error or "breaker open")
        now = time.monotonic()
        current = int(self.clock()) // 60
        total = np.zeros(cells.size, dtype=np.int64)
        wanted: list[tuple[str, bool]] = []
        for minute in minutes:
            key = self.key(model, version, fp, minute)
            cached = self._closed.get(key)
            if cached is not None and now - cached[0] < CLOSED_CACHE_SECONDS:
                total += cached[1]
            else:
                # Other instances flush about once a second: a minute is final well after
                # its end, and only then cached.
                wanted.append((key, minute < current - 1))
        if wanted:
            pipe = self.client.pipeline(transaction=False)
            for key, _ in wanted:
                pipe.hgetall(key)
            try:
                found = pipe.execute()
            except (redis.RedisError, OSError) as exc:
                raise self._fail(exc) from exc
            for (key, final), fields in zip(wanted, found):
                vec = np.zeros(cells.size, dtype=np.int64)
                for name, value in (fields or {}).items():
                    i = cells.index.get(name.decode() if isinstance(name, bytes) else name)
                    if i is not None:
                        vec[i] += int(value)
                total += vec
                if final:
                    self._closed[key] = (now, vec)
        self._closed = {k: v for k, v in self._closed.items() if now - v[0] < CLOSED_CACHE_SECONDS}
        self._open_until = 0.0
        return total

    def status(self) -> dict[str, Any]:
        return {"state": "ok" if self.available else "down", "errors": self.errors,
                "last_error": self.last_error}
