"""``python -m bench.compression``: what gzip costs and saves on batch answers, measured in
one process against the same requests without it (the baseline of the same run).

For 10-, 100- and 1,000-row iris batches (probability maps included) it prints the answer's
bytes plain and gzip, and requests per second through the app with ``Accept-Encoding:
identity`` and ``gzip``, best of several rounds (this machine is noisy). The app is called
in-process (Flask's test client): what is measured is the app's own work per answer, not
the network it saves.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

ROUNDS = 5


def main() -> int:
    import numpy as np
    from sklearn.datasets import load_iris

    from server import create_app
    from server.config import Settings
    from server.jobs.demo import write_demo

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo(repo)
        app = create_app(Settings(model_dir=repo, cache="off", model_poll_seconds=0,
                                  runtime_dir=str(Path(tmp) / "run"), log_level="WARNING"))
        client = app.test_client()
        rng = np.random.default_rng(1)
        print("| rows | plain bytes | gzip bytes | size ratio | plain req/s | gzip req/s | "
              "speed ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for rows in (10, 100, 1000):
            # varied rows, so that answers differ as real traffic's do (equal rows would
            # compress far better than anything a client sends)
            X = load_iris().data[rng.integers(0, 150, rows)] + rng.normal(0, 0.3, (rows, 4))
            body = json.dumps({"model": "iris", "version": "2",
                               "instances": X.round(3).tolist()})
            sizes, rates = {}, {}
            for coding in ("identity", "gzip"):
                headers = {"Content-Type": "application/json", "Accept-Encoding": coding}
                sizes[coding] = len(client.post("/predict/batch", data=body,
                                                headers=headers).data)
                best = 0.0
                for _ in range(ROUNDS):
                    n, started = 0, time.perf_counter()
                    while time.perf_counter() - started < 0.5:
                        client.post("/predict/batch", data=body, headers=headers)
                        n += 1
                    best = max(best, n / (time.perf_counter() - started))
                rates[coding] = best
            print(f"| {rows} | {sizes['identity']:,} | {sizes['gzip']:,} | "
                  f"{sizes['gzip'] / sizes['identity']:.3f} | {rates['identity']:,.0f} | "
                  f"{rates['gzip']:,.0f} | {rates['gzip'] / rates['identity']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
