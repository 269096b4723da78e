"""GET /health (liveness), /ready (readiness), /status."""

from __future__ import annotations

import os
import time

from flask import Blueprint, Response

from server.http.auth import require_api_key, require_metrics_key
from server.http.context import json_response, state
from server.runtime import prometheus
from server.runtime.blas import blas_threads
from server.runtime.figures import resident_mb

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return json_response({"status": "ok"})


@bp.get("/ready")
def ready() -> Response:
    st = state()
    ready = st.front.readiness()
    body = {"status": "ready" if ready.ok else "not_ready", "models": ready.models,
            "failed": ready.failed, "cache": st.dataplane.cache_status()["state"],
            # Shown, never a reason to be unready: predictions do not depend on the log.
            "prediction_log": st.front.log.state if st.front.log is not None else "off"}
    mirror = st.registry.repository.mirror
    if mirror is not None:  # shown, never a reason to be unready: what is loaded serves
        body["storage"] = mirror.status()
    if ready.reason is not None:
        body["reason"] = ready.reason
    return json_response(body, 200 if ready.ok else 503)


@bp.get("/metrics")
def metrics_text() -> Response:
    """Prometheus text, summed over every worker of this server."""
    require_metrics_key()
    return Response(prometheus.exposition(), content_type=prometheus.CONTENT_TYPE)


@bp.get("/status")
def status() -> Response:
    """Model names, labels, the Redis address and its last error, this worker's prediction
    log and drift counting: a key's worth under API_KEYS (the probes are /health and
    /ready)."""
    require_api_key()
    st = state()
    models = {
        name: {"latest": e.latest, "labels": e.labels, "versions": e.servable,
               "failed": sorted(e.failed, key=int)}
        for name, e in st.registry.models.items()
    }
    return json_response({
        "status": "ok",
        "pid": os.getpid(),
        "uptime_seconds": round(time.time() - st.started, 3),
        "predictions_served": st.dataplane.predictions,
        "rss_mb": resident_mb(),
        "streams": dict(st.figures.streams),
        "scope": "this worker",
        "models": models,
        "last_reload": st.registry.last_reload,
        "model_memory": st.registry.memory_status(),
        "cache": st.dataplane.cache_status(),
        "blas_threads": blas_threads(),
        "micro_batching": st.dataplane.batcher.status() if st.dataplane.batcher else None,
        "prediction_log": st.front.log.status() if st.front.log is not None else {"state": "off"},
        "drift": st.front.drift.status() if st.front.drift is not None else {"state": "off"},
    })
