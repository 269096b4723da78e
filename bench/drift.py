"""``python -m bench.drift``: what live drift monitoring costs, side by side in one run.

Two of our servers over the same demo repository, cache off, prediction log off, 2 gevent
workers each: ``DRIFT=off`` (the baseline) and ``DRIFT=on`` (the default settings: every
version of the demo has a profile). ``wrk`` sends single iris v1 (LogisticRegression)
predictions that cycle through 1,000 distinct rows at 64 connections, rounds interleaved,
best round kept; the drift-on server is printed as a ratio of the drift-off one (the issue's
target: at most 5 % fewer req/s, i.e. ratio >= 0.95), with the rows its drift answer counted
and served in the window at the end (above DRIFT_SAMPLE_ROWS_PER_SECOND per worker a second's
further rows are served but not counted).

    python -m bench.drift [--duration 10] [--connections 64] [--rounds 3]
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from bench.core import (
    RESULTS_DIR,
    ROOT,
    Server,
    load_parser,
    ms,
    parsed,
    ready_to_load,
    serving,
    side_by_side,
    write_scripts,
)
from server.jobs.demo import write_demo

SCRIPT = "predict-v1.lua"
TARGET_RATIO = 0.95


def _drift(server: Server) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(server.url + "/models/iris/versions/1/drift",
                                    timeout=5) as answer:
            return dict(orjson.loads(answer.read()))
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = load_parser("python -m bench.drift", __doc__, 10)
    parser.set_defaults(connections="64", rounds=3)
    args = parsed(parser, argv)
    if not ready_to_load():
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        work = Path(tmp)
        models = work / "models"
        write_demo(models)
        write_scripts(work)
        servers = {name: Server(name.replace(" ", "-"), "wsgi:app", work, {
            "MODEL_DIR": str(models), "CACHE": "off", "PREDICTION_LOG": "off", "DRIFT": drift})
            for name, drift in (("drift off", "off"), ("drift on", "on"))}
        with serving(servers):
            measurements = side_by_side(servers, work / SCRIPT, args)
            time.sleep(1.5)  # the workers' last flush
            answer = _drift(servers["drift on"])

    print(f"drift monitoring cost: {os.cpu_count()} CPUs, 2 gevent workers per server, cache "
          f"and prediction log off, iris v1 LR single predicts, wrk -t1, {args.duration} s x "
          f"{args.rounds} rounds (best kept); target: ratio >= {TARGET_RATIO}")
    print("| server | connections | req/s | vs drift off | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    out: list[dict[str, Any]] = []
    for c in args.connections:
        base = measurements["drift off", c].best.requests_per_s
        for name in servers:
            m = measurements[name, c]
            b = m.best
            ratio = b.requests_per_s / base if base else 0.0
            print(f"| {name} | {c} | {b.requests_per_s:,.0f} | {ratio:.3f} | {ms(b.p50_ms)} | "
                  f"{ms(b.p99_ms)} | {m.errors} |")
            out.append({"server": name, "connections": c, "ratio": ratio,
                        "runs": [r.__dict__ for r in m.runs]})
    if answer is not None:
        print(f"drift on, iris v1 in the window: {answer.get('rows'):,} rows counted of "
              f"{answer.get('rows_served'):,} served, status {answer.get('status')}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"drift-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps({"results": out, "drift": answer},
                                  option=orjson.OPT_INDENT_2))
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
