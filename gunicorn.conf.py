"""Gunicorn settings for the prediction server. Every value can be overridden from the
environment (BIND, WORKERS, ...) or on the command line."""

import os
import shutil
import tempfile
import time

# --- Socket -------------------------------------------------------------------------------
# Where to listen; the API contract's BIND variable.
bind = os.environ.get("BIND", "127.0.0.1:8000")
# Each worker opens its own SO_REUSEPORT listener, so the kernel spreads new connections
# evenly; one shared listener lets whichever worker wakes first take most keep-alive
# connections while the other idles (measured: 40 fresh requests all on one worker).
reuse_port = os.environ.get("REUSE_PORT", "1") not in ("0", "false", "no")
# Pending connections the kernel queues before accept().
backlog = int(os.environ.get("BACKLOG", "2048"))

# --- Workers ------------------------------------------------------------------------------


def _cores():
    """CPUs this server may use: its affinity mask, capped by a cgroup v2 CPU quota (what
    `docker run --cpus` and Kubernetes CPU limits set)."""
    count = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return count


# Processes; each holds its own copy of the models and its own cache/Redis pool. Default:
# one per CPU. A predict is CPU work, so one gevent worker keeps one core busy; more workers
# than cores only add memory (~160 MB each) and context switches, fewer leave cores idle.
workers = int(os.environ.get("WORKERS") or _cores())
# gevent: one greenlet per connection, so SSE streams and WebSockets don't pin a process.
# server/runtime/worker.py is gunicorn's gevent worker plus a client socket timeout (below), a real
# "Connection: close" while draining, and listeners handed from old to new workers on SIGHUP.
worker_class = "server.runtime.worker.GeventWorker"
# Most simultaneous connections per worker.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# Each worker builds its own app after fork: no Redis socket or thread crosses a fork.
preload_app = False

# --- Timeouts -----------------------------------------------------------------------------
# A worker silent this long is killed and replaced (gevent workers heartbeat from the hub).
timeout = int(os.environ.get("TIMEOUT", "30"))
# SIGTERM: in-flight requests and streams get this long to finish.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
# After SIGTERM a worker keeps serving this long with /ready answering 503 (and closing
# keep-alive connections), so a balancer stops sending before it stops accepting.
drain_seconds = float(os.environ.get("DRAIN_SECONDS", "3"))
# Idle keep-alive connections are closed after this many seconds. gunicorn's gevent worker
# also bounds the read of each request head by it: a client dripping its headers byte by
# byte (slowloris) is cut off after KEEPALIVE seconds in all.
keepalive = int(os.environ.get("KEEPALIVE", "5"))
# A client silent this long while we read its body, or not reading while we write, is
# disconnected (408 when a body stalls). WebSockets are exempt. Keep it above KEEPALIVE.
client_timeout = float(os.environ.get("CLIENT_TIMEOUT_SECONDS", "30"))

# --- Control ------------------------------------------------------------------------------
# gunicorn 25+ opens a control socket at a fixed path; two servers on one host would collide.
control_socket_disable = True

# --- Logging ------------------------------------------------------------------------------
# The app writes one JSON access line per request itself (with request id and model);
# gunicorn's own lines go through the same JSON formatter.
accesslog = None
# gunicorn's logger, minus formatting access lines that the settings below throw away.
logger_class = "server.runtime.worker.QuietLogger"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "server.runtime.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                            "stream": "ext://sys.stderr"}},
    "root": {"handlers": ["stderr"], "level": loglevel.upper()},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": loglevel.upper(), "propagate": False},
        # Our own JSON access line replaces gunicorn's text one.
        "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
    },
}


# --- Hooks --------------------------------------------------------------------------------
def on_starting(server):
    """Give the workers of this server a shared directory (reload signal, events, figures)
    and a fresh directory for prometheus-client's multiprocess files, set before any worker
    imports the library."""
    if not os.environ.get("RUNTIME_DIR"):
        os.environ["RUNTIME_DIR"] = tempfile.mkdtemp(prefix="model-server-")
    prom = os.path.join(os.environ["RUNTIME_DIR"], "prometheus")
    shutil.rmtree(prom, ignore_errors=True)
    os.makedirs(prom, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prom
    server.log.info("runtime dir %s", os.environ["RUNTIME_DIR"])


def _workers_dir():
    path = os.path.join(os.environ["RUNTIME_DIR"], "workers")
    os.makedirs(path, exist_ok=True)
    return path


def on_reload(server):
    """SIGHUP: gunicorn forks a new generation of workers and at once sends SIGTERM to the old
    one, seconds before the new workers have loaded the app. Note who is old, so that each old
    worker serves on until a new one has taken over its listeners (see post_worker_init)."""
    with open(os.path.join(_workers_dir(), "reload"), "w") as f:
        f.write(str(server.worker_age))


def _replaced_by_reload(age):
    try:
        with open(os.path.join(_workers_dir(), "reload")) as f:
            return age <= int(f.read())
    except (OSError, ValueError):
        return False  # never reloaded: a plain shutdown


def post_worker_init(worker):
    """On SIGTERM: when a SIGHUP replaced this worker, serve on until a new worker has taken
    over its listeners (server/runtime/worker.py; a second SIGTERM cuts that short); then drain
    (/ready 503, connections closed after each answer); then let gunicorn stop accepting and
    finish what is in flight within graceful_timeout."""
    import gc
    import signal

    import gevent

    # Everything loaded so far (the app, its models, numpy, sklearn: ~180,000 objects) lives
    # as long as the worker: move it out of the collector's reach. A full collection over it
    # took ~85 ms, a pause for every request in flight; now collections see only new objects.
    gc.collect()
    gc.freeze()
    worker.client_timeout = client_timeout
    worker.handoff_dir = _workers_dir()
    state = worker.wsgi.extensions.get("model_server")
    stop = worker.handle_exit
    terms = []

    def retire(sig, frame):
        if _replaced_by_reload(worker.age):
            # A worker that boots for longer than `timeout` is killed by the master anyway.
            deadline = time.monotonic() + timeout
            worker.offer_listeners(lambda: len(terms) == 1 and time.monotonic() < deadline)
        if state is not None:
            state.front.draining = True
        worker.draining = True
        if drain_seconds > 0:
            gevent.sleep(drain_seconds)
        stop(sig, frame)

    def on_term(sig, frame):
        terms.append(sig)
        if len(terms) == 1:
            gevent.spawn(retire, sig, frame)

    signal.signal(signal.SIGTERM, on_term)


def child_exit(server, worker):
    """A dead worker's metric files must not count as live (gauges) any more."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """A worker that stopped because it was asked to (SIGTERM, SIGHUP, max_requests) has
    finished its requests: run the exit handlers, flush the logs and leave without the
    interpreter's teardown, whose final garbage collection over the loaded models took 2-3
    s per worker here (gunicorn and the tests waited for it at every stop). A worker that
    failed to boot or crashed takes the normal way out, with its exit code."""
    import atexit
    import logging
    import sys

    if not getattr(worker, "booted", False) or getattr(worker, "alive", True):
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
