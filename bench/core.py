"""``python -m bench.core``: where the serving core stands, in numbers (no target yet).

Starts two servers on free loopback ports with the same gunicorn.conf.py and gevent workers:
ours (``wsgi:app`` over the demo repository, cache off) and the bare Flask app of
bench/bare_app.py (the framework ceiling). ``wrk`` drives each endpoint from its own process
with Lua scripts that cycle through distinct feature rows, so no cache can help. Printed:
req/s, p50/p99 latency and errors per endpoint and connection count, our single predicts as
a fraction of the bare ceiling, and batch rows/s as a fraction of the model's own in-process
``predict_proba`` speed. Results also go to bench/results/core-<timestamp>.json.

    python -m bench.core [--duration 10] [--connections 8,64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar

import joblib
import numpy as np
import orjson
from sklearn import datasets

from server.config import Settings
from server.jobs.demo import write_demo

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

SINGLE_ROWS = 1000  # distinct rows the single-predict scripts cycle through
BATCH_ROWS = 1000  # rows in one /predict/batch body (the server's default MAX_BATCH)
BATCH_BODIES = 16  # distinct batch bodies, each with rows no other body has
SEED = 7

# wrk prints latencies with these units (its format_time switches to s, m, h above 1 s).
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
PERCENTILE_RE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
RATE_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
COUNT_RE = re.compile(r"^\s*(\d+) requests in ", re.M)
SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
NON2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")


# --- What is measured -----------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One endpoint under load."""

    name: str  # as printed in the table
    server: str  # "bare" or "ours"
    path: str
    script: str  # Lua file in the temp dir
    rows: int  # rows per request
    version: str  # iris version the body names (and the in-process baseline for batches)

    @property
    def is_batch(self) -> bool:
        return self.rows > 1


TARGETS = (
    Target("bare /predict", "bare", "/predict", "predict-v1.lua", 1, "1"),
    Target("predict iris v1 LR", "ours", "/predict", "predict-v1.lua", 1, "1"),
    Target("predict iris v2 RF100", "ours", "/predict", "predict-v2.lua", 1, "2"),
    Target(f"batch iris v1 x{BATCH_ROWS}", "ours", "/predict/batch", "batch-v1.lua",
           BATCH_ROWS, "1"),
    Target(f"batch iris v2 x{BATCH_ROWS}", "ours", "/predict/batch", "batch-v2.lua",
           BATCH_ROWS, "2"),
)


@dataclass
class WrkRun:
    """What one wrk run reported."""

    requests_per_s: float
    p50_ms: float | None  # None when no request was answered within the run
    p99_ms: float | None
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


TargetT = TypeVar("TargetT")


@dataclass
class Measurement(Generic[TargetT]):
    """All rounds of one target at one connection count; the best round is the figure.
    Generic over the target type so that other benchmarks (bench/cache.py) share it."""

    target: TargetT
    connections: int
    runs: list[WrkRun] = field(default_factory=list)

    @property
    def best(self) -> WrkRun:
        # The best round is the one least disturbed by everything else on the machine.
        return max(self.runs, key=lambda r: r.requests_per_s)

    @property
    def errors(self) -> int:
        # Errors are summed over every round: keeping the best round must never hide one.
        return sum(r.errors for r in self.runs)


# --- Load generation ------------------------------------------------------------------------
def iris_like_rows(count: int, seed: int = SEED) -> np.ndarray:
    """``count`` distinct rows near real flowers: a random iris row plus noise of a tenth of
    each feature's spread, rounded to 2 decimals like the data set and kept positive."""
    rng = np.random.default_rng(seed)
    iris = np.asarray(datasets.load_iris().data, dtype="<f8")
    spread = iris.std(axis=0)
    rows = np.empty((0, iris.shape[1]))
    while len(rows) < count:
        picks = iris[rng.integers(0, len(iris), count)]
        noisy = np.round(np.clip(picks + rng.normal(0, 0.1, picks.shape) * spread, 0.1, None), 2)
        rows = np.unique(np.vstack([rows, noisy]), axis=0)  # distinct, so no cache can help
    rng.shuffle(rows)  # np.unique sorted them; sorted rows would be friendlier than real ones
    return rows[:count]


