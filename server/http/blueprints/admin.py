"""Admin: POST /admin/reload (alias /model/reload), artifact downloads."""

from __future__ import annotations

import os

from flask import Blueprint, Response, send_file

from server.errors import not_found
from server.http.auth import require_admin
from server.http.context import json_response, state

bp = Blueprint("admin", __name__)
bp.before_request(require_admin)


@bp.post("/admin/reload")
@bp.post("/model/reload")
def reload() -> Response:
    st = state()
    report = st.reloader.reload_everywhere(wait=2.0)
    models = st.registry.models
    return json_response({
        "status": "reloaded", "pid": os.getpid(), **report.as_dict(),
        "models": {n: e.servable for n, e in models.items()},
    })


def _send_artifact(name: str, version: str | None) -> Response:
    """Stream one artifact, sha256 as ETag. Names are checked and the path must resolve
    inside MODEL_DIR (symlinks included) before anything is opened."""
    st = state()
    lv = st.registry.resolve(name, version)
    path = st.registry.repository.artifact_path(lv.name, lv.version)
    if path is None:
        raise not_found("artifact", f"no artifact for model '{name}' version {lv.version}")
    return send_file(path, mimetype="application/octet-stream", as_attachment=True,
                     download_name=f"{lv.name}-{lv.version}.joblib", etag=lv.sha256,
                     conditional=True, max_age=0)


@bp.get("/models/<name>/versions/<version>/artifact")
def artifact(name: str, version: str) -> Response:
    return _send_artifact(name, version)


@bp.get("/download/model/<name>")
def download_latest(name: str) -> Response:
    return _send_artifact(name, None)
