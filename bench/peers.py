"""``python -m bench.peers``: our server against its peers, in one run on one machine.

Every server gets 2 workers and is started on a free loopback port, all of them before any
load; ``wrk -t1`` drives ``POST`` predicts from its own process, rows varied (1,000 distinct
iris-like rows) so no cache can help, except on the one target that measures the cache-hit
path. Measured, interleaved round by round, best round kept, errors summed over all rounds:

1. bare Flask+gevent (bench/bare_app.py): parse JSON, answer a constant: the ceiling;
2. ours, ``gunicorn -c gunicorn.conf.py wsgi:app`` over the demo repository with CACHE=off,
   iris v1 (LogisticRegression) and v2 (RandomForest, 100 trees); and ours with the memory
   cache on 30 hot rows, warmed right before each round (the cache-hit path);
3. the guides' FastAPI app (bench/fastapi_app.py) on ``uvicorn --workers 2``, one server per
   artifact (it loads one model, as the guides do); fastapi and uvicorn come from
   requirements-bench.txt, pip-installed into this venv when missing;
4. MLServer 1.7.1 + mlserver-sklearn in its own venv (bench/.venv-mlserver, created on first
   use), the same joblib artifacts, its V2 REST endpoint with a JSON FP64 tensor asking for
   ``predict`` and ``predict_proba``; ``parallel_workers: 2``; once with its defaults, once
   with adaptive batching (``max_batch_size`` 32, ``max_batch_time`` 5 ms).

Then every server's resident memory (VmRSS of its master and of each worker) is read after
the load and set against the in-memory size of the models it holds (``len(pickle.dumps)``).
Printed: one table of req/s, p50, p99, errors and the ratios to the guides' FastAPI, to
MLServer's default configuration and to the bare ceiling; one table of RSS. Results also go
to bench/results/peers-<timestamp>.json.

    python -m bench.peers [--duration 5] [--connections 8,64] [--skip-mlserver]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson

from bench.cache import LookupMeasurement, cache_counters, hit_note, lookups_between
from bench.cache import write_scripts as write_cache_scripts
from bench.core import (
    BATCH_BODIES,
    BATCH_ROWS,
    RESULTS_DIR,
    ROOT,
    SINGLE_ROWS,
    Server,
    WrkRun,
    clean_environ,
    free_port,
    in_process_rows_per_s,
    iris_like_rows,
    load_parser,
    lua_script,
    machine,
    ms,
    parsed,
    post,
    progress,
    ready_to_load,
    run_wrk,
    serving,
)
from server.jobs.demo import write_demo

REQUIREMENTS = ROOT / "requirements-bench.txt"
MLSERVER_VENV = ROOT / "bench" / ".venv-mlserver"
# uvloop 0.23 crashes MLServer 1.7.1; the rest of its venv follows ours so that both load the
# artifact with the same libraries (scikit-learn must match the one that pickled it).
MLSERVER_PINS = {"mlserver": "1.7.1", "mlserver-sklearn": "1.7.1", "uvloop": "0.21.0"}
SAME_AS_OURS = ("scikit-learn", "numpy", "scipy", "joblib")
MLSERVER_BATCHING = {"max_batch_size": 32, "max_batch_time": 0.005}
WORKERS = 2
MODELS = {"1": "iris v1 LR", "2": "iris v2 RF100"}
MB = 1024 * 1024

KINDS = {  # server kind -> as printed
    "bare": "bare Flask+gevent",
    "ours": "ours (cache off)",
    "nobatch": "ours, no micro-batch",
    "onnx": "ours, ONNX backend",
    "batch": "ours /predict/batch",
    "batch-nolog": "ours batch, log off",
    "memory": "ours memory-cache hit",
    "fastapi": "guides' FastAPI",
    "mlserver": "MLServer default",
    "mlserver-batch": "MLServer batching",
}


# --- What is measured -----------------------------------------------------------------------
@dataclass(frozen=True)
class PeerTarget:
    """One server and model under load."""

    kind: str  # a key of KINDS
    server: str  # key of the running server
    version: str | None  # iris version, None for the bare app (no model)
    path: str
    script: str  # Lua file in the temp dir

    @property
    def name(self) -> str:
        return KINDS[self.kind]

    @property
    def model(self) -> str:
        return MODELS[self.version] if self.version else "-"

    @property
    def hit(self) -> bool:
        return self.kind == "memory"

    @property
    def batch(self) -> bool:
        return self.kind in ("batch", "batch-nolog")


def make_targets(with_fastapi: bool, with_mlserver: bool) -> list[PeerTarget]:
    targets = [PeerTarget("bare", "bare", None, "/predict", "predict-v1.lua")]
    for v in MODELS:
        targets.append(PeerTarget("ours", "ours", v, "/predict", f"predict-v{v}.lua"))
        targets.append(PeerTarget("nobatch", "nobatch", v, "/predict", f"predict-v{v}.lua"))
        targets.append(PeerTarget("batch", "ours", v, "/predict/batch", f"batch-v{v}.lua"))
        # The same without the prediction log: what the log's row-per-row writes cost.
        targets.append(PeerTarget("batch-nolog", "nolog", v, "/predict/batch",
                                  f"batch-v{v}.lua"))
        if v == "2":  # the opt-in ONNX backend: it pays off for forests, not for LR
            targets.append(PeerTarget("onnx", "onnx", v, "/predict", f"predict-v{v}.lua"))
        targets.append(PeerTarget("memory", "memory", v, "/predict", f"hit-v{v}.lua"))
        if with_fastapi:
            targets.append(PeerTarget("fastapi", f"fastapi-{v}", v, "/predict",
                                      f"predict-v{v}.lua"))
        if with_mlserver:
            for kind in ("mlserver", "mlserver-batch"):
                targets.append(PeerTarget(kind, kind, v, f"/v2/models/iris-v{v}/infer",
                                          f"infer-v{v}.lua"))
    return targets


# core's best-of-rounds; for the cache-hit path also the hits/misses per round.
PeerMeasurement = LookupMeasurement[PeerTarget]


def v2_body(row: list[float]) -> bytes:
    """A V2 inference request for one row: a [1, 4] FP64 tensor, both outputs asked for (the
    guides' app and ours answer the class and its probabilities too)."""
    return orjson.dumps({
        "inputs": [{"name": "input-0", "shape": [1, len(row)], "datatype": "FP64",
                    "data": row}],
        "outputs": [{"name": "predict"}, {"name": "predict_proba"}],
    })


def write_scripts(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The wrk scripts: our native body (the bare app and the guides' app read the same; the
    latter ignores the fields it does not know), MLServer's V2 body with the same rows,
    bench.cache's hit scripts, and /predict/batch bodies of BATCH_ROWS rows each. Returns the
    single rows and the first batch body's rows (the in-process baseline predicts those)."""
    rows = iris_like_rows(SINGLE_ROWS + BATCH_ROWS * BATCH_BODIES)
    single, batched = rows[:SINGLE_ROWS], rows[SINGLE_ROWS:]
    chunks = [batched[k * BATCH_ROWS:(k + 1) * BATCH_ROWS] for k in range(BATCH_BODIES)]
    for v in MODELS:
        native = [orjson.dumps({"model": "iris", "version": v, "features": r.tolist()})
                  for r in single]
        (folder / f"predict-v{v}.lua").write_text(lua_script(native))
        (folder / f"infer-v{v}.lua").write_text(lua_script([v2_body(r.tolist())
                                                            for r in single]))
        (folder / f"batch-v{v}.lua").write_text(lua_script(
            [orjson.dumps({"model": "iris", "version": v, "instances": c.tolist()})
             for c in chunks]))
    write_cache_scripts(folder)  # hit-v1.lua, hit-v2.lua (and miss scripts, unused here)
    return single, chunks[0]


# --- Processes --------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (any of its threads may have forked them)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return sorted(set(out))


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in kB, from /proc/<pid>/status, and Pss."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    try:  # proportional set size: shared pages (libraries) divided among their users
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


class Peer(Server):
    """core's Server (free port, own session, log file, stop by PID) for any command line.
    ``stop`` also ends, by PID, any descendant its master left behind."""

    def __init__(self, name: str, workdir: Path, app: str = "-",
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        # core's gunicorn command line for ``app``; the other peers replace argv and env.
        super().__init__(name, app, workdir, env or {})
        self.cwd = cwd

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def workers(self) -> list[int]:
        """The master's children that serve, less multiprocessing's resource tracker."""
        if self.proc is None:
            return []
        return [p for p in children(self.proc.pid) if "resource_tracker" not in cmdline(p)]

    def stop(self, timeout: float = 30.0) -> None:
        left = descendants(self.proc.pid) if self.proc is not None else []
        super().stop(timeout)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)  # only if it outlived its master
            except ProcessLookupError:
                pass


def uvicorn(name: str, workdir: Path, model_path: Path) -> Peer:
    peer = Peer(name, workdir)
    peer.argv = [sys.executable, "-m", "uvicorn", "bench.fastapi_app:app", "--host",
                 "127.0.0.1", "--port", str(peer.port), "--workers", str(WORKERS)]
    peer.env = clean_environ() | {"MODEL_PATH": str(model_path), "PYTHONPATH": str(ROOT)}
    return peer


def mlserver(name: str, workdir: Path, models: Path, venv: Path, batching: bool) -> Peer:
    """An MLServer over a repository of its own: settings.json (ports, 2 parallel workers,
    its state dirs in the temp dir, everything else default) and one model-settings.json per
    iris version, pointing at our artifact."""
    repo = workdir / f"repo-{name}"
    repo.mkdir()
    peer = Peer(name, workdir, cwd=repo)
    peer.argv = [str(venv / "bin" / "mlserver"), "start", str(repo)]
    settings = {"host": "127.0.0.1", "http_port": peer.port, "grpc_port": free_port(),
                "metrics_port": free_port(), "parallel_workers": WORKERS,
                "metrics_dir": str(repo / ".metrics"),
                "environments_dir": str(repo / ".envs")}
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    for v in MODELS:
        spec: dict[str, Any] = {
            "name": f"iris-v{v}", "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(models / "iris" / v / "model.joblib"), "version": v},
        }
        if batching:
            spec |= MLSERVER_BATCHING
        (repo / f"iris-v{v}").mkdir()
        (repo / f"iris-v{v}" / "model-settings.json").write_text(json.dumps(spec, indent=2))
    # Not our PYTHONPATH: its venv must not see our packages.
    peer.env = {k: v for k, v in clean_environ().items()
                if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return peer


# --- Installs ---------------------------------------------------------------------------------
def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name[extras]==version`` line of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def missing(wanted: dict[str, str]) -> list[str]:
    out = []
    for name, version in wanted.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            out.append(f"{name}=={version} (have {have})")
    return out


def ensure_fastapi() -> str | None:
    """pip-install requirements-bench.txt into this venv if a pin is not met; None when
    ready, else why not."""
    wanted = pins(REQUIREMENTS)
    if not (todo := missing(wanted)):
        return None
    progress(f"installing {REQUIREMENTS.name} into this venv: {', '.join(todo)}")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        return f"pip install -r {REQUIREMENTS.name} failed:\n{(done.stdout + done.stderr)[-1500:]}"
    importlib.invalidate_caches()
    return f"still not installed: {todo}" if (todo := missing(wanted)) else None


def mlserver_pins() -> dict[str, str]:
    return MLSERVER_PINS | {name: importlib.metadata.version(name) for name in SAME_AS_OURS}


def venv_versions(venv: Path, names: list[str]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n"
            "    try:\n        return m.version(n)\n"
            "    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    try:
        done = subprocess.run([str(venv / "bin" / "python"), "-c", code, *names],
                              capture_output=True, text=True, timeout=60, check=False)
        found: dict[str, str | None] = json.loads(done.stdout)
        return found
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def ensure_mlserver(venv: Path) -> tuple[Path | None, str]:
    """MLServer's own venv with MLSERVER_PINS and our scikit-learn/numpy/scipy/joblib: reused
    when every pin is met, else (re)created and pip-installed. Returns (venv, note) or
    (None, why not)."""
    if sys.version_info >= (3, 13):
        return None, f"mlserver 1.7.1 needs Python < 3.13, this is {sys.version.split()[0]}"
    wanted = mlserver_pins()
    spec = [f"{n}=={v}" for n, v in wanted.items()]
    if venv_versions(venv, list(wanted)) == wanted:
        return venv, f"reused {venv.relative_to(ROOT)} ({' '.join(spec)})"
    progress(f"creating {venv.relative_to(ROOT)}: pip install {' '.join(spec)} "
             "(a few minutes)")
    start = time.monotonic()
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
              "--disable-pip-version-check", *spec]]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(argv[:4])} ...: {exc}"
        if done.returncode != 0:
            return None, (f"{' '.join(argv[:6])} ... failed ({done.returncode}):\n"
                          f"{(done.stdout + done.stderr)[-1500:]}")
    if (have := venv_versions(venv, list(wanted))) != wanted:
        return None, f"installed, but versions differ: {have} != {wanted}"
    return venv, (f"installed into {venv.relative_to(ROOT)} in "
                  f"{time.monotonic() - start:.0f} s ({' '.join(spec)})")


# --- Checks -----------------------------------------------------------------------------------
def ask(url: str, body: bytes) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(post(url, body), timeout=30) as answer:
            out: dict[str, Any] = orjson.loads(answer.read())
            return out
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.code} {exc.read()[:500]!r}") from exc


