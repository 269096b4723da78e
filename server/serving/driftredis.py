"""Drift counts between instances: one Redis hash per version, profile and minute,
``drift:<model>:<version>:<profile>:<minute>``, one field per non-zero cell, incremented with
HINCRBY in one pipeline per flush and expiring a while after the window has passed it. Reads
fetch the window's hashes in one pipeline; finished minutes are cached for a minute. Errors
open a breaker, as the cache does; the caller falls back to the files
(``server.serving.driftstore``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import redis

from server.model.profile import Cells

log = logging.getLogger(__name__)

EXPIRE_MARGIN_SECONDS = 600  # a minute's hash outlives the window by this much
CLOSED_CACHE_SECONDS = 60.0  # how long a finished minute read from Redis is reused


class RedisUnavailable(Exception):
    """Redis could not be read or written (or its breaker is open): use the local counts.
    ``maybe_applied``: a write may have reached Redis (a timeout, or a connection lost
    after sending), so sending it again could count it twice."""

    def __init__(self, message: str, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


def _refused(exc: BaseException) -> bool:
    """True when Redis refused the connection: redis-py connects before it writes a byte,
    and raises its ConnectionError from the refusal. Any other failure (a timeout, a
    connection reset or closed mid-reply) may come after Redis applied the commands."""
    seen: BaseException | None = exc
    for _ in range(4):  # the refusal, wrapped once or twice
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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

    def _fail(self, exc: Exception, maybe_applied: bool = False) -> RedisUnavailable:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.available:
            log.warning("drift counts: redis unavailable", extra={"err": self.last_error})
        self._open_until = time.monotonic() + self.breaker_seconds
        return RedisUnavailable(self.last_error, maybe_applied)

    def push(self, deltas: Iterable[tuple[str, list[str], np.ndarray]]) -> None:
        """Add ``(key, cell names, counts)`` into their hashes: one pipeline, no transaction
        (each HINCRBY stands alone). Raises ``RedisUnavailable``, with ``maybe_applied``
        unless the connection was refused (then nothing was sent); nothing is retried
        here."""
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
            raise self._fail(exc, maybe_applied=not _refused(exc)) from exc
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
