"""The prediction cache: one key per feature row that any client can compute, and three
backends behind one small interface (off, per-worker memory LRU, Redis).

Key: ``pred:<model>:<version>:<md5 of the row as little-endian float64 bytes>``.
Value: the row's result as JSON. Redis faults never fail a prediction: every call is bounded
by socket timeouts, and a circuit breaker skips Redis for a while after a failure.

The key names a version, not the artifact behind it, so each backend also records which
artifact (its sha256) a version's keys belong to, and serves and stores a version's rows only
for that artifact: an answer computed by another artifact is never a hit, whatever a reload,
a sibling worker, another host or a Redis outage did in between.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
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


def record_key(model: str, version: str) -> str:
    """Where Redis records the sha256 of the artifact that a version's keys belong to."""
    return f"predsha:{model}:{version}"


class Artifact(Protocol):
    """What computed the rows of one call (a ``LoadedVersion`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def sha256(self) -> str: ...


class PredictionCache(Protocol):
    name: str
    enabled: bool

    def get_many(self, keys: Sequence[str], artifact: Artifact) -> list[bytes | None]:
        """The values of ``keys`` (rows of ``artifact``'s version); all None unless the cache
        records ``artifact`` as the one whose answers that version's keys hold."""
        ...

    def set_many(self, items: dict[str, bytes], artifact: Artifact) -> None:
        """Store rows of ``artifact``'s version, unless another artifact owns its keys."""
        ...

    def drop_version(self, model: str, version: str) -> int: ...

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        """Record each loaded version's artifact sha256 as the owner of its keys, dropping
        the keys of versions whose recorded artifact differs; returns those versions."""
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

    def get_many(self, keys: Sequence[str], artifact: Artifact) -> list[bytes | None]:
        return self.count([None] * len(keys))

    def set_many(self, items: dict[str, bytes], artifact: Artifact) -> None:
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
    costs about 370 bytes. Each version's entries belong to one artifact (``_owners``, set
    by ``sync_versions`` after each reload): a request still holding the version it resolved
    before a reload neither reads nor writes the new artifact's entries."""

    name = "memory"
    enabled = True

    def __init__(self, max_bytes: int, ttl: float) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._owners: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def cost(key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def get_many(self, keys: Sequence[str], artifact: Artifact) -> list[bytes | None]:
        now = time.monotonic()
        found: list[bytes | None] = []
        with self._lock:
            if self._owners.get((artifact.name, artifact.version)) != artifact.sha256:
                return self.count([None] * len(keys))
            for key in keys:
                item = self._data.get(key)
                if item is None or item[0] < now:
                    found.append(None)
                    continue
                self._data.move_to_end(key)
                found.append(item[1])
        return self.count(found)

    def set_many(self, items: dict[str, bytes], artifact: Artifact) -> None:
        expires = time.monotonic() + self.ttl
        with self._lock:
            # A version never synced (a cache used without a registry) belongs to its first
            # writer; this worker's memory holds nothing older than that.
            owner = self._owners.setdefault((artifact.name, artifact.version), artifact.sha256)
            if owner != artifact.sha256:
                return
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
        with self._lock:
            return self._drop(model, version)

    def _drop(self, model: str, version: str) -> int:
        prefix = f"pred:{model}:{version}:"
        doomed = [k for k in self._data if k.startswith(prefix)]
        for key in doomed:
            self.bytes -= self.cost(key, self._data.pop(key)[1])
        return len(doomed)

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        with self._lock:  # owner and entries change together: no reader sees one alone
            stale = [mv for mv, sha in shas.items() if self._owners.get(mv, sha) != sha]
            for model, version in stale:
                self._drop(model, version)
            self._owners.update(shas)
        return stale

    def __len__(self) -> int:
        return len(self._data)

    def status(self) -> dict[str, Any]:
        entries = len(self)
        return {"enabled": True, "backend": self.name, "state": "ok", "entries": entries,
                "bytes": self.bytes, "max_bytes": self.max_bytes,
                "bytes_per_entry": round(self.bytes / entries) if entries else None,
                "scope": "this worker", **self.figures()}


# A version's record while a sync drops its keys is that sync's own token, no artifact's
# sha256: meanwhile every reader misses and every writer is refused. The token expires, so
# if the worker dropping dies the next lookup finds no record and syncs again.
DROPPING_SECONDS = 60
STORE_CHUNK = 1000  # rows per store script: Redis runs nothing else while one runs
RESYNC_MIN_SECONDS = 1.0

# Stores rows only while Redis records the writer's artifact as the version's: checked and
# written in one step, so a worker still on an older artifact (a sibling not yet reloaded,
# a request in flight across a reload, another host) cannot put its answers back after the
# new artifact's sync dropped them.
# KEYS: the version's record, then the rows' keys; ARGV: sha256, TTL, then the values.
STORE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
for i = 2, #KEYS do redis.call('SETEX', KEYS[i], ARGV[2], ARGV[i + 1]) end
return #KEYS - 1
"""
# Records each version's sha256 only if the record still holds this sync's token: a sync
# that started dropping after this one did (and so may not have finished) claims instead.
# KEYS: the records; ARGV: the token, then the sha256 of each.
CLAIM = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('SET', KEYS[i], ARGV[i + 1]) end
end
return 0
"""


class RedisCache(_Counters):
    """Redis behind a circuit breaker. One blocking pool per worker process.

    ``predsha:<model>:<version>`` records the sha256 of the artifact a version's keys belong
    to. A lookup reads it in the same MGET as the rows and serves them only if it names the
    caller's artifact; a store checks it in the same script that writes. ``sync_versions``
    (at start and after each reload) claims the records of this worker's versions: one that
    names another artifact, or none, is set to a token, the version's keys are dropped, and
    the token is swapped for the sha256. A sync that Redis missed (breaker open, timeout)
    runs again in the background on the first successful call after the failure, as does
    one for a record found missing (Redis restarted, flushed, or a dropping worker died)."""

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
        self.mismatches = 0  # rows refused: Redis recorded another artifact for the version
        self._store = client.register_script(STORE)
        self._claim = client.register_script(CLAIM)
        self._shas: dict[tuple[str, str], str] = {}  # this worker's versions, as last synced
        self._unsynced = False  # Redis may not record them: sync again once it answers
        self._syncing = False
        self._next_resync = 0.0
        self._sync_lock = threading.Lock()

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
            # Whatever this worker recorded or dropped meanwhile may not have reached Redis.
            self._unsynced = True
        log.warning("redis cache degraded", extra={"err": self.last_error, "breaker": trip})

    def _recovered(self) -> None:
        self.healthy = True
        self._open_until = 0.0
        if self._unsynced:
            self._resync_soon()

    @staticmethod
    def _pool_busy(exc: Exception) -> bool:
        # Every connection of this worker is in use: Redis itself is fine, skip this once.
        return isinstance(exc, redis.ConnectionError) and "No connection available" in str(exc)

    # -- interface -----------------------------------------------------------------------
    def get_many(self, keys: Sequence[str], artifact: Artifact) -> list[bytes | None]:
        if self.open or not keys:
            self.skipped += bool(keys)
            return self.count([None] * len(keys))
        try:
            found = self.client.mget([*keys, record_key(artifact.name, artifact.version)])
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)
            return self.count([None] * len(keys))
        self._recovered()
        owner = found.pop()
        if owner is None or _text(owner) != artifact.sha256:
            self.mismatches += len(keys)
            if owner is None and self._shas.get((artifact.name, artifact.version)) == \
                    artifact.sha256:
                self._unsynced = True  # Redis lost the record (restarted, flushed, evicted)
                self._resync_soon()
            return self.count([None] * len(keys))
        # decode_responses is off: values are bytes (or None).
        return self.count([v if v is None or isinstance(v, bytes) else v.encode()
                           for v in found])

    def set_many(self, items: dict[str, bytes], artifact: Artifact) -> None:
        if self.open or not items:
            return
        record = record_key(artifact.name, artifact.version)
        keys = list(items)
        try:
            for start in range(0, len(keys), STORE_CHUNK):
                chunk = keys[start:start + STORE_CHUNK]
                values = [items[k] for k in chunk]
                stored = self._store(keys=[record, *chunk],
                                     args=[artifact.sha256, self.ttl, *values])
                if int(stored) < 0:
                    self.mismatches += len(keys) - start
                    return
        except redis.ResponseError as exc:  # e.g. OOM with maxmemory: reads still work
            self._fail(exc, trip=False)
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)

    def drop_version(self, model: str, version: str) -> int:
        if self.open:
            return 0
        try:
            return self._unlink_version(model, version)
        except (redis.RedisError, OSError) as exc:
            self._fail(exc)
            return 0

    def _unlink_version(self, model: str, version: str) -> int:
        dropped = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"pred:{model}:{version}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                dropped += int(self.client.unlink(*batch))
                batch = []
        if batch:
            dropped += int(self.client.unlink(*batch))
        return dropped

    def sync_versions(self, shas: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        """Compare each version's sha256 with the one Redis recorded (another worker, host
        or an earlier run may have cached answers of a different artifact), drop the keys
        of any that differ or have no record, and record this worker's; returns those.
        Remembered, so a sync that Redis misses runs again once it answers."""
        self._shas = dict(shas)
        return self._sync()

    def _sync(self) -> list[tuple[str, str]]:
        with self._sync_lock:
            shas = self._shas  # the newest, even for a resync queued behind a reload's sync
            if self.open:
                self._unsynced = True
                return []
            names = [record_key(m, v) for m, v in shas]
            try:
                recorded = self.client.mget(names) if names else []
                # No record: no telling whose answers the keys hold (Redis lost it).
                stale = [mv for mv, old in zip(shas, recorded)
                         if old is None or _text(old) != shas[mv]]
                dropped = 0
                if stale:
                    # Owned by no artifact while dropped: a reader sees the token or the new
                    # sha256, never the new sha256 next to keys of the old artifact.
                    token = f"dropping:{uuid.uuid4().hex}"
                    marks = self.client.pipeline(transaction=False)
                    for mv in stale:
                        marks.set(record_key(*mv), token, ex=DROPPING_SECONDS)
                    marks.execute()
                    dropped = sum(self._unlink_version(m, v) for m, v in stale)
                    self._claim(keys=[record_key(*mv) for mv in stale],
                                args=[token, *(shas[mv] for mv in stale)])
            except (redis.RedisError, OSError) as exc:
                self._fail(exc)
                self._unsynced = True
                return []
            self._unsynced = False
            if dropped:
                log.info("cached answers of other artifacts dropped",
                         extra={"versions": [f"{m}/{v}" for m, v in stale], "keys": dropped})
            return stale

    def _resync_soon(self) -> None:
        """Sync again off the request path (a greenlet under gevent), one at a time."""
        now = time.monotonic()
        if self._syncing or now < self._next_resync:
            return
        self._syncing = True
        self._next_resync = now + RESYNC_MIN_SECONDS
        threading.Thread(target=self._resync, name="cache-resync", daemon=True).start()

    def _resync(self) -> None:
        try:
            self._sync()
        except Exception:  # noqa: BLE001 - a failed resync is retried after the next success
            log.exception("cache resync failed")
        finally:
            self._syncing = False

    def status(self) -> dict[str, Any]:
        degraded = self.open or not self.healthy
        return {
            "enabled": True, "backend": self.name, "state": "degraded" if degraded else "ok",
            "breaker": "open" if self.open else "closed",
            "redis": self.where,
            "errors": self.errors, "skipped_lookups": self.skipped,
            "pool_waits_timed_out": self.pool_busy,
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "artifact_mismatches": self.mismatches, "versions_synced": not self._unsynced,
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
