"""``python -m bench.protocols``: rows/s of 1000-row batches through the native JSON
``/predict/batch``, the V2 infer endpoint with JSON tensors, and V2 with the binary tensor
extension (binary in and out), against one server in one run (cache off, 2 workers).

Bodies are built before timing; 4 client threads on keep-alive sessions; best of rounds.

    python -m bench.protocols [--requests 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import requests

from bench.core import demo_server, iris_like_rows

ROWS = 1000


def bodies(version: str, count: int) -> dict[str, list[tuple[bytes, dict[str, str]]]]:
    out: dict[str, list[tuple[bytes, dict[str, str]]]] = {"native JSON": [], "V2 JSON": [],
                                                          "V2 binary": []}
    for i in range(count):
        X = iris_like_rows(ROWS, seed=100 + i)
        out["native JSON"].append((orjson.dumps({"model": "iris", "version": version,
                                                 "instances": X.tolist()}),
                                   {"Content-Type": "application/json"}))
        out["V2 JSON"].append((orjson.dumps({"inputs": [{
            "name": "input-0", "shape": [ROWS, 4], "datatype": "FP64", "data": X.tolist()}],
            "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}),
            {"Content-Type": "application/json"}))
        head = json.dumps({"inputs": [{"name": "input-0", "shape": [ROWS, 4], "datatype": "FP64",
                                       "parameters": {"binary_data_size": X.nbytes}}],
                           "outputs": [{"name": "predict", "parameters": {"binary_data": True}},
                                       {"name": "predict_proba",
                                        "parameters": {"binary_data": True}}]}).encode()
        out["V2 binary"].append((head + np.ascontiguousarray(X, "<f8").tobytes(),
                                 {"Inference-Header-Content-Length": str(len(head))}))
    return out


def rows_per_s(url: str, work: list[tuple[bytes, dict[str, str]]], requests_n: int) -> float:
    local = threading.local()

    def send(i: int) -> None:
        session: requests.Session = getattr(local, "s", None) or requests.Session()
        local.s = session
        body, headers = work[i % len(work)]
        resp = session.post(url, data=body, headers=headers, timeout=60)
        resp.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, range(requests_n)))
    return requests_n * ROWS / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with demo_server("bench-protocols-", CACHE="off") as server:
        print(f"1000-row batches, {args.requests} requests x best of {args.rounds}, "
              "4 client threads, cache off")
        print(f"{'model':<10}{'mode':<14}{'rows/s':>12}{'vs native':>11}")
        for version, label in (("1", "v1 LR"), ("2", "v2 RF100")):
            per_mode = bodies(version, 8)
            urls: dict[str, str] = {
                "native JSON": server.url + "/predict/batch",
                "V2 JSON": f"{server.url}/v2/models/iris/versions/{version}/infer",
                "V2 binary": f"{server.url}/v2/models/iris/versions/{version}/infer",
            }
            best: dict[str, float] = {m: 0.0 for m in per_mode}
            for _ in range(args.rounds):  # interleaved rounds: noise hits every mode
                for mode, work_items in per_mode.items():
                    best[mode] = max(best[mode],
                                     rows_per_s(urls[mode], work_items, args.requests))
            for mode, value in best.items():
                print(f"{label:<10}{mode:<14}{value:>12,.0f}"
                      f"{value / best['native JSON']:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
