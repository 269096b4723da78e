"""Scoring jobs against real processes: redis-server, gunicorn (2 gevent workers) and Celery
queue workers (``celery -A server.jobs.queue worker --pool=solo``), sharing JOBS_DIR.

One stack per module; the tests that kill or restart a process leave a fresh one behind."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
import requests
import sseclient

from tests.conftest import ADMIN_TOKEN, ROOT, LiveServer, Process, RedisServer, wait_until

pytestmark = pytest.mark.slow

KEY_A, KEY_B, KEY_C = "key-a", "key-b", "key-c"
A, B, C = ({"X-API-Key": k} for k in (KEY_A, KEY_B, KEY_C))
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = 200_000
BAD = {1_234: ["5.1", "oops", "1.4", "0.2"], 77_777: ["5.1", "3.5", "", "0.2"],
       199_998: ["5.1", "3.5", "1.4"]}  # row index -> fields (bad)
BAD_REASONS = ["not a number for feature 'sepal_width': 'oops'",
               "missing value for feature 'petal_length'", "expected 5 values, got 4"]
MAX_BYTES = 16_000_000
CSV_TYPE = {"Content-Type": "text/csv"}


class CeleryWorker(Process):
    """``celery -A server.jobs.queue worker`` with a hostname of its own: the solo pool (one
    process: a SIGKILL kills the worker and the job it runs), or prefork with one child."""

    def __init__(self, env: dict[str, str], logs: Path, name: str, pool: str = "solo") -> None:
        argv = [sys.executable, "-m", "celery", "-A", "server.jobs.queue", "worker",
                f"--pool={pool}", "--concurrency=1", "-n", f"{name}@%h", "--without-gossip",
                "--without-mingle", "--without-heartbeat", "--loglevel=INFO"]
        super().__init__(argv, env, logs / f"celery-{name}.log")

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def start(self) -> CeleryWorker:
        super().start()
        try:
            wait_until(lambda: " ready." in self.log_text(), 40, 0.1)
        except AssertionError as exc:
            self.stop()
            raise AssertionError("worker did not start:\n" + self.log_text()[-3000:]) from exc
        return self


class Stack:
    def __init__(self, tmp: Path, models: Path) -> None:
        self.tmp, self.models = tmp, models
        self.jobs_dir = tmp / "jobs"
        self.redis = RedisServer(tmp / "redis").start()
        self.env = {"REDIS_URL": self.redis.url, "API_KEYS": f"{KEY_A},{KEY_B},{KEY_C}",
                    "JOBS_DIR": str(self.jobs_dir), "JOB_MAX_BYTES": str(MAX_BYTES),
                    "JOB_MAX_ACTIVE_PER_KEY": "3", "JOB_RESULT_TTL": "600",
                    # A killed worker's job is taken over after 3 s instead of 10 (renewed
                    # every second while a worker lives).
                    "JOB_LEASE_SECONDS": "3", "MODEL_POLL_SECONDS": "1"}
        self.server = self.new_server()
        self.workers = 0
        self.worker = self.new_worker()

    def new_server(self) -> LiveServer:
        return LiveServer(self.tmp / "logs", self.models, **self.env).start()

    def new_worker(self, pool: str = "solo") -> CeleryWorker:
        self.workers += 1
        return CeleryWorker(self.server.env, self.tmp / "logs", f"w{self.workers}",
                            pool).start()

    def stop(self) -> None:
        self.worker.stop()
        self.server.stop(quick=True)
        self.redis.stop()

    def submit(self, body: Any, key: dict[str, str] = A, headers: dict[str, str] | None = None,
               **params: Any) -> requests.Response:
        return self.server.post("/jobs", params=params, data=body, timeout=60,
                                headers={**CSV_TYPE, **key, **(headers or {})})

    def job(self, job_id: str, key: dict[str, str] = A) -> dict[str, Any]:
        resp = self.server.get(f"/jobs/{job_id}", headers=key)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def wait(self, job_id: str, *states: str, timeout: float = 60,
             key: dict[str, str] = A) -> dict[str, Any]:
        states = states or ("succeeded", "failed", "cancelled")
        return dict(wait_until(lambda: (j := self.job(job_id, key))["state"] in states and j,
                               timeout, 0.05))


@pytest.fixture(scope="module")
def stack(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("jobs")
    built = Stack(tmp, Path(shutil.copytree(demo_repo, tmp / "models")))
    yield built
    built.stop()


@pytest.fixture(scope="module")
def rows_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200,000 iris-like rows with an id column and three bad rows."""
    rng = np.random.default_rng(22)
    X = np.round(rng.normal([5.8, 3, 3.7, 1.2], [0.8, 0.4, 1.7, 0.7], (ROWS, 4)), 2)
    path = tmp_path_factory.mktemp("rows") / "rows.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *FEATURES])
        for i, row in enumerate(X.tolist()):
            writer.writerow([f"r{i}", *BAD.get(i, row)])
    return path


