"""The prediction cache: one key per feature row that any client can compute, and three
backends behind one small interface (off, per-worker memory LRU, Redis).

Key: ``pred:<model>:<version>:<md5 of the row as little-endian float64 bytes>``.
Value: the row's result as JSON. Redis faults never fail a prediction: every call is bounded
by socket timeouts, and a circuit breaker skips Redis for a while after a failure.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def row_key(model: str, version: str, row: np.ndarray) -> str:
    """The contract's key for one feature row (already in the model's feature order)."""
    digest = hashlib.md5(np.ascontiguousarray(row, dtype="<f8").tobytes(),
                         usedforsecurity=False).hexdigest()
    return f"pred:{model}:{version}:{digest}"


def row_keys(model: str, version: str, X: np.ndarray) -> list[str]:
    X = np.ascontiguousarray(X, dtype="<f8")
    prefix = f"pred:{model}:{version}:"
    md5 = hashlib.md5
    return [prefix + md5(r.tobytes(), usedforsecurity=False).hexdigest() for r in X]


class PredictionCache(Protocol):
    name: str
    enabled: bool

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def set_many(self, items: dict[str, bytes]) -> None: ...

    def drop_version(self, model: str, version: str) -> int: ...

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        """Drop keys of versions whose artifact differs from the one last recorded."""
        ...

    def status(self) -> dict[str, Any]: ...


class _Counters:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    def count(self, found: list[bytes | None]) -> list[bytes | None]:
        hits = sum(1 for v in found if v is not None)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def figures(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_ratio": round(self.hits / total, 4) if total else None}


class NoCache(_Counters):
    """CACHE=off: every row is a miss, nothing is stored."""

    name = "off"
    enabled = False

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.count([None] * len(keys))

    def set_many(self, items: dict[str, bytes]) -> None:
        return None

    def drop_version(self, model: str, version: str) -> int:
        return 0

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        return []

    def status(self) -> dict[str, Any]:
        return {"enabled": False, "backend": self.name, "state": "off", **self.figures()}


# What one entry costs beyond its key's and value's bytes: the str and bytes object headers
# (~80) and the (expiry, value) tuple, its float and the ordered dict's slot and link (~120,
# measured with tracemalloc on CPython 3.11, 64-bit).
ENTRY_OVERHEAD = 200


class MemoryCache(_Counters):
    """A per-worker LRU bounded in bytes (CACHE_MAX_MB), with the same TTL as Redis. An entry
    is its key and the answer's JSON bytes, nothing else: an iris row with its probabilities
    costs about 370 bytes."""

    name = "memory"
    enabled = True

    def __init__(self, max_bytes: int, ttl: float) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def cost(key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        found: list[bytes | None] = []
        with self._lock:
            for key in keys:
                item = self._data.get(key)
                if item is None or item[0] < now:
                    found.append(None)
                    continue
                self._data.move_to_end(key)
                found.append(item[1])
        return self.count(found)

    def set_many(self, items: dict[str, bytes]) -> None:
        expires = time.monotonic() + self.ttl
        with self._lock:
            for key, value in items.items():
                # orjson's bytes keep the 4 KB buffer they were written into: an exact copy
                # is what made a cached row cost ~370 bytes instead of ~4.4 KB.
                value = bytes(memoryview(value))
                old = self._data.get(key)
                if old is not None:
                    self.bytes -= self.cost(key, old[1])
                self._data[key] = (expires, value)
                self._data.move_to_end(key)
                self.bytes += self.cost(key, value)
            while self.bytes > self.max_bytes and self._data:
                key, (_, value) = self._data.popitem(last=False)
                self.bytes -= self.cost(key, value)

    def drop_version(self, model: str, version: str) -> int:
        prefix = f"pred:{model}:{version}:"
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for key in doomed:
                self.bytes -= self.cost(key, self._data.pop(key)[1])
        return len(doomed)

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        return []  # a worker's memory starts empty: nothing older than its models

    def __len__(self) -> int:
        return len(self._data)

    def status(self) -> dict[str, Any]:
        entries = len(self)
        return {"enabled": True, "backend": self.name, "state": "ok", "entries": entries,
                "bytes": self.bytes, "max_bytes": self.max_bytes,
                "bytes_per_entry": round(self.bytes / entries) if entries else None,
                "scope": "this worker", **self.figures()}


class RedisCache(_Counters):
    """Redis behind a circuit breaker. One blocking pool per worker process."""

    name = "redis"
    enabled = True

    def __init__(self, client: redis.Redis, url: str, ttl: int, breaker_seconds: float) -> None:
        super().__init__()
        self.ttl = ttl
        self.breaker_seconds = breaker_seconds
        self.client = client
        parts = urlsplit(url)
        self.where = f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        self.healthy = True
        self._open_until = 0.0
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.skipped = 0
        self.pool_busy = 0

    # -- breaker -------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def _fail(self, exc: Exception, trip: bool = True) -> None:
        if self._pool_busy(exc):
            # Every connection of this worker stayed in use for the whole wait (a CPU-bound
            # worker, not a Redis fault): skip the cache for this request only.
            self.pool_busy += 1
            return
        self.errors += 1
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        self.last_error_at = time.time()
        if trip:
            self._open_until = time.monotonic() + self.breaker_seconds
        log.warning("redis cache degraded", extra={"err": self.last_error, "breaker": trip})

    def _recovered(self) -> None:
        self.healthy = True
        self._open_until = 0.0

    @staticmethod
    def _pool_busy(exc: Exception) -> bool:
        # Every connection of this worker is in use: Redis itself is fine, skip this once.
        return isinstance(exc, redis.ConnectionError) and "No connection available" in str(exc)

    # -- interface -----------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.open or not keys:
            self.skipped += bool(keys)
            return self.count([None] * len(keys))
        try:
            found = self.client.mget(keys)
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)
            return self.count([None] * len(keys))
        self._recovered()
        # decode_responses is off: values are bytes (or None).
        return self.count([v if v is None or isinstance(v, bytes) else v.encode()
                           for v in found])

    def set_many(self, items: dict[str, bytes]) -> None:
        if self.open or not items:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.execute_command("SETEX", key, self.ttl, value)
            pipe.execute()
        except redis.ResponseError as exc:  # e.g. OOM with maxmemory: reads still work
            self._fail(exc, trip=False)
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)

    def drop_version(self, model: str, version: str) -> int:
        if self.open:
            return 0
        dropped = 0
        try:
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=f"pred:{model}:{version}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    dropped += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                dropped += int(self.client.unlink(*batch))
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)
        return dropped

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        """Compare each version's sha256 with the one Redis recorded (another worker, host
        or an earlier run may have cached answers of a different artifact) and drop the
        keys of any that differ."""
        if self.open or not shas:
            return []
        names = [f"predsha:{m}:{v}" for m, v in shas]
        try:
            recorded = self.client.mget(names)
            stale = [mv for mv, old in zip(shas, recorded)
                     if old is not None and _text(old) != shas[mv]]
            for model, version in stale:
                self.drop_version(model, version)
            self.client.mset({n: sha for n, sha in zip(names, shas.values())})
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)
            return []
        return stale

    def status(self) -> dict[str, Any]:
        degraded = self.open or not self.healthy
        return {
            "enabled": True, "backend": self.name, "state": "degraded" if degraded else "ok",
            "breaker": "open" if self.open else "closed",
            "redis": self.where,
            "errors": self.errors, "skipped_lookups": self.skipped,
            "pool_waits_timed_out": self.pool_busy,
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "ttl": self.ttl, **self.figures(),
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def make_redis(url: str, timeout: float, pool_size: int) -> redis.Redis:
    """One client per worker process over a blocking pool: when every connection is busy a
    caller waits up to ``timeout`` instead of failing. No retries: a retry multiplies the
    bounded wait that a dead Redis costs each request."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)


def make_cache(enabled: bool, client: redis.Redis | None, redis_url: str, ttl: int,
               max_bytes: int, breaker_seconds: float) -> PredictionCache:
    if not enabled:
        return NoCache()
    if client is not None:
        return RedisCache(client, redis_url, ttl, breaker_seconds)
    return MemoryCache(max_bytes, ttl)
