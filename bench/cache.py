"""``python -m bench.cache``: what the prediction cache buys, in numbers (no target yet).

Starts a real ``redis-server`` and four gunicorn servers on free loopback ports, each with
WORKERS=2 and gevent workers over the demo repository: the bare Flask app of
bench/bare_app.py (the framework ceiling), ours with CACHE=off (the no-cache baseline), ours
with REDIS_URL (Redis cache) and ours with the per-worker memory cache. ``wrk`` drives
``POST /predict`` for iris v1 (LogisticRegression) and v2 (100-tree RandomForest):

- miss: a Lua counter builds a row no request of the whole benchmark sent before, so every
  lookup misses (the price of the cache: lookup + predict + store);
- hit: 30 rows, warmed into the cache right before the round, so ~every lookup hits;
- no cache: the CACHE=off server with the same never-repeating rows as the miss path.

Hits and misses are read from every worker's ``GET /status`` before and after each round
and the observed hit ratio is printed. Results also go to bench/results/cache-<timestamp>.json.

    python -m bench.cache [--duration 5] [--connections 8,64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from bench.core import (
    RESULTS_DIR,
    ROOT,
    Measurement,
    Server,
    TargetT,
    WrkRun,
    _terminate,
    free_port,
    iris_like_rows,
    load_parser,
    lua_script,
    machine,
    ms,
    parsed,
    post,
    progress,
    run_wrk,
    serving,
    stop_process,
)
from server.jobs.demo import write_demo

HIT_ROWS = 30  # distinct rows of the hit path (issue 23: the same 30 rows repeated)
BASE_ROWS = 1000  # iris-like rows the miss script makes unique with a run id and a counter
SEED = 11  # not core's seed: these rows need not match bench.core's
VERSIONS = {"1": "v1 LR", "2": "v2 RF100"}
SERVER_NAMES = ("bare", "nocache", "redis", "memory")
BACKEND = {"nocache": "off", "redis": "redis", "memory": "memory"}  # /status cache.backend


# --- What is measured -----------------------------------------------------------------------
@dataclass(frozen=True)
class CacheTarget:
    """One server, model version and row pattern under load."""

    name: str  # as printed in the table
    mode: str  # "ceiling", "no cache", "miss" or "hit"
    server: str  # one of SERVER_NAMES
    version: str  # iris version in the body
    script: str  # Lua file in the temp dir

    @property
    def cached(self) -> bool:
        return self.server in ("redis", "memory")


def make_targets() -> tuple[CacheTarget, ...]:
    targets = [CacheTarget("bare /predict", "ceiling", "bare", "1", "miss-v1.lua")]
    for v, label in VERSIONS.items():
        targets.append(CacheTarget(f"no-cache {label}", "no cache", "nocache", v,
                                   f"miss-v{v}.lua"))
        for backend in ("redis", "memory"):
            for mode in ("miss", "hit"):
                targets.append(CacheTarget(f"{backend} {label}", mode, backend, v,
                                           f"{mode}-v{v}.lua"))
    return tuple(targets)


TARGETS = make_targets()


@dataclass
class LookupMeasurement(Measurement[TargetT]):
    """core's best-of-rounds plus, per round, the hits and misses the workers counted
    (None when a worker's /status could not be read before and after). bench.peers uses it
    for its cache-hit target too."""

    lookups: list[dict[str, int] | None] = field(default_factory=list)

    @property
    def hit_ratio(self) -> float | None:
        """Hits over lookups, over all rounds: a bad round must not hide behind the best."""
        known = [x for x in self.lookups if x is not None]
        if not known or len(known) != len(self.lookups):
            return None
        hits = sum(x["hits"] for x in known)
        total = hits + sum(x["misses"] for x in known)
        return hits / total if total else None


CacheMeasurement = LookupMeasurement[CacheTarget]


# --- Load generation ------------------------------------------------------------------------
def miss_script(bases: np.ndarray, version: str) -> str:
    """A wrk script whose every request carries a row never sent before in this benchmark.

    Each base row is formatted with 2 decimals (like the data set); feature 0 gets the run id
    (args[1]) appended as 5 more digits and feature 1 a per-run counter as 8 more: 5.10 in run
    3, request 42 is sent as 5.1000003 and e.g. 3.5000000042. Both suffixes add < 0.01, so
    rows of different bases or runs or requests never share the same float64 bytes (the cache
    key) while staying real-looking flowers."""
    table = ",\n".join("{" + ",".join(f'"{x:.2f}"' for x in row) + "}" for row in bases)
    return f"""-- Written by bench/cache.py: a row no request sent before, on every request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bases = {{
{table}
}}
local run = 0
local n = 0
local fmt = '{{"model":"iris","version":"{version}","features":[%s%05d,%s%08d,%s,%s]}}'

function init(args)
  run = tonumber(args[1]) or 0
end

function request()
  local b = bases[n % #bases + 1]
  n = n + 1
  return wrk.format(nil, nil, nil, string.format(fmt, b[1], run, b[2], n, b[3], b[4]))
end
"""


def write_scripts(folder: Path) -> np.ndarray:
    """Write the miss and hit scripts of both versions; return the hit rows."""
    rows = iris_like_rows(BASE_ROWS + HIT_ROWS, seed=SEED)
    bases, hot = rows[:BASE_ROWS], rows[BASE_ROWS:]
    for version in VERSIONS:
        (folder / f"miss-v{version}.lua").write_text(miss_script(bases, version))
        bodies = [orjson.dumps({"model": "iris", "version": version, "features": r.tolist()})
                  for r in hot]
        (folder / f"hit-v{version}.lua").write_text(
            lua_script(bodies, f"cycles through {HIT_ROWS} rows, warmed into the cache first"))
    return hot


class RunIds:
    """Run ids for the miss script: a new one for every wrk run, so no run repeats a row."""

    def __init__(self) -> None:
        self.last = 0

    def next(self) -> list[str]:
        self.last += 1
        if self.last >= 100_000:  # 5 digits in the Lua format
            raise RuntimeError("too many wrk runs for the miss script's run id")
        return [str(self.last)]


# --- Redis ----------------------------------------------------------------------------------
class RedisServer:
    """A throwaway redis-server on a free port, no persistence, stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.log = workdir / "redis.log"
        self.argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                     "--daemonize", "no"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.dir, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not come up:\n{self.log_tail()}")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stats(self) -> dict[str, int]:
        info = self.client().info()
        return {"keyspace_hits": int(info["keyspace_hits"]),
                "keyspace_misses": int(info["keyspace_misses"]),
                "keys": int(self.client().dbsize()),
                "used_memory": int(info["used_memory"])}

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


# --- Cache counters -------------------------------------------------------------------------
def worker_pids(server: Server) -> set[int]:
    """The gunicorn master's children (its workers), from /proc."""
    if server.proc is None:
        return set()
    master = server.proc.pid
    children = Path(f"/proc/{master}/task/{master}/children")
    if children.exists():
        return {int(p) for p in children.read_text().split()}
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == master:
            pids.add(int(stat.parent.name))
    return pids


def _status(url: str) -> dict[str, Any]:
    # urllib sends Connection: close, so every call is a new connection the kernel can hand
    # to either worker.
    with urllib.request.urlopen(url + "/status", timeout=10) as answer:
        body: dict[str, Any] = orjson.loads(answer.read())
    return body


def cache_counters(server: Server, tries: int = 40) -> dict[int, dict[str, Any]] | None:
    """Every worker's /status cache figures, keyed by worker PID; None if some worker did
    not answer. /status is per worker, so it is asked over fresh connections, in parallel
    bursts, until each worker has answered."""
    want = worker_pids(server)
    seen: dict[int, dict[str, Any]] = {}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(tries):
            for body in pool.map(_status, [server.url] * 8):
                seen[int(body["pid"])] = body["cache"]
            if want and want <= seen.keys():
                return {pid: seen[pid] for pid in want}
    return None


def hit_note(seen: dict[str, int] | None) -> str:
    """", hit ratio 0.9987" for a progress line ("?" when nothing was counted)."""
    total = sum(seen.values()) if seen else 0
    return ", hit ratio " + (f"{seen['hits'] / total:.4f}" if seen and total else "?")


def lookups_between(before: dict[int, dict[str, Any]] | None,
                    after: dict[int, dict[str, Any]] | None) -> dict[str, int] | None:
    """Hits and misses counted by all workers between two snapshots (None if a worker was
    missed or replaced in between)."""
    if before is None or after is None or before.keys() != after.keys():
        return None
    return {k: sum(int(after[p][k]) - int(before[p][k]) for p in after)
            for k in ("hits", "misses")}


# --- Checks ---------------------------------------------------------------------------------
def check_servers(servers: dict[str, Server], hot: np.ndarray) -> None:
    """Before any load: each server answers a predict of both versions, each of ours runs
    the cache backend it should, and Redis really stores (the second call is a HIT)."""
    for name, server in servers.items():
        if name != "bare":
            backend = _status(server.url)["cache"]
            if backend.get("backend") != BACKEND[name] or backend.get("state") not in ("ok", "off"):
                raise RuntimeError(f"{name}: unexpected cache state {backend}")
        for version in VERSIONS:
            body = orjson.dumps({"model": "iris", "version": version,
                                 "features": hot[0].tolist()})
            answers = []
            for _ in range(2):
                try:
                    with urllib.request.urlopen(post(server.url + "/predict", body),
                                                timeout=30) as answer:
                        answers.append((answer.headers.get("X-Cache"),
                                        orjson.loads(answer.read())))
                except urllib.error.HTTPError as exc:
                    raise RuntimeError(f"{name} v{version}: {exc.code} "
                                       f"{exc.read()[:500]!r}") from exc
            if any("prediction" not in b for _, b in answers):
                raise RuntimeError(f"{name} v{version}: unexpected answer {answers}")
            if name == "redis" and answers[1][0] != "HIT":
                raise RuntimeError(f"redis v{version}: second identical predict was "
                                   f"{answers[1][0]}, not HIT: is Redis reachable?")


# --- Report ---------------------------------------------------------------------------------
def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def baselines(measurements: list[CacheMeasurement]) -> tuple[dict[int, float],
                                                             dict[tuple[str, int], float]]:
    bare = {m.connections: m.best.requests_per_s for m in measurements
            if m.target.server == "bare"}
    nocache = {(m.target.version, m.connections): m.best.requests_per_s for m in measurements
               if m.target.server == "nocache"}
    return bare, nocache


def table(measurements: list[CacheMeasurement]) -> str:
    bare, nocache = baselines(measurements)
    head = (f"{'target':<17} {'mode':<8} {'conns':>5} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'errors':>6} {'hit ratio':>9} {'vs no-cache':>11} {'vs bare':>7}")
    lines = [head, "-" * len(head)]
    for m in measurements:
        best, t = m.best, m.target
        hits = "-" if not t.cached else (
            "?" if m.hit_ratio is None else f"{m.hit_ratio:.4f}")
        vs_nocache = "-" if t.server in ("bare", "nocache") else ratio(
            best.requests_per_s, nocache.get((t.version, m.connections)))
        vs_bare = "-" if t.server == "bare" else ratio(best.requests_per_s,
                                                       bare.get(m.connections))
        lines.append(f"{t.name:<17} {t.mode:<8} {m.connections:>5} {best.requests_per_s:>8.0f} "
                     f"{ms(best.p50_ms):>8} {ms(best.p99_ms):>8} {m.errors:>6} {hits:>9} "
                     f"{vs_nocache:>11} {vs_bare:>7}")
    return "\n".join(lines)


def as_json(measurements: list[CacheMeasurement], settings: dict[str, Any],
            redis_stats: dict[str, Any]) -> dict[str, Any]:
    bare, nocache = baselines(measurements)
    results = []
    for m in measurements:
        best, t = m.best, m.target
        entry: dict[str, Any] = {
            "target": t.name, "mode": t.mode, "server": t.server, "path": "/predict",
            "model": "iris", "version": t.version, "connections": m.connections,
            "requests_per_s": best.requests_per_s, "p50_ms": best.p50_ms, "p99_ms": best.p99_ms,
            "errors": m.errors, "rounds": [asdict(r) for r in m.runs],
        }
        if t.cached:
            entry["hit_ratio"] = m.hit_ratio
            entry["lookups_per_round"] = m.lookups
            if nocache.get((t.version, m.connections)):
                entry["vs_no_cache"] = best.requests_per_s / nocache[t.version, m.connections]
        if t.server != "bare" and bare.get(m.connections):
            entry["vs_bare"] = best.requests_per_s / bare[m.connections]
        results.append(entry)
    return {
        "benchmark": "cache",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": settings,
        "redis": redis_stats,
        "results": results,
    }


# --- Main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parsed(load_parser(
        "python -m bench.cache", __doc__, 5,
        "seconds of unrecorded load per target before measuring, and of cache warming "
        "before every hit round (at least 1) [1]"), argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool, package in (("wrk", "wrk"), ("redis-server", "redis-server")):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install it with `apt-get install {package}`",
                  file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _terminate)

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        models = work / "models"
        progress(f"writing the demo repository into {models}")
        write_demo(models)
        hot = write_scripts(work)
        run_ids = RunIds()

        store = RedisServer(work)
        ours = {"MODEL_DIR": str(models)}
        servers = {
            "bare": Server("bare", "bench.bare_app:app", work, {}),
            "nocache": Server("nocache", "wsgi:app", work, ours | {"CACHE": "off"}),
            "redis": Server("redis", "wsgi:app", work, ours | {"REDIS_URL": store.url}),
            "memory": Server("memory", "wsgi:app", work, ours | {"CACHE": "on"}),
        }
        measurements = {(t, c): CacheMeasurement(t, c) for c in args.connections
                        for t in TARGETS}
        redis_stats: dict[str, Any] = {}
        warm_s = max(1, args.warmup)

        def load(t: CacheTarget, connections: int, seconds: int) -> WrkRun:
            extra = run_ids.next() if t.script.startswith("miss-") else []
            return run_wrk(servers[t.server].url + "/predict", work / t.script, connections,
                           seconds, args.timeout, extra)

        def redis_log() -> None:
            progress(f"--- redis-server log (tail) ---\n{store.log_tail()}")

        with serving(servers, redis_log, store.stop):
            progress(f"starting redis-server on port {store.port}")
            store.start()  # before our servers: the Redis one checks it at start
            for server in servers.values():
                server.start()
            for name, server in servers.items():
                if name == "bare":
                    server.wait_until_up(post(server.url + "/predict", b"{}"))
                else:
                    server.wait_until_up(urllib.request.Request(server.url + "/ready"))
            check_servers(servers, hot)
            redis_stats["before"] = store.stats()

            if args.warmup:
                progress(f"warming up, {args.warmup} s per target")
                for t in TARGETS:
                    load(t, max(args.connections), args.warmup)

            # Rounds outermost, as in bench.core: a slow minute on the machine hurts one round
            # of every target instead of every round of one target.
            for round_no in range(1, args.rounds + 1):
                for c in args.connections:
                    for t in TARGETS:
                        m = measurements[t, c]
                        if t.mode == "hit":
                            # Warm right before the round: the miss rounds in between may
                            # have pushed the hot rows out of a bounded cache.
                            load(t, max(args.connections), warm_s)
                        before = cache_counters(servers[t.server]) if t.cached else None
                        run = load(t, c, args.duration)
                        m.runs.append(run)
                        note = ""
                        if t.cached:
                            seen = lookups_between(before, cache_counters(servers[t.server]))
                            m.lookups.append(seen)
                            note = hit_note(seen)
                        progress(f"round {round_no}/{args.rounds} {t.name} {t.mode} c={c}: "
                                 f"{run.requests_per_s:.0f} req/s, p99 {ms(run.p99_ms)} ms, "
                                 f"{run.errors} errors{note}")
            redis_stats["after"] = store.stats()

    ordered = [measurements[t, c] for t in TARGETS for c in args.connections]
    settings = {"duration_s": args.duration, "connections": args.connections,
                "rounds": args.rounds, "warmup_s": args.warmup, "hit_warm_s": warm_s,
                "timeout_s": args.timeout, "workers": 2, "wrk_threads": 1,
                "hit_distinct_rows": HIT_ROWS, "miss_base_rows": BASE_ROWS,
                "redis": "redis-server --save '' --appendonly no", "cache_ttl_s": 3600,
                "memory_cache_max_mb_per_worker": 64}
    print(f"cache benchmark: {os.cpu_count()} CPUs, 2 gevent workers per server, "
          f"wrk -t1, {args.duration} s x {args.rounds} rounds (best kept), "
          f"hit ratio over all rounds from the workers' /status")
    print(table(ordered))

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(as_json(ordered, settings, redis_stats),
                                  option=orjson.OPT_INDENT_2))
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
