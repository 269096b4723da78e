"""``python -m bench.score``: offline scoring rows/s, three ways, on one generated iris CSV.

Writes the demo repository and a ``--rows`` (1,000,000) iris-like CSV into a temp dir, then
scores the whole file with the same model version:

- ``server.score`` in one process (``python -m server.score``, chunks of 50,000 rows);
- ``server.score --dask local`` (a LocalCluster of 2 worker processes, startup included);
- ``POST /predict/batch`` over HTTP to ``gunicorn -c gunicorn.conf.py wsgi:app`` (2 gevent
  workers, cache off): the file read in 1,000-row chunks (the server's MAX_BATCH) and sent
  by ``--clients`` threads on keep-alive connections; the server is started before and
  stopped after, by PID.

Each figure is rows / wall seconds of the whole job (reading, scoring and, for the offline
paths, writing the output), printed as one table with ratios against the single process.

    python -m bench.score [--rows 1000000] [--version 1] [--clients 8]
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from bench.core import ROOT, Server, _terminate, clean_environ, post, progress
from server.jobs.demo import write_demo

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
BATCH_ROWS = 1000


def write_iris_csv(path: Path, rows: int, seed: int = 7) -> None:
    """Real iris rows plus noise of a tenth of each feature's spread, 2 decimals, in blocks."""
    from sklearn.datasets import load_iris

    rng = np.random.default_rng(seed)
    iris = np.asarray(load_iris().data, dtype="<f8")
    spread = iris.std(axis=0)
    with path.open("w") as fh:
        fh.write(",".join(FEATURES) + "\n")
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            picks = iris[rng.integers(0, len(iris), n)]
            block = np.clip(picks + rng.normal(0, 0.1, picks.shape) * spread, 0.1, None)
            np.savetxt(fh, block, fmt="%.2f", delimiter=",")


def offline(argv: list[str], rows: int) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "server.score", *argv], cwd=ROOT,
                          env=clean_environ() | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"server.score {argv} failed:\n{done.stderr[-3000:]}")
    return rows / elapsed


def over_http(url: str, csv_path: Path, version: str, clients: int) -> tuple[float, int]:
    """(rows/s, rows answered) for the whole file through POST /predict/batch."""
    host, port = url.removeprefix("http://").split(":")
    bodies: queue.Queue[bytes | None] = queue.Queue(maxsize=4 * clients)
    answered = [0] * clients
    errors: list[str] = []

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            while (body := bodies.get()) is not None:
                conn.request("POST", "/predict/batch", body,
                             {"Content-Type": "application/json"})
                answer = conn.getresponse()
                data = answer.read()
                if answer.status != 200:
                    errors.append(f"{answer.status} {data[:300]!r}")
                    continue
                answered[slot] += orjson.loads(data)["count"]
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for chunk in pd.read_csv(csv_path, chunksize=BATCH_ROWS, dtype="<f8"):
        bodies.put(orjson.dumps({"model": "iris", "version": version,
                                 "instances": np.ascontiguousarray(chunk.to_numpy())},
                                option=orjson.OPT_SERIALIZE_NUMPY))
    for _ in threads:
        bodies.put(None)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} batch requests failed, first: {errors[0]}")
    return sum(answered) / elapsed, sum(answered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--version", default="1", help="iris version: 1 LR, 2 RF100")
    parser.add_argument("--clients", type=int, default=8, help="HTTP client threads")
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        work = Path(tmp)
        models = work / "models"
        write_demo(models)
        source = work / "iris.csv"
        progress(f"writing {args.rows:,} rows into {source}")
        write_iris_csv(source, args.rows)
        size_mb = source.stat().st_size / 1e6
        spec = f"iris:{args.version}"
        common = ["--model-dir", str(models), "--chunk-rows", str(args.chunk_rows)]
        results: list[tuple[str, str, float]] = []

        progress("server.score, one process")
        results.append(("server.score (1 process)", "1",
                        offline([spec, str(source), str(work / "single.csv"), *common],
                                args.rows)))
        progress("server.score --dask local")
        results.append(("server.score --dask local", "2 workers",
                        offline([spec, str(source), str(work / "dask.csv"), *common,
                                 "--dask", "local"], args.rows)))
        single = (work / "single.csv").read_bytes()
        same = single == (work / "dask.csv").read_bytes()
        del single

        server = Server("ours", "wsgi:app", work, {"MODEL_DIR": str(models), "CACHE": "off"})
        try:
            server.start()
            server.wait_until_up(urllib.request.Request(server.url + "/ready"))
            with urllib.request.urlopen(post(server.url + "/predict/batch", orjson.dumps(
                    {"model": "iris", "version": args.version,
                     "instances": [[5.1, 3.5, 1.4, 0.2]]})), timeout=30) as warm:
                assert warm.status == 200
            progress(f"POST /predict/batch x{BATCH_ROWS}, {args.clients} clients")
            rate, answered = over_http(server.url, source, args.version, args.clients)
            if answered != args.rows:
                raise RuntimeError(f"HTTP answered {answered} of {args.rows} rows")
            results.append((f"/predict/batch x{BATCH_ROWS} HTTP", "2 workers", rate))
        except BaseException:
            progress(f"--- server log (tail) ---\n{server.log_tail()}")
            raise
        finally:
            server.stop()

    base = results[0][2]
    print(f"score benchmark: {args.rows:,} iris rows ({size_mb:.0f} MB CSV), iris v"
          f"{args.version}, {os.cpu_count()} CPUs; wall time of the whole job")
    print(f"{'path':<30} {'processes':>10} {'rows/s':>12} {'x 1 process':>12}")
    for name, procs, rows_s in results:
        print(f"{name:<30} {procs:>10} {rows_s:>12,.0f} {rows_s / base:>12.2f}")
    print(f"dask output identical to the single-process output: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