@pytest.fixture(scope="module")
def finished(stack: Stack, rows_csv: Path) -> dict[str, Any]:
    """The 200,000-row job on iris v2 (a forest: exact answers), run to its end."""
    with rows_csv.open("rb") as fh:
        resp = stack.submit(fh, model="iris", version="2", chunk_rows=20_000)
    assert resp.status_code == 202, resp.text
    created = resp.json()
    assert resp.headers["Location"] == created["status_url"] == f"/jobs/{created['job_id']}"
    return {"created": created, "job": stack.wait(created["job_id"])}


def submitted(stack: Stack, source: Path, **params: Any) -> str:
    with source.open("rb") as fh:
        resp = stack.submit(fh, **params)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["job_id"])


def read_scored(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


# --- the answers ----------------------------------------------------------------------------
def test_a_200k_row_job_answers_as_joblib_with_bad_rows_in_rejects(
        stack: Stack, finished: dict[str, Any], rows_csv: Path) -> None:
    job = finished["job"]
    assert job["state"] == "succeeded", job
    assert (job["rows_done"], job["rows_total"], job["rejects"]) == (ROWS, ROWS, 3)
    assert job["error"] is None and job["eta_seconds"] == 0 and job["rows_per_second"] > 0
    assert job["started"] <= job["finished"]
    resp = stack.server.get(job["result_url"], headers=A, timeout=60)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert resp.headers["Accept-Ranges"] == "bytes"
    out = read_scored(resp.text)
    assert out["id"].tolist() == [f"r{i}" for i in range(ROWS)]  # every row once, in order
    source = pd.read_csv(rows_csv, dtype=str, keep_default_na=False)
    bad = out["error"] != ""
    assert sorted(np.flatnonzero(bad)) == sorted(BAD)
    assert out.loc[sorted(BAD), "error"].tolist() == BAD_REASONS
    estimator = joblib.load(stack.models / "iris" / "2" / "model.joblib")
    X = source.loc[~bad, FEATURES].to_numpy(dtype=float)
    good = out[~bad]
    assert good["prediction"].astype(int).tolist() == estimator.predict(X).tolist()
    proba = estimator.predict_proba(X)
    assert good["confidence"].astype(float).tolist() == proba.max(axis=1).tolist()
    rejects = stack.server.get(f"/jobs/{job['job_id']}/rejects", headers=A)
    assert rejects.status_code == 200
    assert list(csv.reader(io.StringIO(rejects.text))) == [["row", "reason"], *(
        [str(i + 1), reason] for i, reason in zip(sorted(BAD), BAD_REASONS))]


@pytest.mark.parametrize(("header", "status", "length"), [
    ("bytes=0-99", 206, 100), ("bytes=-50", 206, 50), ("bytes=99999999999-", 416, None)])
def test_the_result_serves_range_requests(stack: Stack, finished: dict[str, Any], header: str,
                                          status: int, length: int | None) -> None:
    url = finished["job"]["result_url"]
    whole = stack.server.get(url, headers=A, timeout=60).content
    part = stack.server.get(url, headers={**A, "Range": header})
    assert part.status_code == status
    if length is not None:
        assert len(part.content) == length
        assert part.content in (whole[:length], whole[-length:])
        assert part.headers["Content-Range"].endswith(f"/{len(whole)}")


def test_a_parquet_job_gives_parquet(stack: Stack, tmp_path: Path) -> None:
    frame = pd.DataFrame(np.random.default_rng(3).normal(4, 1, (3_000, 4)), columns=FEATURES)
    source = tmp_path / "rows.parquet"
    frame.to_parquet(source)
    with source.open("rb") as fh:  # octet-stream: told by its bytes
        resp = stack.submit(fh, headers={"Content-Type": "application/octet-stream"},
                            model="iris", version="stable")
    assert resp.status_code == 202, resp.text
    job = stack.wait(resp.json()["job_id"])
    assert (job["state"], job["format"], job["version"], job["rows_total"]) == \
        ("succeeded", "parquet", "1", 3_000)
    result = stack.server.get(job["result_url"], headers=A)
    assert result.headers["Content-Type"] == "application/vnd.apache.parquet"
    out = pd.read_parquet(io.BytesIO(result.content))
    assert list(out.columns) == [*FEATURES, "prediction", "label", "confidence", "error"]
    assert len(out) == 3_000 and (out["error"] == "").all()


def test_a_gzip_upload_is_inflated_as_it_arrives(stack: Stack) -> None:
    rows = b"sepal_length,sepal_width,petal_length,petal_width\n" + b"5.1,3.5,1.4,0.2\n" * 5000
    resp = stack.submit(gzip.compress(rows), headers={"Content-Encoding": "gzip"}, model="iris")
    assert resp.status_code == 202, resp.text
    job = stack.wait(resp.json()["job_id"])
    assert (job["state"], job["rows_total"], job["bytes"]) == ("succeeded", 5000, len(rows))


def test_progress_events_arrive_while_the_job_runs(stack: Stack, rows_csv: Path) -> None:
    job_id = submitted(stack, rows_csv, model="iris", chunk_rows=10_000)
    resp = stack.server.get(f"/jobs/{job_id}/events", headers=A, stream=True, timeout=60)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    seen: list[tuple[float, str, str]] = []
    for ev in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
        seen.append((time.monotonic(), ev.event, ev.data))
    assert seen[-1][2] == "[DONE]"
    final = json.loads(seen[-2][2])
    assert seen[-2][1] == "message" and final["state"] == "succeeded"
    progress = [(t, json.loads(data)) for t, name, data in seen if name == "progress"]
    running = [p for _, p in progress if p["state"] == "running" and 0 < p["rows_done"] < ROWS]
    assert len(running) >= 3, progress
    assert [p["rows_done"] for p in running] == sorted({p["rows_done"] for p in running})
    assert all(p["eta_seconds"] is not None for p in running[1:])
    # each arrived while the job was still running, not all at the end
    assert seen[-2][0] - progress[0][0] > 0.3


# --- faults ---------------------------------------------------------------------------------
@pytest.mark.parametrize("killed", ["worker", "prefork-child"])
def test_a_worker_killed_mid_job_is_resumed_without_a_duplicated_row(
        stack: Stack, rows_csv: Path, killed: str) -> None:
    """The whole worker (solo pool): a new worker's sweep finds the lease lapsed and queues
    the job again. A prefork child under a live worker: its message is redelivered at once
    (acks_late, reject_on_worker_lost) and the next child takes the job once the lease
    lapses. Either way the job goes on from its last part."""
    if killed == "prefork-child":
        stack.worker.stop()
        stack.worker = stack.new_worker("prefork")
    job_id = submitted(stack, rows_csv, model="iris", chunk_rows=5_000)
    before = stack.wait(job_id, "running", timeout=30)
    wait_until(lambda: stack.job(job_id)["rows_done"] >= 30_000, 30, 0.02)
    if killed == "worker":
        stack.worker.signal(signal.SIGKILL)
        assert stack.worker.proc is not None
        stack.worker.proc.wait(10)
    else:
        (child,) = stack.worker.children()
        os.kill(child, signal.SIGKILL)
    killed_at = stack.job(job_id)
    assert killed_at["state"] == "running" and killed_at["rows_done"] < ROWS
    if killed == "worker":
        stack.worker = stack.new_worker()
    seen = []
    while (job := stack.job(job_id))["state"] == "running":
        seen.append(job["rows_done"])
        time.sleep(0.05)
    assert job["state"] == "succeeded", job
    assert min(seen) >= killed_at["rows_done"]  # resumed, not started over
    assert job["started"] == before["started"] and job["rows_done"] == ROWS
    out = read_scored(stack.server.get(job["result_url"], headers=A, timeout=60).text)
    assert out["id"].tolist() == [f"r{i}" for i in range(ROWS)]
    log = stack.worker.log_text()
    assert "queued again" in log if killed == "worker" else "WorkerLostError" in log


def test_a_gunicorn_restart_mid_job_loses_nothing(stack: Stack, rows_csv: Path) -> None:
    job_id = submitted(stack, rows_csv, model="iris", chunk_rows=5_000)
    queued = submitted(stack, rows_csv, model="iris", version="2")  # behind the first
    stack.wait(job_id, "running", timeout=30)
    stack.server.stop()
    stack.server = stack.new_server()
    for each in (job_id, queued):
        job = stack.wait(each, timeout=90)
        assert (job["state"], job["rows_done"], job["rejects"]) == ("succeeded", ROWS, 3)
    assert {j["job_id"] for j in stack.server.get("/jobs", headers=A).json()["jobs"]} >= \
        {job_id, queued}


def test_cancel_stops_a_running_job_within_one_chunk_and_a_queued_one_at_once(
        stack: Stack, rows_csv: Path) -> None:
    chunk = 2_000
    running = submitted(stack, rows_csv, model="iris", chunk_rows=chunk)
    queued = submitted(stack, rows_csv, model="iris")
    stack.wait(running, "running", timeout=30)
    wait_until(lambda: stack.job(running)["rows_done"] >= 2 * chunk, 30, 0.02)
    resp = stack.server.request("DELETE", f"/jobs/{queued}", headers=A)
    assert resp.status_code == 202 and resp.json()["state"] == "cancelled"
    resp = stack.server.request("DELETE", f"/jobs/{running}", headers=A)
    assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    asked_at = resp.json()["rows_done"]
    job = stack.wait(running, timeout=30)
    assert job["state"] == "cancelled" and job["finished"]
    assert job["rows_done"] <= asked_at + chunk < ROWS
    for each in (running, queued):
        assert stack.server.get(f"/jobs/{each}/result", headers=A).json()["code"] == \
            "job_not_succeeded"
        again = stack.server.request("DELETE", f"/jobs/{each}", headers=A)
        assert again.status_code == 409 and again.json()["code"] == "job_finished"
    assert not (stack.jobs_dir / running / "input.csv").exists()


def test_a_version_removed_mid_job_fails_it_with_a_clear_error(
        stack: Stack, rows_csv: Path) -> None:
    version = stack.models / "iris" / "7"
    shutil.copytree(stack.models / "iris" / "1", version)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert stack.server.post("/admin/reload", headers=admin).status_code == 200
    job_id = submitted(stack, rows_csv, model="iris", version="7", chunk_rows=2_000)
    stack.wait(job_id, "running", timeout=30)
    wait_until(lambda: stack.job(job_id)["rows_done"] > 0, 30, 0.02)
    shutil.rmtree(version)
    job = stack.wait(job_id, timeout=30)
    assert job["state"] == "failed"
    assert re.fullmatch(r"model 'iris' version 7 was removed from the model repository while "
                        r"the job ran, after [\d,]+ rows", job["error"]), job["error"]
    # the server forgets it too, so that 'latest' is iris 2 again for the tests after this
    assert stack.server.post("/admin/reload", headers=admin).json()["models"]["iris"] == \
        ["1", "2"]


# --- ownership ------------------------------------------------------------------------------
def test_another_key_cannot_see_the_job(stack: Stack, finished: dict[str, Any]) -> None:
    job_id = finished["job"]["job_id"]
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/result"),
                         ("GET", "/rejects"), ("DELETE", "")):
        resp = stack.server.request(method, f"/jobs/{job_id}{path}", headers=B)
        assert resp.status_code == 404 and resp.json()["code"] == "job_not_found", path
        assert stack.server.request(method, f"/jobs/{job_id}{path}").status_code == 401
    assert job_id not in {j["job_id"] for j in stack.server.get("/jobs", headers=B).json()["jobs"]}
    assert job_id in {j["job_id"] for j in stack.server.get("/jobs", headers=A).json()["jobs"]}
    # a browser's stream token stands for the key it was made with
    for key, status in ((A, 200), (B, 404)):
        token = stack.server.post("/auth/stream-token", headers=key).json()["token"]
        resp = stack.server.get(f"/jobs/{job_id}/events", params={"token": token})
        assert resp.status_code == status


