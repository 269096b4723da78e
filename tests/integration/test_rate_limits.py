"""Rate limits per API key, counted in Redis so every worker shares them; 429 is JSON with
Retry-After; health stays open; Redis down never turns a limit into a 500."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import LiveServer, RedisServer

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]


def test_limit_is_shared_by_workers_and_per_key(
    server_factory: Callable[..., LiveServer], model_repo: Path, redis_server: RedisServer
) -> None:
    server = server_factory(model_repo, REDIS_URL=redis_server.url, RATE_LIMIT="10/minute",
                            API_KEYS="alpha,beta")
    alpha = Counter(server.fresh("POST", "/predict/iris", json=ROW,
                                 headers={"X-API-Key": "alpha"}).status_code for _ in range(25))
    assert alpha == Counter({200: 10, 429: 15})  # exact, though both workers answered
    beta = server.fresh("POST", "/predict/iris", json=ROW, headers={"X-API-Key": "beta"})
    assert beta.status_code == 200
    refused = server.fresh("POST", "/predict/iris", json=ROW, headers={"X-API-Key": "alpha"})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    body = refused.json()
    assert body["code"] == "rate_limited" and body["request_id"]
    assert server.get("/health").status_code == 200 and server.get("/ready").status_code == 200
    # Monitoring never spends the quota: /status answers alpha, over its limit, every time.
    assert all(server.fresh("GET", "/status", headers={"X-API-Key": "alpha"}).status_code == 200
               for _ in range(12))
    assert server.fresh("GET", "/status", headers={"X-API-Key": "wrong"}).status_code == 401
    keys = [str(k) for k in redis_server.client().keys("*LIMIT*")]
    assert keys and not any("alpha" in k for k in keys)  # keys are hashed, never stored


def test_redis_down_serves_without_limits(
    server_factory: Callable[..., LiveServer], model_repo: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url
    redis_server.stop()
    server = server_factory(model_repo, REDIS_URL=url, RATE_LIMIT="2/minute", WORKERS="1")
    codes = Counter(server.post("/predict/iris", json=ROW).status_code for _ in range(5))
    assert 500 not in codes and codes[200] >= 2


def test_made_up_keys_are_no_identity(server_factory: Callable[..., LiveServer],
                                      model_repo: Path) -> None:
    """Without API_KEYS, each new made-up key used to get a fresh counter."""
    server = server_factory(model_repo, RATE_LIMIT="5/minute", WORKERS="1")
    codes = Counter(server.post("/predict/iris", json=ROW,
                                headers={"X-API-Key": f"made-up-{i}"}).status_code
                    for i in range(20))
    assert codes == Counter({200: 5, 429: 15})


def test_a_wrong_key_is_401_and_never_counted(server_factory: Callable[..., LiveServer],
                                              model_repo: Path) -> None:
    server = server_factory(model_repo, RATE_LIMIT="5/minute", WORKERS="1", API_KEYS="alpha")
    wrong = Counter(server.post("/predict/iris", json=ROW,
                                headers={"X-API-Key": f"guess-{i}"}).status_code
                    for i in range(12))
    assert wrong == Counter({401: 12})
    right = Counter(server.post("/predict/iris", json=ROW, headers={"X-API-Key": "alpha"}
                                ).status_code for _ in range(6))
    assert right == Counter({200: 5, 429: 1})


def test_without_a_proxy_a_forged_forwarded_for_is_ignored(
        server_factory: Callable[..., LiveServer], model_repo: Path) -> None:
    server = server_factory(model_repo, RATE_LIMIT="5/minute", WORKERS="1")
    codes = Counter(server.post("/predict/iris", json=ROW,
                                headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                    for i in range(8))
    assert codes == Counter({200: 5, 429: 3})


def test_behind_one_trusted_proxy_clients_are_told_apart(
        server_factory: Callable[..., LiveServer], model_repo: Path) -> None:
    server = server_factory(model_repo, RATE_LIMIT="5/minute", WORKERS="1", TRUSTED_PROXIES="1")
    for client in ("10.0.0.1", "10.0.0.2"):
        codes = Counter(server.post("/predict/iris", json=ROW,
                                    headers={"X-Forwarded-For": client}).status_code
                        for _ in range(6))
        assert codes == Counter({200: 5, 429: 1})
