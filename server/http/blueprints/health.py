"""GET /health (liveness), /ready (readiness), /status."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response

from server.http.auth import require_metrics_key
from server.http.context import json_response, state
from server.runtime import prometheus as metrics
from server.runtime.figures import resident_mb

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return json_response({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    registry = state().registry
    servable = {n: sorted(e.versions, key=int) for n, e in registry.models.items() if e.versions}
    failed = [f"{n}/{v}" for n, e in registry.models.items() for v in e.failed]
    draining = state().draining
    ok = registry.loaded_once and bool(servable) and not draining
    body = {"status": "ready" if ok else "not_ready", "models": servable, "failed": failed,
            "cache": state().dataplane.cache_status()["state"]}
    if not ok:
        body["reason"] = ("shutting down: finishing requests in flight" if draining
                          else "no servable model in the repository" if registry.loaded_once
                          else "models are loading")
    return json_response(body, 200 if ok else 503)


@bp.get("/metrics")
def prometheus() -> Response:
    """Prometheus text, summed over every worker of this server."""
    require_metrics_key()
    return Response(metrics.exposition(), content_type=metrics.CONTENT_TYPE)


@bp.get("/status")
def status() -> Response:
    st = state()
    models = {
        name: {"latest": e.latest, "labels": e.labels, "versions": sorted(e.versions, key=int),
               "failed": sorted(e.failed, key=int)}
        for name, e in st.registry.models.items()
    }
    return json_response({
        "status": "ok",
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - st.started, 3),
        "predictions_served": st.dataplane.predictions,
        "rss_mb": resident_mb(),
        "streams": dict(st.metrics.streams),
        "scope": "this worker",
        "models": models,
        "last_reload": st.registry.last_reload,
        "cache": st.dataplane.cache_status(),
        "micro_batching": st.dataplane.batcher.status() if st.dataplane.batcher else None,
    })
