"""Shared fixtures: a demo model repository fitted into tmp, real gunicorn and redis-server
processes on free loopback ports, each stopped by PID."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from server.jobs.demo import write_demo

ROOT = Path(__file__).resolve().parent.parent
# An app built in a test process (the Flask test client) logs nothing unless a test asks;
# LiveServer turns the log on, in the test's own directory.
os.environ.setdefault("PREDICTION_LOG", "off")
ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_metrics(server: LiveServer) -> str:
    """``GET /metrics`` once every worker has written what it counted: workers write their
    increments every FLUSH_SECONDS (server.runtime.prometheus), the one answering at once."""
    from server.runtime.prometheus import FLUSH_SECONDS

    time.sleep(2 * FLUSH_SECONDS + 0.1)
    return str(server.get("/metrics").text)


def rss_mb(pid: int) -> float:
    """A process's resident memory, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_until(check: Callable[[], Any], timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (requests.RequestException, OSError) as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout}s (last: {last!r})")


class Process:
    """A child process we started and stop by PID (SIGTERM, then SIGKILL)."""

    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         user=self.user)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LiveServer(Process):
    """``gunicorn -c gunicorn.conf.py wsgi:app`` with gevent workers on a free port."""

    def __init__(self, tmp: Path, model_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "API_KEYS"}}
        full.update({"BIND": f"127.0.0.1:{self.port}", "WORKERS": "2",
                     "MODEL_DIR": str(model_dir), "ADMIN_TOKEN": ADMIN_TOKEN,
                     "RUNTIME_DIR": "", "PYTHONPATH": str(ROOT), "DRAIN_SECONDS": "0",
                     # On, as in production, in the test's own directory (never in data/).
                     "PREDICTION_LOG": f"sqlite:///{tmp / 'predictions.db'}",
                     # Every version cached, so tests of the cache's behaviour do not hang
                     # on a timing at load (CACHE=on's per-version choice has its own tests).
                     "CACHE": "always"})
        full.update(env)
        tmp.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                "--no-control-socket", "wsgi:app"]
        super().__init__(argv, full, tmp / f"gunicorn-{self.port}.log")
        self.session = requests.Session()
        # /status needs a key under API_KEYS: the first one configured.
        keys = [k for k in full.get("API_KEYS", "").split(",") if k.strip()]
        self.key = {"X-API-Key": keys[0].strip()} if keys else {}

    def start(self, wait_ready: bool = True) -> LiveServer:  # type: ignore[override]
        super().start()
        path = "/ready" if wait_ready else "/health"
        workers = int(self.env.get("WORKERS", "1"))
        seen: set[int] = set()

        def every_worker_up() -> bool:
            # Fresh connections spread over the workers (SO_REUSEPORT): wait until each of
            # them has answered, so no worker is still starting while a test measures.
            resp = requests.get(self.url + path, timeout=2, headers={"Connection": "close"})
            if resp.status_code == 200 and path == "/ready":
                status = requests.get(self.url + "/status", timeout=2,
                                      headers={"Connection": "close", **self.key})
                if status.status_code == 200:  # anything else: ask again
                    seen.add(status.json()["pid"])
            return resp.status_code == 200 and (path != "/ready" or len(seen) >= workers)

        def up_or_failed() -> bool:
            # A server that exited (a worker failed to boot) is not waited for 40 s.
            assert self.proc is not None and self.proc.poll() is None, "gunicorn exited"
            return every_worker_up()

        try:
            wait_until(up_or_failed, 40)
        except AssertionError as exc:
            self.stop()
            raise AssertionError("server did not start:\n" + self.log_text()[-4000:]) from exc
        return self

    def stop(self, timeout: float = 15.0, quick: bool = False) -> None:
        """SIGTERM, the graceful stop a test may be about; ``quick`` (a fixture's teardown,
        where nothing is asserted any more): SIGQUIT, gunicorn's immediate shutdown, without
        the second or so a gevent worker takes to notice a SIGTERM (graceful stops have tests
        of their own: test_shutdown.py, test_scaleout.py)."""
        self.session.close()
        if quick and self.proc is not None:
            self.signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
                self.proc = None
            except subprocess.TimeoutExpired:
                pass  # SIGTERM, then SIGKILL, as for any stop
        if self.proc is not None:
            # Responses a finished test left in reference cycles still hold their keep-alive
            # sockets open: a worker stopping gracefully waits KEEPALIVE (5 s) for each such
            # idle client.
            gc.collect()
        super().stop(timeout)

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 10)
        return self.session.request(method, self.url + path, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def fresh(self, method: str, path: str, **kw: Any) -> requests.Response:
        """A request on a new connection (so it may land on any worker)."""
        kw.setdefault("timeout", 10)
        kw.setdefault("headers", {})["Connection"] = "close"
        return requests.request(method, self.url + path, **kw)


def websocket_handshake(url: str) -> requests.Response:
    """A WebSocket opening handshake sent by hand, for tests of a refused one: the server's
    answer (status and JSON body) as it is. simple_websocket's client would leave its socket
    open when refused."""
    # "close" too: a refused handshake's connection is not kept alive for KEEPALIVE seconds.
    headers = {"Upgrade": "websocket", "Connection": "Upgrade, close",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with requests.get(url, headers=headers, timeout=5) as resp:
        resp.content  # noqa: B018 - read the body before the connection closes
        return resp


class RedisServer(Process):
    """A real ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        tmp.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--enable-debug-command", "local", "--dir", str(tmp)]
        super().__init__(argv, dict(os.environ), tmp / f"redis-{self.port}.log")

    def start(self) -> RedisServer:
        super().start()
        wait_until(self.ping, 10)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


class PostgresServer(Process):
    """A real PostgreSQL (Debian's ``postgresql`` package) on a free loopback port: a fresh
    cluster in a temporary directory, fsync off, trust authentication for the loopback."""

    def __init__(self) -> None:
        bindir = _postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: scripts/test installs it with apt")
        self.port = free_port()
        # Its own directory outside pytest's (root-only) tmp tree: the server runs as
        # 'postgres' when the tests run as root.
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
        data = self.dir / "data"
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True,
                       user=self.user, cwd=self.dir)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]
        super().__init__(argv, dict(os.environ), self.dir / "postgres.log")

    def start(self) -> PostgresServer:
        super().start()
        wait_until(self.ping, 30)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.signal(signal.SIGINT)  # "fast" shutdown: SIGTERM waits for clients to leave
        super().stop(timeout)

    def ping(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()
    server.remove()


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository, fitted once per run from sklearn's bundled data sets."""
    root = tmp_path_factory.mktemp("demo") / "models"
    write_demo(root)
    return root


@pytest.fixture
def model_repo(demo_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo repository that a test may change."""
    return Path(shutil.copytree(demo_repo, tmp_path / "models"))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(model_dir: Path, start: bool = True, **env: str) -> LiveServer:
        server = LiveServer(tmp_path / "logs", model_dir, **env)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        server.stop(quick=True)


@pytest.fixture(scope="session")
def live_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One shared server over the demo repository, for tests that change nothing on disk."""
    server = LiveServer(tmp_path_factory.mktemp("live"), demo_repo,
                        MAX_BODY_BYTES="65536", MODEL_POLL_SECONDS="0", CACHE="off").start()
    yield server
    server.stop(quick=True)


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
