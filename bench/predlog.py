"""``python -m bench.predlog``: what the prediction log costs, side by side in one run.

Three of our servers over the same demo repository, cache off, 2 gevent workers each: the
log off (the baseline), the SQLite log (the default) and, when PostgreSQL is installed, the
log on a PostgreSQL started for the run. ``wrk`` sends single iris v1 (LogisticRegression)
predictions that cycle through 1,000 distinct rows at 64 connections, rounds interleaved,
best round kept; each log-on server is printed as a ratio of the log-off one (the issue's
target: within 10 %, i.e. ratio >= 0.90), with the rows each log holds at the end.

    python -m bench.predlog [--duration 10] [--connections 64] [--rounds 3]
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.core import (
    RESULTS_DIR,
    ROOT,
    Server,
    load_parser,
    ms,
    parsed,
    progress,
    ready_to_load,
    serving,
    side_by_side,
    write_scripts,
)
from server.jobs.demo import write_demo

SCRIPT = "predict-v1.lua"


def _postgres(work: Path) -> tuple[object, str] | None:
    """A PostgreSQL of the run's own (tests/conftest.py's), or None when not installed."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.conftest import PostgresServer

        pg = PostgresServer().start()
    except Exception as exc:  # noqa: BLE001 - the run goes on without it, and says so
        progress(f"PostgreSQL left out: {exc}")
        return None
    return pg, pg.url


def _rows_logged(url: str) -> int | None:
    try:
        if url.startswith("sqlite:///"):
            with sqlite3.connect(url[len("sqlite:///"):]) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
        import psycopg

        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()
            return int(row[0]) if row else None
    except Exception:  # noqa: BLE001 - a figure for the table only
        return None


def main(argv: list[str] | None = None) -> int:
    parser = load_parser("python -m bench.predlog", __doc__, 10)
    parser.set_defaults(connections="64", rounds=3)
    args = parsed(parser, argv)
    if not ready_to_load():
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-predlog-") as tmp:
        work = Path(tmp)
        models = work / "models"
        write_demo(models)
        write_scripts(work)
        logs = {"log off": "off", "SQLite log": f"sqlite:///{work / 'log.db'}"}
        pg = _postgres(work)
        if pg is not None:
            logs["PostgreSQL log"] = pg[1]
        servers = {name: Server(name.replace(" ", "-"), "wsgi:app", work,
                                {"MODEL_DIR": str(models), "CACHE": "off", "PREDICTION_LOG": url})
                   for name, url in logs.items()}
        try:
            with serving(servers):
                measurements = side_by_side(servers, work / SCRIPT, args)
                time.sleep(1.0)  # the last flush
                held = {name: _rows_logged(url) for name, url in logs.items() if url != "off"}
        finally:
            if pg is not None:
                pg[0].stop()  # type: ignore[attr-defined]
                pg[0].remove()  # type: ignore[attr-defined]

    print(f"prediction log cost: {os.cpu_count()} CPUs, 2 gevent workers per server, cache off, "
          f"iris v1 LR single predicts, wrk -t1, {args.duration} s x {args.rounds} rounds "
          "(best kept)")
    print("| server | connections | req/s | vs log off | p50 ms | p99 ms | errors | rows logged |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    out = []
    for c in args.connections:
        base = measurements["log off", c].best.requests_per_s
        for name in servers:
            m = measurements[name, c]
            b = m.best
            ratio = b.requests_per_s / base if base else 0.0
            rows = held.get(name)
            print(f"| {name} | {c} | {b.requests_per_s:,.0f} | {ratio:.2f} | {ms(b.p50_ms)} | "
                  f"{ms(b.p99_ms)} | {m.errors} | {'-' if rows is None else f'{rows:,}'} |")
            out.append({"server": name, "connections": c, "ratio": ratio, "rows_logged": rows,
                        "runs": [r.__dict__ for r in m.runs]})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"predlog-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