def check_answers(servers: dict[str, Peer], targets: list[PeerTarget], rows: np.ndarray,
                  models: Path) -> None:
    """Before any load, every target answers a real predict, and every server's class and
    probabilities for the same rows are the estimator's own: the same artifact everywhere."""
    X = rows[:5]
    for t in targets:
        url = servers[t.server].url + t.path
        if t.version is None:
            ask(url, orjson.dumps({"model": "iris", "version": "1",
                                   "features": X[0].tolist()}))
            continue
        est = joblib.load(models / "iris" / t.version / "model.joblib")
        want_class, want_proba = est.predict(X), est.predict_proba(X)
        for i, row in enumerate(X.tolist()):
            if t.batch:
                body = ask(url, orjson.dumps({"model": "iris", "version": t.version,
                                              "instances": [row]}))
                got_class = body["predictions"][0]
                got_proba = list(body["probabilities"][0].values())
            elif t.kind.startswith("mlserver"):
                out = {o["name"]: o["data"] for o in ask(url, v2_body(row))["outputs"]}
                got_class, got_proba = out["predict"][0], out["predict_proba"]
            elif t.kind == "fastapi":
                body = ask(url, orjson.dumps({"features": row}))
                got_class, got_proba = body["prediction"], body["probability"]
            else:
                body = ask(url, orjson.dumps({"model": "iris", "version": t.version,
                                              "features": row}))
                got_class = body["prediction"]
                got_proba = list(body["probabilities"].values())
            atol = 1e-6 if t.kind == "onnx" else 1e-12  # what the ONNX backend promises
            if got_class != want_class[i] or not np.allclose(got_proba, want_proba[i],
                                                             rtol=0, atol=atol):
                raise RuntimeError(f"{t.name} {t.model}: row {row} answered {got_class} "
                                   f"{got_proba}, the estimator {want_class[i]} "
                                   f"{want_proba[i].tolist()}")


