"""Scale-out: two gunicorn instances sharing one redis-server, behind a real nginx running
deploy/nginx.conf (only its TEST-SWAPPED addresses changed). An instance killed or stopped
under load costs no request nginx can retry, the cache and A/B arms are shared across
instances, SSE and WebSockets pass through unbuffered."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import sseclient
import yaml
from simple_websocket import Client
from sklearn import datasets

from tests.conftest import ROOT, LiveServer, Process, RedisServer, free_port, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
COMPOSE = ROOT / "docker-compose.yml"
IRIS = datasets.load_iris().data
USERS = [f"scale-user-{i}" for i in range(60)]


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail("nginx is not installed: `apt-get install nginx` (scripts/test does it); "
                    "the scale-out test runs a real nginx", pytrace=False)
    return found


def render_nginx_conf(source: str, port: int, upstreams: list[str], temp: Path) -> str:
    """deploy/nginx.conf with the lines marked TEST-SWAPPED pointed at loopback ports and
    nginx's temp files kept in ``temp``; every other line is used as committed."""
    lines = source.splitlines()
    swapped = [i for i, line in enumerate(lines) if "# TEST-SWAPPED" in line]
    servers = [i for i in swapped if lines[i].lstrip().startswith("server ")]
    listens = [i for i in swapped if lines[i].lstrip().startswith("listen ")]
    assert len(servers) == len(upstreams) and len(listens) == 1, "deploy/nginx.conf changed shape"
    for i, address in zip(servers, upstreams):
        lines[i] = re.sub(r"server\s+\S+", f"server {address}", lines[i], count=1)
    lines[listens[0]] = re.sub(r"listen\s+[^;]+", f"listen 127.0.0.1:{port}", lines[listens[0]])
    http = [i for i, line in enumerate(lines) if line.strip() == "http {"]
    assert len(http) == 1, "deploy/nginx.conf changed shape"
    lines.insert(http[0] + 1, " ".join(
        f"{kind}_temp_path {temp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")))
    return "\n".join(lines) + "\n"


