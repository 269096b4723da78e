"""The prediction server: ``create_app`` wires everything; nothing is read at import time.

Imports happen inside ``create_app`` so that importing ``server.runtime.logs`` in the gunicorn
master (for the log formatter) pulls in neither redis nor ssl before gevent patches the workers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from server.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build one worker's application: settings, models, cache, data plane, blueprints."""
    from server.config import Settings
    from server.http.app import install, install_compression
    from server.http.auth import install_cors, install_proxy_fix, install_rate_limits
    from server.http.blueprints import (
        admin,
        dashboard,
        docs,
        drift,
        experiments,
        health,
        jobs,
        models,
        predict,
        predictions,
        stream,
        tokens,
        train,
        v1_tfserving,
        v2_oip,
        ws,
    )
    from server.http.context import ServerApp, ServerState
    from server.model.budget import MemoryBudget
    from server.model.predict import predict_matrix
    from server.model.registry import ModelRegistry, ReloadReport
    from server.model.storage import open_repository
    from server.runtime import prometheus
    from server.runtime.blas import limit_blas_threads
    from server.runtime.events import EventLog
    from server.runtime.figures import WorkerFigures
    from server.runtime.logs import configure_logging
    from server.runtime.offload import offload
    from server.serving.batching import MicroBatcher, batch_mode, gevent_active
    from server.serving.cache import make_cache, make_redis
    from server.serving.cachepolicy import cache_mode
    from server.serving.dataplane import DataPlane
    from server.serving.drift import DriftMonitor
    from server.serving.experiments import Experiments, MemoryStats, RedisStats
    from server.serving.frontdoor import FrontDoor, Limits
    from server.serving.logstore import LogStore
    from server.serving.predlog import PredictionLog
    from server.serving.reloader import Reloader

    settings = settings or Settings()
    configure_logging(settings.log_level)
    limit_blas_threads(settings.blas_threads)  # numpy and sklearn are loaded by now
    app = ServerApp(__name__, static_folder=None)  # the dashboard serves its own files
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # A WebSocket message over MAX_BODY_BYTES closes the socket with 1009 (message too big);
    # a peer that leaves a ping unanswered for WS_PING_SECONDS is dropped (0: no pings).
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.max_body_bytes,
                                         "ping_interval": settings.ws_ping_seconds or None}

    # Each version is probed for micro-batching as it loads (the registry imports nothing
    # above it: it takes the probe as a hook).
    # MODEL_MEMORY_MB: versions load on first request, the least recently used unloaded.
    budget = (MemoryBudget(settings.model_memory_mb, settings.model_load_wait_seconds)
              if settings.model_memory_mb > 0 else None)
    client = None
    if settings.redis_url:
        client = make_redis(settings.redis_url, settings.redis_timeout, settings.redis_pool_size)
    cache = make_cache(settings.cache_enabled, client, settings.redis_url, settings.cache_ttl,
                       int(settings.cache_max_mb * 1_000_000), settings.redis_breaker_seconds)
    # Then whether its answers are worth caching, from the one-row cost the probe measured.
    registry = ModelRegistry(open_repository(settings),
                             on_load=[lambda lv: batch_mode(lv, predict_matrix),
                                      lambda lv: cache_mode(lv, cache, settings.cache_policy)],
                             budget=budget)
    # Created before the first scan so that it notes the reload signal as it was then.
    reloader = Reloader(registry, settings.model_poll_seconds, settings.runtime_dir)
    registry.reload()
    for name, entry in registry.models.items():
        if entry.failed:
            prometheus.LOAD_FAILURES.labels(name).inc(len(entry.failed))
    ab = Experiments(registry, RedisStats(client) if client is not None else MemoryStats())
    if budget is not None:  # an experiment's versions stay loaded
        budget.pinned = lambda: {(e.model, v) for e in ab.items.values() if e.error is None
                                 for v in [*(a.version for a in e.arms), *([e.shadow] if
                                                                          e.shadow else [])]}
    ab.reload()
    batcher = None
    if settings.batch_max_size > 1 and gevent_active():
        batcher = MicroBatcher(predict_matrix, settings.batch_max_size,
                               settings.batch_max_delay_ms)
    dataplane = DataPlane(registry, cache, ab, batcher, settings.stream_chunk_rows,
                          settings.model_timeout_seconds)
    dataplane.sync_cache()
    events = EventLog(settings.runtime_dir)
    plog = None
    if settings.prediction_log_url:
        plog = PredictionLog(
            LogStore(settings.prediction_log_url), sample=settings.prediction_log_sample,
            inputs=settings.prediction_log_inputs.strip().lower() not in {"off", "0", "false"},
            buffer_rows=settings.prediction_log_buffer_rows,
            flush_seconds=settings.prediction_log_flush_seconds,
            retention_days=settings.prediction_log_retention_days, offload=offload)
    monitor = None
    if settings.drift_enabled:
        monitor = DriftMonitor(
            registry, events.dir, events, window_seconds=settings.drift_window_seconds,
            min_rows=settings.drift_min_rows,
            sample_rows_per_second=settings.drift_sample_rows_per_second, client=client,
            breaker_seconds=settings.redis_breaker_seconds)
    front = FrontDoor(registry, dataplane, Limits(settings.max_batch, settings.stream_max_rows,
                                                  settings.default_model), plog, monitor)

    def after_reload(report: ReloadReport) -> None:
        dataplane.on_reload(report)
        for key in report.failed:
            prometheus.LOAD_FAILURES.labels(key.rsplit("/", 1)[0]).inc()
        for kind, keys in (("version_added", report.added), ("version_changed", report.changed),
                           ("version_removed", report.removed), ("model_failed", report.failed)):
            for key in keys:
                model, version = key.rsplit("/", 1)
                events.publish(kind, {"model": model, "version": version})
        if ab.reload(force=report.touched):
            events.publish("experiments_reloaded", {"experiments": sorted(ab.items)})

    reloader.on_reload = after_reload
    reloader.acknowledge_start()
    def figures() -> dict[str, Any]:
        cache_status = cache.status()
        return {"cache": {"hits": cache_status.get("hits", 0),
                          "misses": cache_status.get("misses", 0)},
                "models_loaded": sum(len(e.versions) for e in registry.models.values()),
                "predictions": dataplane.predictions, "per_model": dict(dataplane.per_model)}

    live = WorkerFigures(events.dir, figures)
    app.extensions["model_server"] = ServerState(
        settings=settings,
        registry=registry,
        dataplane=dataplane,
        reloader=reloader,
        events=events,
        figures=live,
        front=front,
        started=time.time(),
    )
    if client is not None:  # without REDIS_URL, /jobs answers 404 jobs_off
        from server.jobs.broker import enqueue, make_client
        from server.jobs.service import JobService
        from server.jobs.store import JobStore

        queue = make_client(settings)
        app.extensions["jobs"] = JobService(
            JobStore(client, settings.job_result_ttl), settings.jobs_path,
            lambda job_id: enqueue(queue, job_id), settings.job_max_bytes,
            settings.job_max_active_per_key)
    install(app)
    install_compression(app)
    install_proxy_fix(app, settings)
    install_rate_limits(app, settings)
    install_cors(app, settings)
    for blueprint in (health.bp, models.bp, predict.bp, experiments.bp, stream.bp, ws.bp,
                      v2_oip.bp, v1_tfserving.bp, tokens.bp, train.bp, admin.bp, docs.bp,
                      dashboard.bp, predictions.bp, drift.bp, jobs.bp):
        app.register_blueprint(blueprint)
    reloader.start()
    live.start()
    if plog is not None:
        plog.start()
    if monitor is not None:
        monitor.start()
    prometheus.start_flushing()
    return app
