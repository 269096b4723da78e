"""Live drift monitoring on real gunicorn with 2 workers: 2,000 training rows leave every
feature stable, 2,000 rows with one feature shifted by 1.5 standard deviations flag that
feature alone, on every worker's answer, in /metrics and as a ``drift`` event; two instances
add up through Redis; Redis down at start or killed mid-load fails no prediction and the
drift answer falls back to the server's own counts. Versions without a usable profile serve
and say why; every door's rows are counted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from sklearn import datasets
from sklearn.model_selection import train_test_split

from tests.conftest import ROOT, LiveServer, RedisServer, free_port, scrape_metrics, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

BATCH = 100
GAUGE = re.compile(r'^model_feature_drift_psi\{feature="([^"]+)",model="([^"]+)",'
                   r'version="([^"]+)"\} (\S+)$', re.M)


def training_rows(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn from iris's training split (as the demo fits it), sepal width
    shifted by ``shift`` standard deviations."""
    data = datasets.load_iris()
    X, *_ = train_test_split(data.data, data.target, test_size=0.25, random_state=42)
    X = np.asarray(X)
    rows = X[np.random.default_rng(seed).integers(0, len(X), n)].copy()
    rows[:, 1] += shift * X[:, 1].std()
    return rows


def send(server: LiveServer, version: str, rows: np.ndarray) -> None:
    """The rows as batches, each on a new connection (so both workers serve some)."""
    for start in range(0, len(rows), BATCH):
        resp = server.fresh("POST", "/predict/batch", json={
            "model": "iris", "version": version, "instances": rows[start:start + BATCH].tolist()})
        assert resp.status_code == 200, resp.text


def drift(server: LiveServer, version: str, model: str = "iris") -> dict[str, Any]:
    resp = server.get(f"/models/{model}/versions/{version}/drift")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def every_worker(server: LiveServer, version: str,
                 ready: Callable[[dict[str, Any]], bool]) -> dict[int, dict[str, Any]]:
    """Each worker's drift answer (a keep-alive connection stays with one worker), once
    ``ready`` holds for both."""
    answers: dict[int, dict[str, Any]] = {}

    def ask() -> bool:
        with requests.Session() as conn:
            pid = conn.get(server.url + "/status", timeout=5).json()["pid"]
            body = conn.get(f"{server.url}/models/iris/versions/{version}/drift", timeout=5)
            assert body.status_code == 200, body.text
            if ready(body.json()):
                answers[pid] = body.json()
        return len(answers) >= 2

    wait_until(ask, 30, every=0.1)
    return answers


def gauges(text: str, version: str) -> dict[str, float]:
    return {f: float(v) for f, m, ver, v in GAUGE.findall(text) if m == "iris" and ver == version}


def drifted_gauges(server: LiveServer, version: str) -> dict[str, float]:
    """The iris version's feature gauges in /metrics, once sepal width's is over 0.25."""
    def found() -> dict[str, float] | None:
        values = gauges(scrape_metrics(server), version)
        return values if values.get("sepal_width", 0) > 0.25 else None

    return dict(wait_until(found, 15))


class EventReader:
    """``/stream/events`` read in a thread: the ``drift`` events that came."""

    def __init__(self, server: LiveServer) -> None:
        self.events: list[dict[str, Any]] = []
        self.resp = requests.get(server.url + "/stream/events", stream=True, timeout=30)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind = ""
        try:
            for raw in self.resp.iter_lines():
                line = raw.decode()
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind == "drift":
                    self.events.append(json.loads(line[5:]))
                elif not line:
                    kind = ""
        except (requests.RequestException, ValueError, AttributeError, OSError):
            return

    def close(self) -> None:
        self.resp.close()