class Nginx(Process):
    """nginx in the foreground on a free loopback port; access log (JSON) and error log go
    to ``log``."""

    def __init__(self, tmp: Path, upstreams: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        temp = tmp / "temp"
        temp.mkdir(exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(render_nginx_conf(NGINX_CONF.read_text(), self.port, upstreams, temp))
        directives = f"daemon off; pid {tmp / 'nginx.pid'}; error_log stderr warn;"
        if os.geteuid() == 0:
            # Started as root, nginx's workers would drop to `nobody`, who may not enter
            # pytest's private tmp directory (its temp files live there): keep them as we are.
            directives += " user root;"
        argv = [nginx_binary(), "-p", f"{tmp}/", "-c", str(conf), "-g", directives]
        super().__init__(argv, dict(os.environ), tmp / "nginx.log")

    def start(self) -> Nginx:
        super().start()
        try:
            wait_until(lambda: requests.get(self.url + "/nginx-health", timeout=2).ok, 10)
        except AssertionError as exc:
            self.stop()
            raise AssertionError("nginx did not start:\n" + self.log_text()[-4000:]) from exc
        return self

    def access_log(self) -> dict[str, dict[str, Any]]:
        """The access log's JSON lines by request id."""
        entries = {}
        for line in self.log_text().splitlines():
            if line.startswith('{"time"'):
                entry = json.loads(line)
                entries[entry["request_id"]] = entry
        return entries


@dataclass
class Cluster:
    redis: RedisServer
    instances: dict[str, LiveServer]  # by "127.0.0.1:port", as nginx logs them
    nginx: Nginx
    pool: ThreadPoolExecutor
    restarting: list[Future[LiveServer]] = field(default_factory=list)

    def restart(self, server: LiveServer) -> None:
        """Start a stopped instance again on its port, in the background."""
        if server.proc is not None:
            server.proc.wait(20)
        self.restarting.append(self.pool.submit(server.start))

    def ensure_whole(self) -> None:
        """Restart what an earlier test stopped, then reload nginx (its new workers forget
        the failure marks) and wait until nginx sends traffic to every instance."""
        for server in self.instances.values():
            if server.proc is None or server.proc.poll() is not None:
                self.restart(server)
        if not self.restarting:
            return
        for future in self.restarting:
            future.result()
        self.restarting.clear()
        self.nginx.signal(signal.SIGHUP)
        seen: set[str] = set()

        def every_instance_answers() -> bool:
            rid = f"probe-{time.monotonic_ns()}"
            requests.get(self.nginx.url + "/health", headers={"X-Request-ID": rid}, timeout=5)
            entry = self.nginx.access_log().get(rid)
            if entry and entry["status"] == 200:
                seen.add(entry["upstream_addr"].split(", ")[-1])
            return seen == set(self.instances)

        wait_until(every_instance_answers, 15, 0.02)


def quick_stop(server: LiveServer) -> None:
    """SIGQUIT: gunicorn's immediate shutdown (no drain); graceful stops are tested above."""
    server.signal(signal.SIGQUIT)
    if server.proc is not None:
        server.proc.wait(15)
    server.stop()


@pytest.fixture(scope="module")
def cluster(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nginx_binary()
    tmp = tmp_path_factory.mktemp("scaleout")
    redis_server = RedisServer(tmp / "redis").start()
    # One worker per instance: what is under test is the spread over instances (each worker's
    # share within an instance is test_experiments' and test_metrics' business).
    env = {"REDIS_URL": redis_server.url, "CACHE": "always", "MODEL_POLL_SECONDS": "0",
           "WORKERS": "1", "DRAIN_SECONDS": "1", "STREAM_CHUNK_ROWS": "100"}
    servers = [LiveServer(tmp / name, demo_repo, **env) for name in ("a", "b")]
    nginx: Nginx | None = None
    with ThreadPoolExecutor(2) as pool:
        try:
            list(pool.map(lambda s: s.start(), servers))
            instances = {f"127.0.0.1:{s.port}": s for s in servers}
            nginx = Nginx(tmp / "nginx", list(instances)).start()
            cluster = Cluster(redis_server, instances, nginx, pool)
            yield cluster
            for future in cluster.restarting:
                future.exception()  # let a restart still under way finish before stopping
        finally:
            if nginx is not None:
                nginx.stop()
            list(pool.map(quick_stop, servers))
            redis_server.stop()


@pytest.fixture
def whole(cluster: Cluster) -> Cluster:
    cluster.ensure_whole()
    return cluster


def predict(url: str, row: list[float], **kw: Any) -> requests.Response:
    return requests.post(url + "/predict/iris", json={"features": row}, timeout=10, **kw)


ANSWER_KEYS = ("model", "version", "prediction", "label", "confidence", "probabilities")


def test_compose_file_and_nginx_config_agree() -> None:
    """What can't run here (no Docker engine) is at least read: the compose file loads, nginx
    proxies to its instances, and the limits on both sides match."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    conf = NGINX_CONF.read_text()
    upstreams = re.findall(r"^\s*server\s+(\S+?):(\d+)\b.*# TEST-SWAPPED$", conf, re.M)
    apps = [name for name, svc in services.items() if svc.get("build") == "."]
    assert sorted(name for name, _ in upstreams) == sorted(apps) and len(apps) >= 2
    for name in apps:
        svc = services[name]
        assert svc == services[apps[0]]  # every instance takes the same settings
        # Redis healthy first (and the jobs volume given to the server's user)
        assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert "/ready" in " ".join(svc["healthcheck"]["test"])
        env = svc["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert int(env["MAX_BODY_BYTES"]) == 8 * 2**20  # client_max_body_size 8m
        upstream_idle = re.search(r"keepalive_timeout (\d+)s;", conf)
        assert upstream_idle and int(env["KEEPALIVE"]) > int(upstream_idle[1])
    assert {port for _, port in upstreams} == {"8000"}
    assert re.search(r"^\s*client_max_body_size 8m;", conf, re.M)
    nginx = services["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["depends_on"] == {a: {"condition": "service_healthy"} for a in apps}
    assert "healthcheck" in services["redis"] and "healthcheck" in nginx


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["a-then-b", "b-then-a"])
def test_a_row_predicted_on_one_instance_is_a_cache_hit_on_the_other(
    whole: Cluster, order: tuple[int, int]
) -> None:
    first, second = (list(whole.instances.values())[i] for i in order)
    row = [5.0 + order[0] / 1000, 3.3, 1.4, 0.2]  # a row of its own per case
    miss = predict(first.url, row)
    assert miss.headers["X-Cache"] == "MISS" and miss.json()["cached"] is False
    hit = predict(second.url, row)
    assert hit.headers["X-Cache"] == "HIT" and hit.json()["cached"] is True
    assert {k: hit.json()[k] for k in ANSWER_KEYS} == {k: miss.json()[k] for k in ANSWER_KEYS}
    assert predict(whole.nginx.url, row).headers["X-Cache"] == "HIT"


def test_a_user_gets_the_same_arm_from_every_instance_and_counts_are_shared(
    whole: Cluster,
) -> None:
    a, b = whole.instances.values()
    before = {arm: v["requests"] for arm, v in
              a.get("/experiments/iris-ab").json()["arms"].items()}
    arms: dict[str, list[str]] = {}
    for url in (a.url, b.url, whole.nginx.url):
        with requests.Session() as session:
            for user in USERS:
                resp = session.post(url + "/predict/ab", timeout=10, json={
                    "experiment": "iris-ab", "user_id": user, "features": IRIS[0].tolist()})
                assert resp.status_code == 200, resp.text
                arms.setdefault(user, []).append(resp.json()["arm"])
    assert all(len(set(got)) == 1 for got in arms.values()), arms
    split = Counter(got[0] for got in arms.values())
    assert set(split) == {"control", "treatment"}, split
    views = [s.get("/experiments/iris-ab").json() for s in (a, b)]
    assert views[0] == views[1] and views[0]["counts_scope"] == "all workers (redis)"
    assert {arm: v["requests"] - before.get(arm, 0) for arm, v in views[0]["arms"].items()} \
        == {arm: 3 * n for arm, n in split.items()}


def test_request_ids_pass_through_and_nginx_errors_are_json(whole: Cluster) -> None:
    sent = predict(whole.nginx.url, [5.1, 3.5, 1.4, 0.2], headers={"X-Request-ID": "trace-42"})
    assert sent.headers["X-Request-ID"] == "trace-42" == sent.json()["request_id"]
    made = predict(whole.nginx.url, [5.1, 3.5, 1.4, 0.2])
    rid = made.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and made.json()["request_id"] == rid
    # nginx logs a request once its answer went out, so maybe just after the client has it.
    log = wait_until(lambda: (got := whole.nginx.access_log()).keys() >= {"trace-42", rid}
                     and got, 5)
    assert log["trace-42"]["upstream_addr"] in whole.instances
    assert log[rid]["upstream_addr"] in whole.instances  # nginx's id is the instance's id
    # A body over MAX_BODY_BYTES stops at nginx, in the server's error shape.
    big = b'{"features": [' + b"1.0, " * 1_700_000 + b'1.0]}'
    refused = requests.post(whole.nginx.url + "/predict/iris", data=big, timeout=20,
                            headers={"Content-Type": "application/json",
                                     "X-Request-ID": "too-big"})
    assert refused.status_code == 413, refused.text[:200]
    assert refused.json() == {"error": "request body larger than 8388608 bytes",
                              "code": "body_too_large", "request_id": "too-big"}
    # Logged once nginx has read and dropped the rest of the body.
    entry = wait_until(lambda: whole.nginx.access_log().get("too-big"), 5)
    assert entry["status"] == 413 and entry["upstream_addr"] == ""


def sse_events(resp: requests.Response) -> Iterator[tuple[str, str]]:
    for ev in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
        yield ev.event, ev.data


def test_server_sent_events_pass_through_nginx_as_they_are_written(whole: Cluster) -> None:
    with requests.get(whole.nginx.url + "/stream/events", stream=True, timeout=10) as live:
        arrivals = []
        for name, data in sse_events(live):
            arrivals.append((name, json.loads(data)["type"], time.monotonic()))
            if name == "metrics":
                break
    # The server writes a small hello, then a metrics event a second later. A buffering proxy
    # would hand both over together, once its buffer filled.
    (hello, _, t_hello), (_, _, t_metrics) = arrivals[0], arrivals[-1]
    assert hello == "message" and arrivals[0][1] == "hello", arrivals
    assert t_metrics - t_hello > 0.5, arrivals
    rng = np.random.default_rng(7)
    rows = (IRIS[rng.integers(0, 150, 10_000)] + rng.normal(0, 0.01, (10_000, 4))).round(4)
    with requests.post(whole.nginx.url + "/predict/stream", stream=True, timeout=30,
                       json={"model": "iris", "version": "1", "instances": rows.tolist()}) as resp:
        t_headers = time.monotonic()  # the body was uploaded and validated by now
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in resp.headers
        seen = []
        indices = []
        for name, data in sse_events(resp):
            seen.append(time.monotonic() - t_headers)
            if data == "[DONE]":
                break
            if name == "message":
                indices.append(json.loads(data)["index"])
    assert indices == list(range(10_000))
    # Rows are predicted 100 at a time while the answer is being sent: the first events must
    # arrive long before the last ones are computed, not all together at the end.
    assert seen[0] < seen[-1] / 3, (seen[0], seen[-1])


def test_websocket_predictions_through_nginx(whole: Cluster) -> None:
    ws = Client.connect(f"ws://127.0.0.1:{whole.nginx.port}/ws/predict")
    try:
        for i in range(3):
            ws.send(json.dumps({"model": "iris", "features": IRIS[i * 60].tolist(), "id": i}))
            answer = json.loads(ws.receive(timeout=5))
            assert answer["id"] == i and answer["label"] in {"setosa", "versicolor", "virginica"}
    finally:
        ws.close()


@dataclass
class Shot:
    rid: str
    start: float
    status: int
    ok: bool
    error: str


def steady_load(url: str, disrupt_at: float, disrupt: Callable[[], None], settle: float,
                tag: str, clients: int = 6) -> tuple[list[Shot], float, float]:
    """``clients`` threads POST /predict/iris (varied rows, keep-alive sessions); ``disrupt``
    runs after ``disrupt_at`` seconds, and the load goes on ``settle`` seconds after it
    returns. Returns every request and when ``disrupt`` began and ended."""
    stop = threading.Event()
    shots: list[list[Shot]] = [[] for _ in range(clients)]

    def client(n: int) -> None:
        rng = np.random.default_rng(n)
        with requests.Session() as session:
            while not stop.is_set():
                row = (IRIS[rng.integers(150)] + rng.normal(0, 0.05, 4)).round(3).tolist()
                rid = f"{tag}-{n}-{len(shots[n])}"
                t0 = time.monotonic()
                try:
                    resp = session.post(url + "/predict/iris", json={"features": row},
                                        headers={"X-Request-ID": rid}, timeout=15)
                    ok = resp.status_code == 200 and "prediction" in resp.json()
                    shots[n].append(Shot(rid, t0, resp.status_code, ok, "" if ok else resp.text))
                except requests.RequestException as exc:
                    shots[n].append(Shot(rid, t0, 0, False, repr(exc)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(disrupt_at)
        began = time.monotonic()
        disrupt()
        ended = time.monotonic()
        time.sleep(settle)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return [s for per_client in shots for s in per_client], began, ended


def split_by_instance(cluster: Cluster, shots: list[Shot], before: float,
                      after: float) -> dict[str, Any]:
    """Who answered, from nginx's access log: requests started before ``before`` and after
    ``after``."""
    # nginx logs a request once its answer went out: the last few may still be on their way.
    log = wait_until(lambda: (got := cluster.nginx.access_log()).keys() >= {s.rid for s in shots}
                     and got, 5)
    entries = [log[s.rid] for s in shots]
    answered = [e["upstream_addr"].split(", ")[-1] for e in entries]
    return {
        "sent": len(shots),
        "failed": sum(not s.ok for s in shots),
        "retried_by_nginx": sum(", " in e["upstream_addr"] for e in entries),
        "before": Counter(a for s, a in zip(shots, answered) if s.start < before),
        "after": Counter(a for s, a in zip(shots, answered) if s.start > after),
    }


def test_kill_9_of_one_instance_under_load_fails_no_request(whole: Cluster) -> None:
    victim, survivor = whole.instances
    server = whole.instances[victim]

    def kill() -> None:
        os.killpg(server.pid, signal.SIGKILL)  # the master and its workers (own session)
        assert server.proc is not None and server.proc.wait(5) == -signal.SIGKILL
        # Back on its port in a few seconds, for the next test; nginx leaves it alone for
        # fail_timeout (5 s) after its failure, longer than this load lasts.
        whole.restart(server)

    shots, began, ended = steady_load(whole.nginx.url, 2.0, kill, 3.0, "kill9")
    figures = split_by_instance(whole, shots, began, ended)
    # No request is lost: nginx retries what the victim had not answered, and a response
    # is never cut after its header (server/worker.py sends header and body in one write).
    failed = [s for s in shots if not s.ok]
    print(f"\nkill -9 under load: {figures}")
    assert failed == [], failed[:5]
    assert figures["sent"] > 200
    assert min(figures["before"][victim], figures["before"][survivor]) > 20, figures
    assert figures["after"][victim] == 0 and figures["after"][survivor] > 50, figures
    assert figures["retried_by_nginx"] >= 1  # the requests in flight on the victim


def test_sigterm_of_one_instance_under_load_drains_and_fails_no_request(
    whole: Cluster,
) -> None:
    survivor, leaving = whole.instances
    server = whole.instances[leaving]

    def terminate() -> None:
        server.signal(signal.SIGTERM)
        wait_until(lambda: server.fresh("GET", "/ready").status_code == 503, 0.8, 0.05)
        # Serving through the drain (DRAIN_SECONDS=1), then finishing what is in flight.
        assert server.proc is not None and server.proc.wait(20) == 0

    shots, began, ended = steady_load(whole.nginx.url, 1.0, terminate, 1.0, "term")
    figures = split_by_instance(whole, shots, began, ended)
    print(f"\nSIGTERM under load: {figures}, exited {ended - began:.2f} s after SIGTERM")
    assert figures["failed"] == 0, [s for s in shots if not s.ok][:5]
    assert min(figures["before"][leaving], figures["before"][survivor]) > 5, figures
    assert figures["after"][leaving] == 0 and figures["after"][survivor] > 20, figures
