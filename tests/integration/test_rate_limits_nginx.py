"""Rate limits through the shipped nginx (deploy/nginx.conf) in front of two instances
sharing one Redis, with TRUSTED_PROXIES=1 as the compose file sets it: two clients get
separate counters, and a client's own X-Forwarded-For does not make it someone else."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LiveServer, RedisServer
from tests.integration.test_scaleout import Nginx, nginx_binary

pytestmark = pytest.mark.slow


@dataclass
class Front:
    nginx: Nginx

    def status(self, source: str, forwarded: str | None = None) -> int:
        """One predict through nginx from the loopback address ``source``."""
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source,
                "--max-time", "10", f"{self.nginx.url}/predict/iris",
                "--json", "[5.1, 3.5, 1.4, 0.2]"]
        if forwarded:
            argv += ["-H", f"X-Forwarded-For: {forwarded}"]
        return int(subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout)


@pytest.fixture(scope="module")
def front(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    nginx_binary()
    tmp = tmp_path_factory.mktemp("limits-nginx")
    redis = RedisServer(tmp / "redis").start()
    env = {"REDIS_URL": redis.url, "RATE_LIMIT": "5/minute", "TRUSTED_PROXIES": "1",
           "WORKERS": "1", "MODEL_POLL_SECONDS": "0"}
    servers = [LiveServer(tmp / name, demo_repo, **env) for name in ("a", "b")]
    nginx = None
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(), servers))
        nginx = Nginx(tmp / "nginx", [f"127.0.0.1:{s.port}" for s in servers]).start()
        yield Front(nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for server in servers:
            server.stop(quick=True)
        redis.stop()


def test_two_clients_through_nginx_get_separate_counters(front: Front) -> None:
    first = Counter(front.status("127.0.0.2") for _ in range(7))
    second = Counter(front.status("127.0.0.3") for _ in range(7))
    assert first == second == Counter({200: 5, 429: 2})


def test_a_forged_forwarded_for_through_nginx_is_still_the_client(front: Front) -> None:
    codes = Counter(front.status("127.0.0.4", forwarded=f"10.9.9.{i}") for i in range(7))
    assert codes == Counter({200: 5, 429: 2})