# --- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "headers", "params", "status", "code"), [
    (b"x\n1\n", {}, {"model": "nope"}, 404, "model_not_found"),
    (b"x\n1\n", {}, {"model": "iris", "version": "99"}, 404, "version_not_found"),
    (b"x\n1\n", {}, {}, 422, "validation_error"),
    (b"sepal_length,sepal_width,petal_length\n1,2,3\n", {}, {"model": "iris"}, 422,
     "validation_error"),
    (b"", {}, {"model": "iris"}, 422, "validation_error"),
    (b"PAR1 not really", {"Content-Type": "application/vnd.apache.parquet"},
     {"model": "iris"}, 422, "validation_error"),
    (b"x\n1\n", {}, {"model": "iris", "chunk_rows": "5"}, 422, "validation_error"),
    (b"<a/>", {"Content-Type": "application/xml"}, {"model": "iris"}, 415,
     "unsupported_media_type"),
    (b'{"input": "s3://bucket/rows.csv", "model": "iris"}',
     {"Content-Type": "application/json"}, {}, 422, "object_storage_unavailable"),
], ids=["unknown-model", "unknown-version", "no-model", "header-lacks-feature", "empty",
        "not-parquet", "chunk-rows", "media-type", "s3-input"])
def test_refused_submissions(stack: Stack, body: bytes, headers: dict[str, str],
                             params: dict[str, Any], status: int, code: str) -> None:
    before = set(stack.jobs_dir.iterdir()) if stack.jobs_dir.exists() else set()
    resp = stack.submit(body, headers=headers, **params)
    assert resp.status_code == status, resp.text
    assert resp.json()["code"] == code
    if code in ("model_not_found", "version_not_found", "unsupported_media_type"):
        assert resp.headers["Connection"] == "close"  # the upload is not read, not drained
    if code == "validation_error" and params.get("model") == "iris" and body.startswith(b"sep"):
        assert "petal_width" in resp.json()["error"]
    assert set(stack.jobs_dir.iterdir()) == before  # nothing left behind


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_upload_over_job_max_bytes_is_413(stack: Stack, chunked: bool) -> None:
    before = set(stack.jobs_dir.iterdir())
    piece = b"1.0,2.0,3.0,4.0\n" * 4096

    def body() -> Iterator[bytes]:
        yield b"sepal_length,sepal_width,petal_length,petal_width\n"
        for _ in range(MAX_BYTES // len(piece) + 2):
            yield piece

    data: Any = body() if chunked else b"".join(body())
    try:
        resp = stack.submit(data, model="iris")
    except requests.ConnectionError:
        pytest.fail("the server closed before answering 413")
    assert resp.status_code == 413 and "JOB_MAX_BYTES" in resp.json()["error"]
    assert set(stack.jobs_dir.iterdir()) == before


def test_too_many_active_jobs_is_429(stack: Stack, rows_csv: Path) -> None:
    ids = [submitted(stack, rows_csv, key=C, model="iris") for _ in range(3)]
    with rows_csv.open("rb") as fh:
        resp = stack.submit(fh, key=C, model="iris")
    assert resp.status_code == 429 and resp.json()["code"] == "too_many_jobs"
    assert resp.headers["Retry-After"] and resp.headers["Connection"] == "close"
    assert submitted(stack, rows_csv, key=B, model="iris")  # another key has its own room
    for job_id in ids:
        stack.server.request("DELETE", f"/jobs/{job_id}", headers=C)
    for job_id in ids:
        assert stack.wait(job_id, key=C)["state"] in ("cancelled", "succeeded")


def test_without_redis_url_jobs_answer_404_jobs_off(live_server: LiveServer) -> None:
    for method, path in (("POST", "/jobs?model=iris"), ("GET", "/jobs"),
                         ("GET", "/jobs/" + "a" * 32), ("DELETE", "/jobs/" + "a" * 32),
                         ("GET", f"/jobs/{'a' * 32}/events"), ("GET", f"/jobs/{'a' * 32}/result")):
        resp = live_server.request(method, path, data=b"a\n1\n", headers=CSV_TYPE)
        assert resp.status_code == 404, path
        assert resp.json()["code"] == "jobs_off"
        assert "REDIS_URL" in resp.json()["error"]


# --- the docs -------------------------------------------------------------------------------
def test_the_docs_walkthrough_runs(stack: Stack, tmp_path: Path) -> None:
    """docs/jobs.md's ``zsh`` blocks (they need Redis and a queue worker, which the docs
    test's server has not) run as pasted against this stack, in one shell."""
    page = (ROOT / "docs" / "jobs.md").read_text()
    blocks = re.findall(r"^```zsh\n(.*?)^```", page, re.M | re.S)
    assert blocks
    script = "set -e\n" + "\n".join(blocks)
    script = script.replace("localhost:8000", f"127.0.0.1:{stack.server.port}")
    (tmp_path / "rows.csv").write_text("sepal_length,sepal_width,petal_length,petal_width\n"
                                       "5.1,3.5,1.4,0.2\n6.2,2.9,4.3,1.3\n7.7,3.0,6.1,2.3\n")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "API_KEY": KEY_A,
                                            "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    scored = (tmp_path / "scored.csv").read_text().splitlines()
    assert scored[0].endswith("prediction,label,confidence,error") and len(scored) == 4
