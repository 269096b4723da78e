"""CACHE=on's per-version choice (server.serving.cachepolicy): a version goes through the
cache only when its one-row call, timed at load, costs more than caching a row measured on
the configured backend; ``always`` and ``off`` decide for every version."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from server.config import Settings
from server.model.loaded import LoadedVersion
from server.model.registry import ModelRegistry
from server.serving.cache import MemoryCache, NoCache, RedisCache, make_redis
from server.serving.cachepolicy import ASSUMED_REDIS_US, cache_mode, row_cost_us
from tests.conftest import RedisServer, free_port


@pytest.fixture
def lv(registry: ModelRegistry) -> LoadedVersion:
    return registry.resolve("iris", "1")


def redis_cache(url: str) -> RedisCache:
    return RedisCache(make_redis(url, 0.2, 4), url, ttl=60, breaker_seconds=30)


def test_the_load_probe_times_a_one_row_call(lv: LoadedVersion) -> None:
    assert lv.row_us is not None and 0 < lv.row_us < 1_000_000


@pytest.mark.parametrize(("value", "policy"), [
    ("on", "on"), ("ON ", "on"), ("always", "always"), ("off", "off"), ("0", "off"),
    ("auto", "on"),
])
def test_the_setting_names_a_policy(value: str, policy: str) -> None:
    assert Settings(cache=value).cache_policy == policy


def test_no_cache_and_always_decide_without_timing(lv: LoadedVersion) -> None:
    assert cache_mode(lv, NoCache(), "off").cache == "off"
    cheap = replace(lv, row_us=0.001)
    chosen = cache_mode(cheap, MemoryCache(1 << 20, 60), "always")
    assert (chosen.cache, chosen.cache_note) == ("on", "CACHE=always: every version is cached")


def test_memory_cache_is_used_only_by_versions_dearer_than_a_cached_row(
        lv: LoadedVersion) -> None:
    cache = MemoryCache(1 << 20, 60)
    cost, how = row_cost_us(cache, lv)
    assert 0 < cost < 10_000 and how == "measured on the memory cache"
    cheap = cache_mode(replace(lv, row_us=0.001), cache, "on")
    dear = cache_mode(replace(lv, row_us=1e9), cache, "on")
    assert cheap.cache == "off" and "computing is cheaper" in (cheap.cache_note or "")
    assert dear.cache == "on" and "a one-row call costs 1000000000 us" in (dear.cache_note or "")
    # The probe used a cache of its own: the real one holds nothing and counted nothing.
    assert cache.status()["entries"] == 0 and cache.hits == cache.misses == 0


def test_an_untimed_version_keeps_the_cache(lv: LoadedVersion) -> None:
    chosen = cache_mode(replace(lv, row_us=None), MemoryCache(1 << 20, 60), "on")
    assert chosen.cache == "on" and "could not be timed" in (chosen.cache_note or "")


@pytest.mark.slow
def test_redis_round_trips_are_measured(lv: LoadedVersion, redis_server: RedisServer) -> None:
    cache = redis_cache(redis_server.url)
    try:
        cost, how = row_cost_us(cache, lv)
        assert how == "measured on Redis" and 0 < cost < 1_000_000
        assert cache.hits == cache.misses == 0  # raw round trips, not counted lookups
        keys = redis.Redis.from_url(redis_server.url).keys("*")
        assert keys == []  # nothing written
    finally:
        cache.client.close()


def test_unreachable_redis_is_assumed_a_loopback_round_trip(lv: LoadedVersion) -> None:
    cache = redis_cache(f"redis://127.0.0.1:{free_port()}/0")
    try:
        cost, how = row_cost_us(cache, lv)
    finally:
        cache.client.close()
    assert cost == 2 * ASSUMED_REDIS_US and "unreachable" in how
    assert cache_mode(replace(lv, row_us=1.0), cache, "on").cache == "off"
