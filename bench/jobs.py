"""``python -m bench.jobs``: rows/s of a scoring job over HTTP (POST /jobs, Celery queue
workers) next to the offline CLI and ``POST /predict/csv``, on one generated iris CSV.

Writes the demo repository and a ``--rows`` (1,000,000) iris-like CSV into a temp dir,
starts redis-server and ``gunicorn -c gunicorn.conf.py wsgi:app`` (2 gevent workers, cache
off) on free loopback ports, then measures, one after the other:

- ``python -m server.score`` in one process (chunks of ``--chunk-rows``, 50,000);
- ``POST /predict/csv``: the file streamed up, the scored CSV read to its end;
- ``POST /jobs`` with 1 queue worker (``celery -A server.jobs.queue worker
  --concurrency=1``): the upload, the queue and the scoring, until ``succeeded``;
- the same job with 2 queue workers: a job is scored by one worker process, so a second
  worker does not make one job faster;
- two such jobs at once with 2 queue workers: what the second worker is for (rows/s of
  both together).

Each figure is rows / wall seconds from the first byte sent to the last one received (the
CLI: its whole run; a job: from the upload to ``succeeded``); for jobs, ``scoring`` is the
job's own ``started`` to ``finished``. Every process is started here and stopped by PID.

    python -m bench.jobs [--rows 1000000] [--version 1] [--chunk-rows 50000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.core import ROOT, Server, _terminate, clean_environ, free_port, progress, stop_process
from bench.score import offline, write_iris_csv
from server.jobs.demo import write_demo


class Child:
    """A process of this benchmark (redis-server, a queue worker), stopped by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: str, timeout: float = 60) -> Child:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 60)
        self.proc = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def csv_over_http(url: str, source: Path, version: str) -> float:
    """rows/s of POST /predict/csv for the whole file (sent streamed, answer read whole)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    started = time.perf_counter()
    with source.open("rb") as fh:
        conn.request("POST", f"/predict/csv?model=iris&version={version}", fh,
                     {"Content-Type": "text/csv",
                      "Content-Length": str(source.stat().st_size)})
    answer = conn.getresponse()
    lines = sum(block.count(b"\n") for block in iter(lambda: answer.read(1 << 20), b""))
    elapsed = time.perf_counter() - started
    conn.close()
    if answer.status != 200:
        raise RuntimeError(f"/predict/csv answered {answer.status}")
    return (lines - 1) / elapsed


def submit(url: str, source: Path, version: str, chunk_rows: int) -> str:
    with source.open("rb") as fh:
        request = urllib.request.Request(
            f"{url}/jobs?model=iris&version={version}&chunk_rows={chunk_rows}", data=fh,
            method="POST", headers={"Content-Type": "text/csv",
                                    "Content-Length": str(source.stat().st_size)})
        with urllib.request.urlopen(request, timeout=600) as answer:
            return str(json.loads(answer.read())["job_id"])


def wait_job(url: str, job_id: str) -> dict[str, Any]:
    while True:
        with urllib.request.urlopen(f"{url}/jobs/{job_id}", timeout=30) as answer:
            job: dict[str, Any] = json.loads(answer.read())
        if job["state"] not in ("queued", "running"):
            if job["state"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['state']}: {job['error']}")
            return job
        time.sleep(0.05)


def seconds(job: dict[str, Any]) -> float:
    def at(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    return at(job["finished"]) - at(job["started"])


def jobs_at_once(url: str, source: Path, version: str, chunk_rows: int,
                 count: int) -> tuple[float, float, list[dict[str, Any]]]:
    """(rows/s submit to done, rows/s of scoring, the jobs) for ``count`` jobs at once."""
    started = time.perf_counter()
    ids = [submit(url, source, version, chunk_rows) for _ in range(count)]
    done = [wait_job(url, job_id) for job_id in ids]
    elapsed = time.perf_counter() - started
    rows = sum(int(j["rows_total"]) for j in done)
    first = min(datetime.fromisoformat(j["started"].replace("Z", "+00:00")).timestamp()
                for j in done)
    last = max(datetime.fromisoformat(j["finished"].replace("Z", "+00:00")).timestamp()
               for j in done)
    return rows / elapsed, rows / max(last - first, 1e-9), done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--version", default="1", help="iris version: 1 LR, 2 RF100")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("bench.jobs needs redis-server (apt-get install redis-server)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = Path(tmp)
        models = work / "models"
        write_demo(models)
        source = work / "iris.csv"
        progress(f"writing {args.rows:,} rows into {source}")
        write_iris_csv(source, args.rows)
        size_mb = source.stat().st_size / 1e6
        results: list[tuple[str, str, float, float | None]] = []

        progress("server.score, one process")
        results.append(("server.score (CLI)", "1 process", offline(
            [f"iris:{args.version}", str(source), str(work / "single.csv"), "--model-dir",
             str(models), "--chunk-rows", str(args.chunk_rows)], args.rows), None))

        port = free_port()
        redis = Child("redis", [redis_server, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", tmp],
                      dict(os.environ), work / "redis.log")
        env = {"MODEL_DIR": str(models), "CACHE": "off", "REDIS_URL":
               f"redis://127.0.0.1:{port}/0", "JOBS_DIR": str(work / "jobs"),
               "JOB_MAX_ACTIVE_PER_KEY": "8"}
        server = Server("ours", "wsgi:app", work, env)
        workers: list[Child] = []

        def worker() -> Child:
            name = f"w{len(workers) + 1}"
            child = Child(name, [sys.executable, "-m", "celery", "-A", "server.jobs.queue",
                                 "worker", "--concurrency=1", "-n", f"{name}@%h",
                                 "--without-gossip", "--without-mingle", "--loglevel=INFO"],
                          clean_environ() | env | {"PYTHONPATH": str(ROOT)},
                          work / f"celery-{name}.log").start(" ready.")
            workers.append(child)
            return child

        try:
            redis.start("Ready to accept connections")
            server.start()
            server.wait_until_up(urllib.request.Request(server.url + "/ready"))
            progress("POST /predict/csv")
            results.append(("POST /predict/csv", "2 web workers",
                            csv_over_http(server.url, source, args.version), None))
            worker()
            progress("POST /jobs, 1 queue worker")
            wall, scoring, _ = jobs_at_once(server.url, source, args.version,
                                            args.chunk_rows, 1)
            results.append(("POST /jobs, 1 job", "1 queue worker", wall, scoring))
            worker()
            progress("POST /jobs, 2 queue workers")
            wall, scoring, _ = jobs_at_once(server.url, source, args.version,
                                            args.chunk_rows, 1)
            results.append(("POST /jobs, 1 job", "2 queue workers", wall, scoring))
            progress("POST /jobs, 2 jobs at once, 2 queue workers")
            wall, scoring, done = jobs_at_once(server.url, source, args.version,
                                               args.chunk_rows, 2)
            results.append(("POST /jobs, 2 jobs at once", "2 queue workers", wall, scoring))
        except BaseException:
            progress(f"--- server log (tail) ---\n{server.log_tail()}")
            for child in workers:
                progress(f"--- {child.name} log (tail) ---\n{child.tail()}")
            raise
        finally:
            for child in workers:
                child.stop()
            server.stop()
            redis.stop()

    base = results[0][2]
    print(f"jobs benchmark: {args.rows:,} iris rows ({size_mb:.0f} MB CSV), iris v"
          f"{args.version}, chunks of {args.chunk_rows:,}, {os.cpu_count()} CPUs")
    print(f"{'path':<28} {'processes':>16} {'rows/s':>10} {'x CLI':>6} {'scoring rows/s':>15}")
    for name, procs, rows_s, scoring_rate in results:
        shown = f"{scoring_rate:,.0f}" if scoring_rate else "-"
        print(f"{name:<28} {procs:>16} {rows_s:>10,.0f} {rows_s / base:>6.2f} {shown:>15}")
    print("rows/s: from the first byte sent to the last received (the CLI: its whole run; "
          "a job: upload to succeeded); scoring: the jobs' started to finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