@pytest.fixture(scope="module")
def server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The issue's defaults (DRIFT_WINDOW_SECONDS 3600, DRIFT_MIN_ROWS 500) over the demo
    models plus iris v3 without a profile and v4 with a corrupt one; no sampling in the way."""
    tmp = tmp_path_factory.mktemp("drift")
    repo = Path(shutil.copytree(demo_repo, tmp / "models"))
    for version, profile in (("3", None), ("4", b'{"format": 1, "features": [')):
        shutil.copytree(repo / "iris" / "1", repo / "iris" / version)
        (repo / "iris" / version / "profile.json").unlink()
        if profile is not None:
            (repo / "iris" / version / "profile.json").write_bytes(profile)
    live = LiveServer(tmp / "logs", repo, DRIFT_SAMPLE_ROWS_PER_SECOND="100000",
                      MODEL_POLL_SECONDS="0").start()
    yield live
    live.stop(quick=True)


def test_training_rows_leave_every_feature_stable_on_every_worker(server: LiveServer) -> None:
    send(server, "1", training_rows(2000))
    answers = every_worker(server, "1", lambda b: b["rows"] == 2000)
    for body in answers.values():
        assert body["status"] == "stable" and body["window_seconds"] == 3600
        assert body["min_rows"] == 500 and body["reference_rows"] == 112
        assert body["counts_scope"] == "all workers of this server" and body["note"] is None
        assert {n: f["status"] for n, f in body["features"].items()} == {
            "sepal_length": "stable", "sepal_width": "stable", "petal_length": "stable",
            "petal_width": "stable"}
        assert all(f["psi"] < 0.1 for f in body["features"].values())
        assert all(f["p_value"] > 0.05 for f in body["features"].values())
        assert body["prediction"]["psi"] < 0.1 and body["prediction"]["classes"] == [0, 1, 2]
    # The one worker that scores for the server publishes its gauges.
    found = wait_until(lambda: len(gauges(scrape_metrics(server), "1")) == 4
                       and gauges(scrape_metrics(server), "1"), 15)
    assert all(v < 0.1 for v in found.values()), found


def test_one_shifted_feature_alone_drifts_on_every_worker_in_metrics_and_events(
        server: LiveServer) -> None:
    events = EventReader(server)
    try:
        send(server, "2", training_rows(2000, shift=1.5, seed=1))
        answers = every_worker(server, "2", lambda b: b["rows"] == 2000)
        for body in answers.values():
            assert body["status"] == "drifted" and body["worst_feature"] == "sepal_width"
            statuses = {n: f["status"] for n, f in body["features"].items()}
            assert statuses == {"sepal_length": "stable", "sepal_width": "drifted",
                                "petal_length": "stable", "petal_width": "stable"}
            shifted = body["features"]["sepal_width"]
            assert shifted["psi"] > 0.25 and shifted["p_value"] < 1e-6
            assert sum(shifted["live_proportions"][-2:]) > 0.5  # most values in the top bins
        found = drifted_gauges(server, "2")
        assert {f for f, v in found.items() if v > 0.25} == {"sepal_width"}, found
        assert re.search(r'^model_prediction_drift_psi\{model="iris",version="2"\} ',
                         scrape_metrics(server), re.M)
        event = wait_until(lambda: next((e for e in events.events if e["version"] == "2"),
                                        None), 15)
        assert event["model"] == "iris" and event["status"] == "drifted"
        assert event["features"]["sepal_width"]["from"] == "stable"
        assert event["features"]["sepal_width"]["to"] == "drifted"
        assert set(event["features"]) == {"sepal_width"}
    finally:
        events.close()


@pytest.mark.parametrize(("version", "reason"), [
    ("3", "no profile.json beside the artifact"),
    ("4", "profile.json unusable: not JSON"),
])
def test_a_version_without_a_usable_profile_serves_and_says_no_reference(
        server: LiveServer, version: str, reason: str) -> None:
    resp = server.post(f"/predict/iris/versions/{version}", json={"features": [5.1, 3.5, 1.4,
                                                                              0.2]})
    assert resp.status_code == 200 and resp.json()["label"] == "setosa"
    states = {v["version"]: v["state"] for v in server.get("/models/iris").json()["versions"]}
    assert states[version] == "AVAILABLE"
    body = drift(server, version)
    assert body["status"] == "no_reference" and body["reason"].startswith(reason)
    assert body["features"] == {} and body["rows"] is None


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/models/nope/versions/1/drift", 404, "model_not_found"),
    ("/models/iris/versions/9/drift", 404, "version_not_found"),
    ("/models/iris/versions/shiny/drift", 404, "version_not_found"),
])
def test_unknown_models_and_versions_are_404(server: LiveServer, path: str, status: int,
                                             code: str) -> None:
    resp = server.get(path)
    assert resp.status_code == status and resp.json()["code"] == code


def test_a_label_names_the_version(server: LiveServer) -> None:
    body = drift(server, "canary")
    assert body["version"] == "2" and body["status"] == "drifted"


def test_every_door_counts_its_rows(server: LiveServer) -> None:
    names = server.get("/models/diabetes").json()["versions"][0]["feature_names"]
    row = [0.01] * len(names)
    before = drift(server, "1", "diabetes")["rows_served"]
    ab_before = drift(server, "1")["rows_served"] + drift(server, "2")["rows_served"]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/predict/diabetes", {"json": {"features": row}}),
        ("/predict/batch", {"json": {"model": "diabetes", "instances": [row] * 3}}),
        ("/predict/stream", {"json": {"model": "diabetes", "instances": [row] * 5}}),
        ("/predict/csv?model=diabetes", {"data": ",".join(names) + "\n" + "\n".join(
            ",".join(map(str, row)) for _ in range(4)) + "\n",
            "headers": {"Content-Type": "text/csv"}}),
        ("/v1/models/diabetes:predict", {"json": {"instances": [row] * 2}}),
        ("/v2/models/diabetes/infer", {"json": {"inputs": [{
            "name": "input-0", "shape": [2, len(row)], "datatype": "FP64", "data": row * 2}]}}),
        ("/predict/ab", {"json": {"experiment": "iris-ab", "user_id": "u1",
                                  "features": [5.1, 3.5, 1.4, 0.2]}}),
    ]
    for path, kw in calls:
        resp = server.post(path, **kw)
        assert resp.status_code == 200, (path, resp.text)
    wait_until(lambda: drift(server, "1", "diabetes")["rows_served"] == before + 17, 10)
    wait_until(lambda: drift(server, "1")["rows_served"] + drift(server, "2")["rows_served"]
               == ab_before + 1, 10)
    body = drift(server, "1", "diabetes")
    assert body["prediction"]["edges"] and "classes" not in body["prediction"]


def test_a_profile_written_by_the_command_is_taken_by_the_running_server(
        server: LiveServer, admin: dict[str, str]) -> None:
    repo = Path(server.env["MODEL_DIR"])
    done = subprocess.run([sys.executable, "-m", "server.profile", "iris:3",
                           str(repo / "iris" / "data" / "train.csv")], cwd=ROOT,
                          env={**os.environ, "MODEL_DIR": str(repo), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert server.post("/admin/reload", headers=admin).status_code == 200
    body = wait_until(lambda: (d := drift(server, "3"))["status"] != "no_reference" and d, 10)
    assert body["status"] == "not_enough_rows" and body["reference_rows"] == 150


# --- Redis: instances add up, and it fails open ---------------------------------------------
def start_all(servers: list[LiveServer]) -> None:
    """Start the servers side by side (each boot is mostly waiting for its workers)."""
    def start(server: LiveServer) -> LiveServer:
        return server.start()

    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(start, servers))


def test_two_instances_add_up_through_redis_and_redis_killed_mid_load_fails_nothing(
        demo_repo: Path, redis_server: RedisServer,
        server_factory: Callable[..., LiveServer]) -> None:
    # Each instance alone counts 1,000 rows: only their sum reaches DRIFT_MIN_ROWS.
    env = {"REDIS_URL": redis_server.url, "DRIFT_MIN_ROWS": "1500", "MODEL_POLL_SECONDS": "0",
           "DRIFT_SAMPLE_ROWS_PER_SECOND": "100000", "REDIS_BREAKER_SECONDS": "0.5"}
    a, b = server_factory(demo_repo, start=False, **env), server_factory(demo_repo, start=False,
                                                                         **env)
    start_all([a, b])
    shifted = training_rows(2000, shift=1.5, seed=2)
    send(a, "1", shifted[:1000])
    send(b, "1", shifted[1000:])
    for instance in (a, b):
        answers = every_worker(instance, "1", lambda body: body["rows"] == 2000)
        for body in answers.values():
            assert body["counts_scope"] == "all instances (redis)" and body["note"] is None
            assert body["status"] == "drifted"
            assert {n for n, f in body["features"].items() if f["status"] == "drifted"} == \
                {"sepal_width"}
            assert body["since_start"]["rows"] == 1000  # this instance's own
        found = drifted_gauges(instance, "1")
        assert {f for f, v in found.items() if v > 0.25} == {"sepal_width"}

    # Load on instance a; Redis dies in the middle of it.
    failures: list[str] = []
    done = threading.Event()

    def load(seed: int) -> int:
        sent = 0
        rows = training_rows(400, seed=seed)
        with requests.Session() as conn:
            while not done.is_set():
                row = rows[sent % len(rows)]
                if sent % 5:
                    resp = conn.post(a.url + "/predict", timeout=10, json={
                        "model": "iris", "version": "1", "features": row.tolist()})
                else:
                    resp = conn.post(a.url + "/predict/batch", timeout=10, json={
                        "model": "iris", "version": "1", "instances": rows[:50].tolist()})
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")
                sent += 1
        return sent

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load, seed) for seed in range(4)]
        time.sleep(1.5)
        redis_server.signal(signal.SIGKILL)
        time.sleep(2.5)
        done.set()
        sent = sum(f.result() for f in futures)
    assert sent > 50 and failures == []
    body = wait_until(lambda: (d := drift(a, "1"))["note"] is not None and d, 10)
    assert body["counts_scope"] == "all workers of this server"
    assert body["note"].startswith("Redis unavailable")
    assert body["rows"] > 1000  # instance a's own rows, shifted or not


def test_redis_down_at_start_serves_and_counts_locally(
        demo_repo: Path, server_factory: Callable[..., LiveServer]) -> None:
    server = server_factory(demo_repo, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                            DRIFT_MIN_ROWS="100", MODEL_POLL_SECONDS="0")
    send(server, "1", training_rows(300))
    body = wait_until(lambda: (d := drift(server, "1"))["rows"] == 300 and d, 10)
    assert body["status"] == "stable" and body["note"].startswith("Redis unavailable")
    assert body["counts_scope"] == "all workers of this server"


def test_workers_replaced_by_a_sighup_take_their_counts_and_files_with_them(
        demo_repo: Path, server_factory: Callable[..., LiveServer], tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    server = server_factory(demo_repo, RUNTIME_DIR=str(runtime), MODEL_POLL_SECONDS="0")

    def writers() -> set[int]:
        return {int(p.name[len("drift-"):-len(".json")]) for p in runtime.glob("drift-*.json")}

    send(server, "1", training_rows(300))
    wait_until(lambda: drift(server, "1")["rows"] == 300, 10)
    old = wait_until(lambda: len(found := writers()) == 2 and found, 10)
    server.signal(signal.SIGHUP)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in old), 60, 0.1)
    wait_until(lambda: drift(server, "1")["rows"] == 0, 10)
    wait_until(lambda: len(found := writers()) == 2 and not found & old, 10)