def onnx_repository(models: Path, into: Path) -> Path | None:
    """A copy of the demo repository whose forest (iris v2) opts in to the ONNX backend;
    None when the optional packages are not installed."""
    try:
        import onnxruntime  # noqa: F401
        import skl2onnx  # noqa: F401
    except ImportError:
        return None
    shutil.copytree(models, into)
    meta_path = into / "iris" / "2" / "metadata.json"
    meta = orjson.loads(meta_path.read_bytes())
    meta_path.write_bytes(orjson.dumps(meta | {"backend": "onnx"}))
    return into


# --- Memory -----------------------------------------------------------------------------------
def model_bytes(path: Path) -> int:
    """The model's in-memory size as its pickle: ``len(pickle.dumps(model))``."""
    return len(pickle.dumps(joblib.load(path), protocol=pickle.HIGHEST_PROTOCOL))


def rss_report(servers: dict[str, Peer], held: dict[str, list[str]],
               sizes: dict[str, int], floor_mb: float | None) -> list[dict[str, Any]]:
    """Each server's RSS; a worker's limit is the bare-python floor (``interpreter_floor_mb``)
    plus 60 MB."""
    out = []
    for name, server in servers.items():
        if server.proc is None:
            continue
        models_b = sum(sizes[m] for m in held[name])
        workers = {pid: memory_kb(pid) for pid in server.workers()}
        rss_mb = [w.get("VmRSS", 0) / 1024 for w in workers.values()]
        out.append({
            "server": name, "master_pid": server.proc.pid,
            "master_rss_mb": memory_kb(server.proc.pid).get("VmRSS", 0) / 1024,
            "workers": [{"pid": p, "rss_mb": m.get("VmRSS", 0) / 1024,
                         "peak_rss_mb": m.get("VmHWM", 0) / 1024,
                         "pss_mb": m["Pss"] / 1024 if "Pss" in m else None}
                        for p, m in workers.items()],
            "models_held": held[name], "models_bytes": models_b,
            "limit_mb": None if floor_mb is None else floor_mb + 60,
            "within_limit": None if floor_mb is None else
            bool(rss_mb) and max(rss_mb) <= floor_mb + 60,
        })
    return out


