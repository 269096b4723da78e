"""The prediction server: ``create_app`` wires everything; nothing is read at import time."""

from __future__ import annotations

import time

from flask import Flask

from server.config import Settings
from server.inference import DataPlane
from server.logs import configure_logging
from server.registry import ModelRegistry
from server.reloader import Reloader
from server.repository import ModelRepository


def create_app(settings: Settings | None = None) -> Flask:
    """Build one worker's application: settings, models, data plane, blueprints."""
    from server import web
    from server.blueprints import admin, health, models, predict

    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    registry = ModelRegistry(ModelRepository(settings.model_dir))
    registry.reload()
    reloader = Reloader(registry, settings.model_poll_seconds, settings.runtime_dir)
    app.extensions["model_server"] = web.ServerState(
        settings=settings,
        registry=registry,
        dataplane=DataPlane(registry),
        reloader=reloader,
        started=time.time(),
    )
    web.install(app)
    for blueprint in (health.bp, models.bp, predict.bp, admin.bp):
        app.register_blueprint(blueprint)
    reloader.start()
    return app