def lua_script(bodies: list[bytes],
               comment: str = "cycles through distinct bodies so no cache can help") -> str:
    """A wrk script that sends ``bodies`` in turn, one per request, forever."""
    # [=[ ... ]=] is a Lua long string: JSON never contains "]=]" (it may contain "]]").
    table = ",\n".join(f"[=[{b.decode()}]=]" for b in bodies)
    return f"""-- Written by bench/core.py: {comment}.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {{
{table}
}}
local requests = {{}}
local i = 0

-- Build every request once, so wrk spends its CPU on sending, not on Lua string work.
function init(args)
  for k = 1, #bodies do
    requests[k] = wrk.format(nil, nil, nil, bodies[k])
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end
"""


def write_scripts(folder: Path) -> np.ndarray:
    """Write the Lua scripts of every target; return the first batch body's rows (the
    in-process baseline predicts exactly those)."""
    rows = iris_like_rows(SINGLE_ROWS + BATCH_ROWS * BATCH_BODIES)
    single, batched = rows[:SINGLE_ROWS], rows[SINGLE_ROWS:]
    chunks = [batched[k * BATCH_ROWS:(k + 1) * BATCH_ROWS] for k in range(BATCH_BODIES)]
    for version in ("1", "2"):
        predict = [orjson.dumps({"model": "iris", "version": version, "features": r.tolist()})
                   for r in single]
        batch = [orjson.dumps({"model": "iris", "version": version, "instances": c.tolist()})
                 for c in chunks]
        (folder / f"predict-v{version}.lua").write_text(lua_script(predict))
        (folder / f"batch-v{version}.lua").write_text(lua_script(batch))
    return chunks[0]


def parse_wrk(output: str) -> WrkRun:
    """req/s, p50, p99 (ms) and error counts from ``wrk --latency`` output."""
    percentiles = {p: float(v) * UNIT_MS[u] for p, v, u in PERCENTILE_RE.findall(output)}
    rate, count = RATE_RE.search(output), COUNT_RE.search(output)
    if rate is None or count is None or set(percentiles) != {"50", "99"}:
        raise ValueError(f"unexpected wrk output:\n{output}")
    # wrk prints these two lines only when their counts are not zero.
    sockets = SOCKET_RE.search(output)
    non_2xx = NON2XX_RE.search(output)
    counts = sockets.groups() if sockets else ("0",) * 4
    requests = int(count.group(1))
    return WrkRun(
        requests_per_s=float(rate.group(1)),
        # With no answer at all wrk prints 0 latencies; None keeps them out of any comparison.
        p50_ms=percentiles["50"] if requests else None,
        p99_ms=percentiles["99"] if requests else None,
        requests=requests,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors={n: int(v) for n, v in
                       zip(("connect", "read", "write", "timeout"), counts, strict=True)},
    )


