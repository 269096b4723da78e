"""Cache keys and the backends' pure behaviour (the Redis faults run in integration)."""

from __future__ import annotations

import hashlib
import struct
import time
from typing import NamedTuple

import numpy as np
import pytest

from server.serving.cache import (
    MemoryCache,
    NoCache,
    RedisCache,
    make_cache,
    make_redis,
    row_key,
    row_keys,
)
from tests.conftest import free_port


class Artifact(NamedTuple):
    name: str
    version: str
    sha256: str


M1 = Artifact("m", "1", "a" * 64)


@pytest.mark.parametrize("row", [[5.1, 3.5, 1.4, 0.2], [0.0, -0.0, 1e-300, 1e300], [1, 2, 3]])
def test_key_is_md5_of_little_endian_float64(row: list[float]) -> None:
    expected = hashlib.md5(struct.pack(f"<{len(row)}d", *row)).hexdigest()
    assert row_key("m", "3", np.array(row)) == f"pred:m:3:{expected}"
    assert row_keys("m", "3", np.array([row, row]))[1] == f"pred:m:3:{expected}"


def test_big_endian_input_gets_the_same_key() -> None:
    row = [5.1, 3.5]
    assert row_key("m", "1", np.array(row, dtype=">f8")) == row_key("m", "1", np.array(row))


def test_memory_cache_evicts_least_recently_used_and_expires() -> None:
    cache = MemoryCache(max_bytes=2 * MemoryCache.cost("a", b"1"), ttl=0.2)
    cache.set_many({"a": b"1", "b": b"2"}, M1)
    assert cache.get_many(["a"], M1) == [b"1"]  # a is now the most recent
    cache.set_many({"c": b"3"}, M1)
    assert cache.get_many(["a", "b", "c"], M1) == [b"1", None, b"3"]
    time.sleep(0.25)
    assert cache.get_many(["a", "c"], M1) == [None, None]
    assert cache.status()["misses"] == 3


def test_memory_cache_drops_one_version_only() -> None:
    cache = MemoryCache(10_000, 60)
    m10, m2 = M1._replace(version="10"), M1._replace(version="2")
    cache.set_many({"pred:m:1:x": b"1"}, M1)
    cache.set_many({"pred:m:10:x": b"2"}, m10)
    cache.set_many({"pred:m:2:x": b"3"}, m2)
    assert cache.drop_version("m", "1") == 1
    assert cache.get_many(["pred:m:10:x"], m10) == [b"2"]
    assert cache.get_many(["pred:m:2:x"], m2) == [b"3"]


def test_make_cache_picks_the_backend() -> None:
    assert isinstance(make_cache(False, None, "redis://x", 1, 1, 1), NoCache)
    assert isinstance(make_cache(True, None, "", 1, 1, 1), MemoryCache)


def test_dead_redis_is_a_quick_miss_then_skipped_by_the_breaker() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = RedisCache(make_redis(url, 0.2, 4), url, ttl=60, breaker_seconds=30)
    t0 = time.monotonic()
    assert cache.get_many(["a", "b"], M1) == [None, None]
    cache.set_many({"a": b"1"}, M1)
    assert cache.get_many(["a"], M1) == [None]
    assert time.monotonic() - t0 < 1.0
    status = cache.status()
    assert status["state"] == "degraded" and status["breaker"] == "open"
    assert status["errors"] == 1 and status["skipped_lookups"] == 1


def test_memory_cache_is_bounded_in_bytes_and_counts_them() -> None:
    value = b'{"prediction":0,"label":"setosa"}'
    cost = MemoryCache.cost("pred:m:1:" + "0" * 32, value)
    cache = MemoryCache(max_bytes=10 * cost, ttl=60)
    cache.set_many({f"pred:m:1:{i:032d}": value for i in range(25)}, M1)
    assert len(cache) == 10 and cache.bytes == 10 * cost
    assert cache.get_many([f"pred:m:1:{i:032d}" for i in (14, 15, 24)], M1) == \
        [None, value, value]
    cache.set_many({f"pred:m:1:{24:032d}": value}, M1)  # replacing an entry does not count twice
    assert cache.bytes == 10 * cost
    assert cache.drop_version("m", "1") == 10 and cache.bytes == 0
    status = cache.status()
    assert status["max_bytes"] == 10 * cost and status["bytes_per_entry"] is None


def test_memory_cache_serves_a_version_only_to_the_artifact_it_was_synced_for() -> None:
    """A request that resolved v1 before a reload (old artifact) and finishes after it can
    neither read the new artifact's answers nor leave its own for the new one to serve."""
    old, new = M1, M1._replace(sha256="b" * 64)
    cache = MemoryCache(10_000, 60)
    assert cache.sync_versions({("m", "1"): old.sha256}) == []
    cache.set_many({"pred:m:1:x": b"old"}, old)
    assert cache.get_many(["pred:m:1:x"], old) == [b"old"]
    assert cache.sync_versions({("m", "1"): new.sha256}) == [("m", "1")]  # the reload
    assert cache.get_many(["pred:m:1:x"], new) == [None]  # dropped with the change
    cache.set_many({"pred:m:1:x": b"old again"}, old)  # the request in flight finishes
    assert cache.get_many(["pred:m:1:x"], new) == [None]
    cache.set_many({"pred:m:1:x": b"new"}, new)
    assert cache.get_many(["pred:m:1:x"], new) == [b"new"]
    assert cache.get_many(["pred:m:1:x"], old) == [None]
    assert len(cache) == 1


def test_dead_redis_marks_the_versions_unsynced() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = RedisCache(make_redis(url, 0.2, 4), url, ttl=60, breaker_seconds=30)
    assert cache.sync_versions({("m", "1"): M1.sha256}) == []
    assert cache.status()["versions_synced"] is False
    assert cache.sync_versions({("m", "1"): M1.sha256}) == []  # the breaker: not even tried
    assert cache.status()["errors"] == 1
