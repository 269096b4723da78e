"""``python -m bench.stream``: rows/s of ``POST /predict/stream`` against ``POST
/predict/batch`` on the same rows, in one run, same server (cache off, 2 gevent workers).

The stream sends all rows in one request and reads every SSE event; the batch path sends
them as MAX_BATCH-row requests, one after another and then from 4 client threads. Each
figure is the best of ``--rounds``.

    python -m bench.stream [--rows 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import requests

from bench.core import demo_server, iris_like_rows


def stream_rows_per_s(url: str, rows: list[list[float]], version: str) -> float:
    body = orjson.dumps({"model": "iris", "version": version, "instances": rows})
    t0 = time.perf_counter()
    with requests.post(url + "/predict/stream", data=body, stream=True, timeout=600,
                       headers={"Content-Type": "application/json"}) as resp:
        events = sum(chunk.count(b"\ndata: {\"index\"") + chunk.startswith(b"data: {\"index\"")
                     for chunk in resp.iter_content(1 << 16))
    elapsed = time.perf_counter() - t0
    assert events >= len(rows) * 0.99, events  # chunk edges may split a marker, rarely
    return len(rows) / elapsed


def batch_rows_per_s(url: str, rows: list[list[float]], version: str, threads: int) -> float:
    bodies = [orjson.dumps({"model": "iris", "version": version,
                            "instances": rows[i : i + 1000]}) for i in range(0, len(rows), 1000)]

    def send(body: bytes) -> None:
        resp = requests.post(url + "/predict/batch", data=body, timeout=120,
                             headers={"Content-Type": "application/json"})
        resp.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, bodies))
    return len(rows) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with demo_server("bench-stream-", CACHE="off", STREAM_MAX_ROWS="1000000") as server:
        rows = iris_like_rows(args.rows).tolist()
        print(f"stream vs batch: {args.rows} iris rows, best of {args.rounds}, cache off")
        print(f"{'model':<12}{'stream rows/s':>15}{'batch x1':>12}{'batch x4':>12}"
              f"{'stream/batch x1':>17}")
        for version, label in (("1", "v1 LR"), ("2", "v2 RF100")):
            stream = max(stream_rows_per_s(server.url, rows, version)
                         for _ in range(args.rounds))
            one = max(batch_rows_per_s(server.url, rows, version, 1)
                      for _ in range(args.rounds))
            four = max(batch_rows_per_s(server.url, rows, version, 4)
                       for _ in range(args.rounds))
            print(f"{label:<12}{stream:>15,.0f}{one:>12,.0f}{four:>12,.0f}"
                  f"{stream / one:>17.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