def run_wrk(url: str, script: Path, connections: int, seconds: int, timeout: int,
            script_args: Sequence[str] = ()) -> WrkRun:
    """One wrk run; ``script_args`` reach the Lua script's ``init(args)`` as args[1], ..."""
    # One wrk thread: the machine's other cores are for the server under test.
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={timeout}s",
            "--latency", "-s", str(script), url]
    if script_args:
        argv += ["--", *script_args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout + 60,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


# --- In-process baseline --------------------------------------------------------------------
def in_process_rows_per_s(model_path: Path, X: np.ndarray, rounds: int,
                          seconds: float = 1.0) -> float:
    """Rows/s of the same work as a ``/predict/batch`` of ``X`` done in a loop in this
    process (best round), with no HTTP, validation, threads or logging around it: orjson
    decodes the request body, the model gives ``predict_proba`` (and the predicted class
    from it), and orjson encodes the answer our server gives, column by column with a
    probability map per row."""
    estimator = joblib.load(model_path)
    classes = [str(c) for c in estimator.classes_.tolist()]
    body = orjson.dumps({"model": "iris", "version": "1", "instances": X.tolist()})

    def once() -> bytes:
        rows = np.asarray(orjson.loads(body)["instances"], dtype=np.float64)
        proba = estimator.predict_proba(rows)
        idx = proba.argmax(axis=1).tolist()
        return orjson.dumps({
            "model": "iris", "version": "1", "count": len(idx),
            "predictions": [estimator.classes_[i].item() for i in idx],
            "labels": [classes[i] for i in idx],
            "confidences": proba[np.arange(len(idx)), idx].tolist(),
            "probabilities": [dict(zip(classes, r)) for r in proba.tolist()],
            "cached": 0, "request_id": "0" * 32})

    once()  # the first call pays for lazy imports and allocations
    best = 0.0
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            once()
            calls += 1
        best = max(best, calls * len(X) / elapsed)
    return best


# --- Servers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A gunicorn we start in its own session and stop by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, app: str, workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        runtime = workdir / f"runtime-{name}"  # else gunicorn.conf.py leaves a dir in /tmp
        runtime.mkdir()
        # The prediction log is on by default, as in production; into the temp dir.
        log = {"PREDICTION_LOG": f"sqlite:///{workdir / f'predictions-{name}.db'}"}
        self.env = clean_environ() | log | env | {
            "BIND": f"127.0.0.1:{self.port}", "WORKERS": "2", "RUNTIME_DIR": str(runtime),
            "PYTHONPATH": str(ROOT),
        }
        self.argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                     "--no-control-socket", app]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_up(self, probe: urllib.request.Request, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(probe, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server did not come up:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def clean_environ() -> dict[str, str]:
    """Our environment minus every server setting, so a shell's REDIS_URL or API_KEYS cannot
    change what is measured; the benchmark sets the ones it needs itself."""
    settings = {name.upper() for name in Settings.model_fields}
    return {k: v for k, v in os.environ.items() if k.upper() not in settings}


def post(url: str, body: bytes) -> urllib.request.Request:
    return urllib.request.Request(url, data=body, method="POST",
                                  headers={"Content-Type": "application/json"})


def check_answers(servers: dict[str, Server], X: np.ndarray) -> None:
    """One request per target before any load: a route answering 4xx would otherwise be
    'measured' at full speed and only show up in the errors column."""
    for target in TARGETS:
        rows = X[:target.rows].tolist()
        payload: dict[str, Any] = {"model": "iris", "version": target.version}
        payload |= {"instances": rows} if target.is_batch else {"features": rows[0]}
        url = servers[target.server].url + target.path
        try:
            with urllib.request.urlopen(post(url, orjson.dumps(payload)), timeout=30) as answer:
                body = orjson.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{target.name}: {exc.code} {exc.read()[:500]!r}") from exc
        expected = "count" if target.is_batch else "prediction"
        if expected not in body or (target.is_batch and body["count"] != target.rows):
            raise RuntimeError(f"{target.name}: unexpected answer {str(body)[:500]}")


# --- Report ---------------------------------------------------------------------------------
def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(measurements: list[Measurement[Target]], in_process: dict[str, float]) -> str:
    bare = {m.connections: m.best.requests_per_s for m in measurements
            if m.target.server == "bare"}
    head = (f"{'target':<22} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'errors':>6} {'vs bare':>7} {'rows/s':>9} {'vs in-proc':>10}")
    lines = [head, "-" * len(head)]
    for m in measurements:
        best, t = m.best, m.target
        if t.is_batch:
            rows_per_s = best.requests_per_s * t.rows
            vs_bare, rows, vs_proc = "-", f"{rows_per_s:9.0f}", ratio(rows_per_s,
                                                                      in_process[t.version])
        else:
            vs_bare, rows, vs_proc = ratio(best.requests_per_s, bare.get(m.connections)), "-", "-"
        lines.append(f"{t.name:<22} {m.connections:>5} {best.requests_per_s:>9.0f} "
                     f"{ms(best.p50_ms):>8} {ms(best.p99_ms):>8} {m.errors:>6} {vs_bare:>7} "
                     f"{rows:>9} {vs_proc:>10}")
    return "\n".join(lines)


def as_json(measurements: list[Measurement[Target]], in_process: dict[str, float],
            settings: dict[str, Any]) -> dict[str, Any]:
    bare = {m.connections: m.best.requests_per_s for m in measurements
            if m.target.server == "bare"}
    results = []
    for m in measurements:
        best, t = m.best, m.target
        entry: dict[str, Any] = {
            "target": t.name, "server": t.server, "path": t.path, "model": "iris",
            "version": t.version, "rows_per_request": t.rows, "connections": m.connections,
            "requests_per_s": best.requests_per_s, "p50_ms": best.p50_ms, "p99_ms": best.p99_ms,
            "errors": m.errors, "rounds": [asdict(r) for r in m.runs],
        }
        if t.is_batch:
            entry["rows_per_s"] = best.requests_per_s * t.rows
            entry["vs_in_process"] = entry["rows_per_s"] / in_process[t.version]
        elif t.server == "ours" and bare.get(m.connections):
            entry["vs_bare"] = best.requests_per_s / bare[m.connections]
        results.append(entry)
    return {
        "benchmark": "core",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": settings,
        "in_process_predict_proba_rows_per_s": {f"iris/{v}": r for v, r in in_process.items()},
        "results": results,
    }


def machine() -> dict[str, Any]:
    def output(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                                  check=False).stdout.strip()
        except OSError:
            return ""
    return {
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(),
        "wrk": (output("wrk", "-v").splitlines() or [""])[0],
        "commit": output("git", "rev-parse", "HEAD"),
        "dirty": bool(output("git", "status", "--porcelain", "--untracked-files=no")),
    }


# --- Main -----------------------------------------------------------------------------------
def load_parser(prog: str, doc: str | None, duration: int,
                warmup_help: str = "seconds of unrecorded load per target before measuring [1]"
                ) -> argparse.ArgumentParser:
    """The wrk options every load benchmark takes."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=duration,
                        help=f"seconds per wrk round [{duration}]")
    parser.add_argument("--connections", default="8,64",
                        help="comma list of wrk connection counts [8,64]")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per measurement; the best is kept [2]")
    parser.add_argument("--warmup", type=int, default=1, help=warmup_help)
    parser.add_argument("--timeout", type=int, default=10,
                        help="wrk request timeout in seconds [10]; wrk's default of 2 s would "
                             "count queued 1000-row batches at 64 connections as errors")
    return parser


def parsed(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, turn --connections into a list of ints, and check the numbers."""
    args = parser.parse_args(argv)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error("--connections takes a comma list of integers, e.g. 8,64")
    if not args.connections or min(args.connections) < 1 or args.duration < 1 \
            or args.rounds < 1 or args.warmup < 0:
        parser.error("connections, duration and rounds must be positive")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parsed(load_parser("python -m bench.core", __doc__, 10), argv)


@contextlib.contextmanager
def demo_server(prefix: str, **env: str) -> Iterator[Server]:
    """Our server over a fresh demo repository in a temp dir, up and ready, stopped after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        write_demo(work / "models")
        server = Server("ours", "wsgi:app", work, {"MODEL_DIR": str(work / "models"), **env})
        server.start()
        try:
            server.wait_until_up(urllib.request.Request(server.url + "/ready"))
            yield server
        finally:
            server.stop()


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM by PID, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def serving(servers: dict[str, Any], on_failure: Callable[[], None] | None = None,
            finally_: Callable[[], None] | None = None) -> Iterator[None]:
    """Around a benchmark's load: after a failure the servers' log tails (and whatever
    ``on_failure`` adds), and in every case every server stopped by PID, then ``finally_``."""
    try:
        yield
    except BaseException:
        show_logs(servers.values())
        if on_failure is not None:
            on_failure()
        raise
    finally:
        for server in servers.values():
            server.stop()
        if finally_ is not None:
            finally_()


def show_logs(servers: Iterable[Any]) -> None:
    """After a failure: the tail of every server's log, where the cause usually is."""
    for server in servers:
        progress(f"--- {server.name} server log (tail) ---\n{server.log_tail()}")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout keeps only the table


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: no gunicorn is left behind


def ready_to_load() -> bool:
    """wrk is installed (else say so), and SIGTERM will stop every server we started."""
    if shutil.which("wrk") is None:
        print("wrk not found: install it with `apt-get install wrk`", file=sys.stderr)
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not ready_to_load():
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        work = Path(tmp)
        models = work / "models"
        progress(f"writing the demo repository into {models}")
        write_demo(models)
        X = write_scripts(work)

        # Before any server starts, so the model loop has the machine to itself.
        progress("in-process predict_proba baseline")
        in_process = {v: in_process_rows_per_s(models / "iris" / v / "model.joblib", X,
                                               args.rounds) for v in ("1", "2")}

        servers = {
            "ours": Server("ours", "wsgi:app", work, {"MODEL_DIR": str(models), "CACHE": "off"}),
            "bare": Server("bare", "bench.bare_app:app", work, {}),
        }
        measurements = {(t, c): Measurement[Target](t, c)
                        for c in args.connections for t in TARGETS}
        with serving(servers):
            for server in servers.values():
                server.start()
            servers["ours"].wait_until_up(urllib.request.Request(servers["ours"].url + "/ready"))
            servers["bare"].wait_until_up(post(servers["bare"].url + "/predict", b"{}"))
            check_answers(servers, X)

            if args.warmup:
                progress(f"warming up, {args.warmup} s per target")
                for t in TARGETS:
                    run_wrk(servers[t.server].url + t.path, work / t.script,
                            max(args.connections), args.warmup, args.timeout)

            # Rounds outermost: a slow minute on the machine hurts one round of every
            # target instead of every round of one target.
            for round_no in range(1, args.rounds + 1):
                for c in args.connections:
                    for t in TARGETS:
                        run = run_wrk(servers[t.server].url + t.path, work / t.script, c,
                                      args.duration, args.timeout)
                        measurements[t, c].runs.append(run)
                        progress(f"round {round_no}/{args.rounds} {t.name} c={c}: "
                                 f"{run.requests_per_s:.0f} req/s, p99 {ms(run.p99_ms)} ms, "
                                 f"{run.errors} errors")

    ordered = [measurements[t, c] for t in TARGETS for c in args.connections]
    settings = {"duration_s": args.duration, "connections": args.connections,
                "rounds": args.rounds, "warmup_s": args.warmup, "timeout_s": args.timeout,
                "workers": 2, "cache": "off", "wrk_threads": 1,
                "single_distinct_rows": SINGLE_ROWS, "batch_rows": BATCH_ROWS,
                "batch_distinct_bodies": BATCH_BODIES}
    print(f"core benchmark: {os.cpu_count()} CPUs, 2 gevent workers per server, cache off, "
          f"wrk -t1, {args.duration} s x {args.rounds} rounds (best kept)")
    print("in-process predict_proba, 1000 rows: " + ", ".join(
        f"iris v{v} {r:,.0f} rows/s" for v, r in in_process.items()))
    print(table(ordered, in_process))

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"core-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(as_json(ordered, in_process, settings),
                                  option=orjson.OPT_INDENT_2))
    print(f"results: {path.relative_to(ROOT)}")
    return 0



def side_by_side(servers: dict[str, Server], script: Path, args: argparse.Namespace
                 ) -> dict[tuple[str, int], Measurement[str]]:
    """Start ``servers``, warm them up and load each with ``script`` on ``/predict``, rounds
    interleaved (a slow minute hurts one round of each, not every round of one); the
    servers stay up for the caller to read from. Call inside ``serving(servers)``."""
    measurements = {(n, c): Measurement[str](n, c) for n in servers for c in args.connections}
    for server in servers.values():
        server.start()
    for server in servers.values():
        server.wait_until_up(urllib.request.Request(server.url + "/ready"))
    if args.warmup:
        for server in servers.values():
            run_wrk(server.url + "/predict", script, max(args.connections), args.warmup,
                    args.timeout)
    for round_no in range(1, args.rounds + 1):
        for c in args.connections:
            for name, server in servers.items():
                run = run_wrk(server.url + "/predict", script, c, args.duration, args.timeout)
                measurements[name, c].runs.append(run)
                progress(f"round {round_no}/{args.rounds} {name} c={c}: "
                         f"{run.requests_per_s:.0f} req/s, p99 {ms(run.p99_ms)} ms")
    return measurements


if __name__ == "__main__":
    raise SystemExit(main())