FLOOR_CODE = """
import importlib, pkgutil, sys
import server
for module in pkgutil.walk_packages(server.__path__, "server."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
from server.config import Settings
from server.model.registry import ModelRegistry
from server.model.storage import open_repository
registry = ModelRegistry(open_repository(Settings(model_dir=sys.argv[1])))
registry.reload()
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]))
"""


def interpreter_floor_mb(model_dir: Path) -> float | None:
    """VmRSS of a bare python that imports every module of the server's package and loads
    the repository's models (no app, no gunicorn, no request served): what our worker is
    held to, plus 60 MB."""
    try:
        done = subprocess.run([sys.executable, "-c", FLOOR_CODE, str(model_dir)],
                              capture_output=True, text=True, timeout=120, check=True,
                              cwd=ROOT, env={**clean_environ(), "PYTHONPATH": str(ROOT)})
        return int(done.stdout.split()[-1]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# --- Report -----------------------------------------------------------------------------------
def baselines(measurements: list[PeerMeasurement]) -> dict[tuple[str, str | None, int], float]:
    return {(m.target.kind, m.target.version, m.connections): m.best.requests_per_s
            for m in measurements}


def ratios(m: PeerMeasurement, base: dict[tuple[str, str | None, int], float]
           ) -> dict[str, float | None]:
    t, rate = m.target, m.best.requests_per_s

    def vs(kind: str, version: str | None) -> float | None:
        if t.kind == kind or t.batch or t.version is None and kind != "bare":
            return None
        b = base.get((kind, version, m.connections))
        return rate / b if b else None

    return {"vs_fastapi": vs("fastapi", t.version), "vs_mlserver": vs("mlserver", t.version),
            "vs_bare": vs("bare", None)}


def table(measurements: list[PeerMeasurement]) -> str:
    base = baselines(measurements)
    head = (f"{'server':<22} {'model':<13} {'conns':>5} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'errors':>6} {'vs FastAPI':>10} {'vs MLServer':>11} "
            f"{'vs bare':>7}")
    lines = [head, "-" * len(head)]
    for m in measurements:
        best, t = m.best, m.target
        r = {k: "-" if v is None else f"{v:.2f}" for k, v in ratios(m, base).items()}
        lines.append(f"{t.name:<22} {t.model:<13} {m.connections:>5} "
                     f"{best.requests_per_s:>8.0f} {ms(best.p50_ms):>8} {ms(best.p99_ms):>8} "
                     f"{m.errors:>6} {r['vs_fastapi']:>10} {r['vs_mlserver']:>11} "
                     f"{r['vs_bare']:>7}")
    return "\n".join(lines)


def rss_table(report: list[dict[str, Any]]) -> str:
    head = (f"{'server':<16} {'master MB':>9} {'workers MB':>15} {'PSS MB':>11} "
            f"{'models held':<15} "
            f"{'model KB':>9} {'limit MB':>8} {'<= limit':>8}")
    lines = [head, "-" * len(head)]
    for r in report:
        workers = " / ".join(f"{w['rss_mb']:.0f}" for w in r["workers"]) or "?"
        pss = " / ".join("?" if w["pss_mb"] is None else f"{w['pss_mb']:.0f}"
                         for w in r["workers"]) or "?"
        held = ("none" if not r["models_held"] else ", ".join(r["models_held"])
                if len(r["models_held"]) <= 2 else f"{len(r['models_held'])} demo models")
        lines.append(f"{r['server']:<16} {r['master_rss_mb']:>9.0f} {workers:>15} "
                     f"{pss:>11} {held:<15} {r['models_bytes'] / 1024:>9.1f} {r['limit_mb']:>8.1f} "
                     f"{'yes' if r['within_limit'] else 'NO':>8}")
    return "\n".join(lines)


def as_json(measurements: list[PeerMeasurement], rss: list[dict[str, Any]],
            sizes: dict[str, int], settings: dict[str, Any],
            loadavg: tuple[float, float, float]) -> dict[str, Any]:
    base = baselines(measurements)
    results = []
    for m in measurements:
        best, t = m.best, m.target
        entry: dict[str, Any] = {
            "server": t.name, "kind": t.kind, "model": t.model, "version": t.version,
            "path": t.path, "connections": m.connections,
            "requests_per_s": best.requests_per_s, "p50_ms": best.p50_ms,
            "p99_ms": best.p99_ms, "errors": m.errors, **ratios(m, base),
            "rounds": [asdict(r) for r in m.runs],
        }
        if t.hit:
            entry["hit_ratio"] = m.hit_ratio
            entry["lookups_per_round"] = m.lookups
        results.append(entry)
    return {
        "benchmark": "peers",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine() | {"loadavg_at_start": list(loadavg)},
        "settings": settings,
        "model_pickle_bytes": sizes,
        "results": results,
        "rss": rss,
    }


def batch_table(measurements: list[PeerMeasurement], in_process: dict[str, float]) -> str:
    head = f"{'model':<13} {'log':>4} {'conns':>5} {'rows/s':>9} {'in-process':>10} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for m in measurements:
        if m.target.batch and m.target.version is not None:
            rows = m.best.requests_per_s * BATCH_ROWS
            base = in_process[m.target.version]
            log = "off" if m.target.kind == "batch-nolog" else "on"
            lines.append(f"{m.target.model:<13} {log:>4} {m.connections:>5} {rows:>9.0f} "
                         f"{base:>10.0f} {rows / base:>6.2f}")
    return "\n".join(lines)


def verdicts(measurements: list[PeerMeasurement], in_process: dict[str, float],
             hold: WrkRun | None, rss: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of issue 23 against this run's own baselines: what was measured, the goal,
    and whether it was met (None where a peer was left out)."""
    at = {(m.target.kind, m.target.version, m.connections): m for m in measurements}
    conns = sorted({m.connections for m in measurements})
    rate = {k: m.best.requests_per_s for k, m in at.items()}
    out: list[dict[str, Any]] = []

    def goal(name: str, value: float | None, wanted: float, at_least: bool = True) -> None:
        met = None if value is None else (value >= wanted if at_least else value <= wanted)
        out.append({"target": name, "measured": value, "goal": wanted,
                    "at_least": at_least, "met": met})

    def ratio(a: tuple[str, str | None, int], b: tuple[str, str | None, int]) -> float | None:
        return rate[a] / rate[b] if a in rate and rate.get(b) else None

    for c in conns:
        goal(f"1. LR vs guides' FastAPI, c={c}", ratio(("ours", "1", c), ("fastapi", "1", c)), 1.3)
        goal(f"1. LR vs bare ceiling, c={c}", ratio(("ours", "1", c), ("bare", None, c)), 0.75)
        goal(f"2. RF warm memory cache vs bare, c={c}",
             ratio(("memory", "2", c), ("bare", None, c)), 0.75)
        goal(f"4. RF vs guides' FastAPI, c={c}", ratio(("ours", "2", c), ("fastapi", "2", c)),
             10)
        for v, model in (("1", "LR"), ("2", "RF")):
            goal(f"4. {model} vs MLServer default, c={c}",
                 ratio(("ours", v, c), ("mlserver", v, c)), 4)
            goal(f"4. {model} vs MLServer batching, c={c}",
                 ratio(("ours", v, c), ("mlserver-batch", v, c)), 2)
    top = max(conns)
    ours, fast = at.get(("ours", "1", top)), at.get(("fastapi", "1", top))
    if ours is not None and ours.best.p99_ms is not None:
        p99 = ours.best.p99_ms
        goal(f"3. LR p99 / FastAPI p99, c={top}",
             p99 / fast.best.p99_ms if fast and fast.best.p99_ms else None, 1.0, False)
        goal(f"3. LR p99 / own p50, c={top}",
             p99 / ours.best.p50_ms if ours.best.p50_ms else None, 3.0, False)
    for m in measurements:
        if m.target.batch and m.target.version is not None:
            log = ", log off" if m.target.kind == "batch-nolog" else ""
            goal(f"5. batch x{BATCH_ROWS} {m.target.model}{log} vs in-process",
                 m.best.requests_per_s * BATCH_ROWS / in_process[m.target.version], 0.8)
    for r in rss:
        if r["server"] == "ours" and r["workers"] and r["limit_mb"] is not None:
            goal("6. ours worker RSS MB (goal: floor + 60 MB)",
                 max(w["rss_mb"] for w in r["workers"]), r["limit_mb"], False)
    goal("errors holding the hold connections", None if hold is None else hold.errors, 0,
         False)
    return out


def verdict_table(goals: list[dict[str, Any]]) -> str:
    width = max([42, *(len(g["target"]) for g in goals)])
    head = f"{'target':<{width}} {'measured':>9} {'goal':>9} {'met':>4}"
    lines = [head, "-" * len(head)]
    for g in goals:
        value = "-" if g["measured"] is None else f"{g['measured']:.3f}"
        wanted = ("≥ " if g["at_least"] else "≤ ") + f"{g['goal']:.4g}"
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        lines.append(f"{g['target']:<{width}} {value:>9} {wanted:>9} {met:>4}")
    return "\n".join(lines)


# --- Main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = load_parser(
        "python -m bench.peers", __doc__, 5,
        "seconds of unrecorded load per target before measuring, and of cache warming "
        "before every hit round (at least 1) [1]")
    parser.add_argument("--skip-mlserver", action="store_true",
                        help="leave MLServer out (no venv, no install)")
    parser.add_argument("--hold-connections", type=int, default=1000,
                        help="connections of the hold test on ours [1000]")
    parser.add_argument("--hold-seconds", type=int, default=30,
                        help="length of the hold test; 0 skips it [30]")
    return parsed(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not ready_to_load():
        return 2
    loadavg = os.getloadavg()

    notes: dict[str, str] = {}
    fastapi_why = ensure_fastapi()
    if fastapi_why:
        progress(f"the guides' FastAPI app is left out: {fastapi_why}")
        notes["fastapi"] = f"left out: {fastapi_why}"
    venv: Path | None = None
    if args.skip_mlserver:
        notes["mlserver"] = "skipped (--skip-mlserver)"
    else:
        venv, why = ensure_mlserver(MLSERVER_VENV)
        progress(f"MLServer: {why}" if venv else f"MLServer is left out: {why}")
        notes["mlserver"] = why if venv else f"left out: {why}"

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        models = work / "models"
        progress(f"writing the demo repository into {models}")
        write_demo(models)
        rows, batch_rows = write_scripts(work)
        artifacts = {str(p.relative_to(models).parent): p
                     for p in sorted(models.glob("*/*/model.joblib"))}
        sizes = {name: model_bytes(path) for name, path in artifacts.items()}
        floor_mb = interpreter_floor_mb(models)
        iris = [f"iris/{v}" for v in MODELS]

        ours = {"MODEL_DIR": str(models)}
        servers: dict[str, Peer] = {
            "bare": Peer("bare", work, "bench.bare_app:app"),
            "ours": Peer("ours", work, "wsgi:app", ours | {"CACHE": "off"}),
            "nobatch": Peer("nobatch", work, "wsgi:app",
                            ours | {"CACHE": "off", "BATCH_MAX_SIZE": "1"}),
            "memory": Peer("memory", work, "wsgi:app", ours | {"CACHE": "on"}),
            "nolog": Peer("nolog", work, "wsgi:app",
                          ours | {"CACHE": "off", "PREDICTION_LOG": "off"}),
        }
        held: dict[str, list[str]] = {"bare": [], "ours": list(sizes), "memory": list(sizes),
                                      "nobatch": list(sizes), "nolog": list(sizes)}
        onnx_models = onnx_repository(models, work / "models-onnx")
        if onnx_models is not None:
            servers["onnx"] = Peer("onnx", work, "wsgi:app",
                                   {"MODEL_DIR": str(onnx_models), "CACHE": "off"})
            held["onnx"] = list(sizes)
        else:
            notes["onnx"] = "left out: onnxruntime/skl2onnx not installed " \
                            "(pip install -r requirements-onnx.txt)"
        if not fastapi_why:
            for v in MODELS:
                servers[f"fastapi-{v}"] = uvicorn(f"fastapi-{v}", work,
                                                  models / "iris" / v / "model.joblib")
                held[f"fastapi-{v}"] = [f"iris/{v}"]
        if venv is not None:
            for name, batching in (("mlserver", False), ("mlserver-batch", True)):
                servers[name] = mlserver(name, work, models, venv, batching)
                held[name] = iris
        targets = [t for t in make_targets(not fastapi_why, venv is not None)
                   if t.server in servers or t.server.startswith(("fastapi", "mlserver"))]
        # A 1,000-row batch is measured at the lowest connection count only: it is about
        # rows/s against the in-process model, not about concurrency.
        measurements = {(t, c): PeerMeasurement(t, c) for c in args.connections
                        for t in targets if not t.batch or c == min(args.connections)}
        in_process = {v: in_process_rows_per_s(models / "iris" / v / "model.joblib",
                                               batch_rows, args.rounds) for v in MODELS}
        hold: WrkRun | None = None
        warm_s = max(1, args.warmup)
        rss: list[dict[str, Any]] = []

        def load(t: PeerTarget, connections: int, seconds: int) -> WrkRun:
            return run_wrk(servers[t.server].url + t.path, work / t.script, connections,
                           seconds, args.timeout)

        with serving(servers):
            progress(f"starting {len(servers)} servers: {', '.join(servers)}")
            for server in servers.values():
                server.start()
            probe = orjson.dumps({"model": "iris", "version": "1",
                                  "features": rows[0].tolist()})
            for name, server in servers.items():
                if name.startswith("mlserver"):
                    for v in MODELS:
                        server.wait_until_up(urllib.request.Request(
                            f"{server.url}/v2/models/iris-v{v}/ready"), timeout=300)
                elif name in ("ours", "memory", "nobatch", "onnx", "nolog"):
                    server.wait_until_up(urllib.request.Request(server.url + "/ready"))
                else:
                    server.wait_until_up(post(server.url + "/predict", probe), timeout=120)
            check_answers(servers, targets, rows, models)

            if args.warmup:
                progress(f"warming up, {args.warmup} s per target")
                for t in targets:
                    load(t, max(args.connections), args.warmup)

            # Rounds outermost: a slow minute on a shared machine hurts one round of every
            # target instead of every round of one target.
            for round_no in range(1, args.rounds + 1):
                for c in args.connections:
                    for t in targets:
                        m = measurements.get((t, c))
                        if m is None:
                            continue
                        before = None
                        if t.hit:
                            load(t, max(args.connections), warm_s)  # the hot rows, cached
                            before = cache_counters(servers[t.server])
                        run = load(t, c, args.duration)
                        m.runs.append(run)
                        note = ""
                        if t.hit:
                            seen = lookups_between(before, cache_counters(servers[t.server]))
                            m.lookups.append(seen)
                            note = hit_note(seen)
                        progress(f"round {round_no}/{args.rounds} {t.name} {t.model} c={c}: "
                                 f"{run.requests_per_s:.0f} req/s, p99 {ms(run.p99_ms)} ms, "
                                 f"{run.errors} errors{note}")
            if args.hold_seconds:
                progress(f"holding {args.hold_connections} connections for "
                         f"{args.hold_seconds} s on ours, iris v1")
                hold = run_wrk(servers["ours"].url + "/predict", work / "predict-v1.lua",
                               args.hold_connections, args.hold_seconds, args.timeout)
                progress(f"hold: {hold.requests_per_s:.0f} req/s, p99 {ms(hold.p99_ms)} ms, "
                         f"{hold.errors} errors")
            rss = rss_report(servers, held, sizes, floor_mb)

    ordered = [measurements[t, c] for t in targets for c in args.connections
               if (t, c) in measurements]
    settings: dict[str, Any] = {
        "duration_s": args.duration, "connections": args.connections, "rounds": args.rounds,
        "warmup_s": args.warmup, "hit_warm_s": warm_s, "timeout_s": args.timeout,
        "workers": WORKERS, "wrk_threads": 1, "distinct_rows": SINGLE_ROWS,
        "ours": "gunicorn -c gunicorn.conf.py wsgi:app, gevent, CACHE=off / CACHE=on (hit)",
        "fastapi": f"uvicorn bench.fastapi_app:app --workers {WORKERS}, one server per model",
        "fastapi_versions": {n: importlib.metadata.version(n) for n in pins(REQUIREMENTS)}
        if not fastapi_why else None,
        "mlserver": {"parallel_workers": WORKERS, "batching": MLSERVER_BATCHING,
                     "versions": mlserver_pins()} if venv else None,
        "notes": notes, "server_floor_rss_mb": floor_mb,
    }
    print(f"peers benchmark: {os.cpu_count()} CPUs (load average at start "
          f"{loadavg[0]:.2f}), {WORKERS} workers per server, wrk -t1, {args.duration} s x "
          f"{args.rounds} rounds (best kept), {SINGLE_ROWS} distinct rows (memory-cache hit: "
          "30 hot rows)")
    for name, note in notes.items():
        print(f"{name}: {note.splitlines()[0]}")
    print(table(ordered))
    print()
    print("model in-memory size, len(pickle.dumps(model)): " + ", ".join(
        f"{n} {b / 1024:.1f} KB" for n, b in sizes.items()))
    print("RSS after load (VmRSS; PSS shares common pages out); limit = the floor below + 60 MB, "
          "checked on the largest worker's RSS")
    print(rss_table(rss))
    print("floor: a bare python that imports the server's modules and loads the same models: "
          + ("?" if floor_mb is None else f"{floor_mb:.0f} MB"))
    print()
    print(f"/predict/batch of {BATCH_ROWS} rows vs predict_proba on the same {BATCH_ROWS} rows "
          "in this process:")
    print(batch_table(ordered, in_process))
    if hold is not None:
        print(f"hold: {args.hold_connections} connections for {args.hold_seconds} s on ours, "
              f"iris v1: {hold.requests} answered, {hold.requests_per_s:.0f} req/s, "
              f"p50 {ms(hold.p50_ms)} ms, p99 {ms(hold.p99_ms)} ms, {hold.errors} errors")
    goals = verdicts(ordered, in_process, hold, rss)
    print()
    print("issue 23 targets, from this run:")
    print(verdict_table(goals))

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = as_json(ordered, rss, sizes, settings, loadavg)
    report["in_process_rows_per_s"] = in_process
    report["hold"] = asdict(hold) if hold is not None else None
    report["targets"] = goals
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"results: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
