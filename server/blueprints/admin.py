"""POST /admin/reload (alias /model/reload): rescan the repository in every worker."""

from __future__ import annotations

import os

from flask import Blueprint, Response

from server.web import json_response, require_admin, state

bp = Blueprint("admin", __name__)
bp.before_request(require_admin)


@bp.post("/admin/reload")
@bp.post("/model/reload")
def reload() -> Response:
    st = state()
    report = st.reloader.reload_everywhere()
    models = st.registry.models
    return json_response({
        "status": "reloaded", "pid": os.getpid(), **report.as_dict(),
        "models": {n: sorted(e.versions, key=int) for n, e in models.items()},
    })
