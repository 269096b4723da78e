"""GET /dashboard: the live operations page, and its files from ``server/static``.

The page is plain HTML, one script and one stylesheet (``static/dashboard/``) plus uPlot,
vendored from npm into ``static/vendor/uplot/``: no build step and nothing from another origin.
Its figures come from ``/ws/monitor`` and ``/stream/events``, the rest from the JSON API.
"""

from __future__ import annotations

import re
from pathlib import Path

from flask import Blueprint, Response, abort, request, send_from_directory

bp = Blueprint("dashboard", __name__)

STATIC = Path(__file__).resolve().parent.parent / "static"
# URL name -> file under STATIC, and how long a browser may keep it without asking.
# Only these files are served; nothing else under the folder is reachable from here.
SERVED = {
    "dashboard.js": ("dashboard/dashboard.js", 0),
    "dashboard.css": ("dashboard/dashboard.css", 0),
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", 86400),
    "uPlot.min.css": ("vendor/uplot/uPlot.min.css", 86400),
}
HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def content_security_policy(host: str) -> str:
    """Same origin only; WebSockets are named with the host explicitly, as browsers without
    CSP level 3 do not count ``ws:`` as ``'self'``. A Host header that is not a plain host
    name gets ``'self'`` alone."""
    sockets = f" ws://{host} wss://{host}" if HOST_RE.match(host) else ""
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


@bp.get("/dashboard")
def page() -> Response:
    response = send_from_directory(STATIC, "dashboard/index.html", max_age=0)
    response.headers["Content-Security-Policy"] = content_security_policy(request.host)
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/dashboard/<name>")
def asset(name: str) -> Response:
    if name not in SERVED:
        abort(404)
    path, max_age = SERVED[name]
    response = send_from_directory(STATIC, path, max_age=max_age)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
