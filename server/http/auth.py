"""API keys, the admin token, the metrics key, rate limits and CORS."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from server.config import Settings
from server.errors import ApiError
from server.http.context import state

if TYPE_CHECKING:
    from flask_limiter import Limiter

log = logging.getLogger(__name__)


def presented_token(*headers: str) -> str:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name in headers:
        if request.headers.get(name):
            return request.headers[name]
    return ""


def _matches(presented: str, allowed: list[str]) -> bool:
    # Compare against every key so the time taken says nothing about which one matched.
    hit = False
    for key in allowed:
        hit |= hmac.compare_digest(presented.encode(), key.encode())
    return hit


def require_admin() -> None:
    token = state().settings.admin_token
    if not token:
        raise ApiError(403, "admin_disabled", "admin endpoints are off: set ADMIN_TOKEN")
    presented = presented_token("X-Admin-Token")
    if not presented or not _matches(presented, [token]):
        raise ApiError(401, "unauthorized", "admin token missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


def require_api_key() -> None:
    keys = state().settings.api_key_list
    if not keys:
        return
    presented = presented_token("X-API-Key")
    if not presented or not _matches(presented, keys):
        raise ApiError(401, "unauthorized", "API key missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


# --- Stream tokens: browsers cannot put a key on an EventSource or a WebSocket -------------
def token_signer() -> URLSafeTimedSerializer:
    """Signs with a secret derived from API_KEYS: every instance with the same keys accepts
    the same tokens, and changing the keys revokes them all."""
    keys = ",".join(sorted(state().settings.api_key_list))
    secret = hashlib.sha256(f"stream-token:{keys}".encode()).hexdigest()
    return URLSafeTimedSerializer(secret, salt="stream-token")


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def issue_stream_token() -> str:
    """A short-lived token for the key this request presented (never the key itself)."""
    return token_signer().dumps({"k": _key_id(presented_token("X-API-Key"))})


def require_api_key_or_token() -> None:
    """For SSE endpoints and WebSockets: an API key as usual, or ``?token=`` from
    ``POST /auth/stream-token``, unexpired and for a key that is still configured."""
    keys = state().settings.api_key_list
    token = request.args.get("token") if keys and request.query_string else None
    if not token or presented_token("X-API-Key"):
        require_api_key()
        return
    try:
        claims = token_signer().loads(token, max_age=state().settings.stream_token_seconds)
    except SignatureExpired as exc:
        raise ApiError(401, "unauthorized", "stream token expired: ask for a new one",
                       headers={"WWW-Authenticate": "Bearer"}) from exc
    except BadSignature as exc:
        raise ApiError(401, "unauthorized", "stream token invalid",
                       headers={"WWW-Authenticate": "Bearer"}) from exc
    if not isinstance(claims, dict) or claims.get("k") not in {_key_id(k) for k in keys}:
        raise ApiError(401, "unauthorized", "stream token for a key that is no longer valid",
                       headers={"WWW-Authenticate": "Bearer"})


def client_key() -> str:
    """Who a rate limit counts: a valid API key (hashed, never stored as is) when API_KEYS
    is set, else the client address (behind TRUSTED_PROXIES, the one they forwarded). A
    made-up key is no identity: a client cannot get a fresh counter by sending a new one."""
    keys = state().settings.api_key_list
    presented = presented_token("X-API-Key") if keys else ""
    if presented and _matches(presented, keys):
        return "key:" + hashlib.sha256(presented.encode()).hexdigest()[:16]
    return "addr:" + (request.remote_addr or "unknown")


def refuse_wrong_key() -> None:
    """With API_KEYS set, a wrong key is a 401 before any limit is counted for it."""
    keys = state().settings.api_key_list
    presented = presented_token("X-API-Key") if keys else ""
    if presented and not _matches(presented, keys):
        raise ApiError(401, "unauthorized", "API key missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


def install_cors(app: Flask, settings: Settings) -> None:
    """Cross-origin browsers only when configured (off by default)."""
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        from flask_cors import CORS

        CORS(app, origins=origins, expose_headers=["X-Request-ID", "X-Cache", "Retry-After"],
             allow_headers=["Content-Type", "Authorization", "X-API-Key", "X-Request-ID"])


def require_metrics_key() -> None:
    key = state().settings.metrics_key
    if key and not _matches(presented_token("X-API-Key"), [key]):
        raise ApiError(401, "unauthorized", "metrics key missing or wrong",
                       headers={"WWW-Authenticate": "Bearer"})


def install_proxy_fix(app: Flask, settings: Settings) -> None:
    """Behind TRUSTED_PROXIES proxies (nginx: 1), the client address is the one they put in
    X-Forwarded-For; with 0, a client's own X-Forwarded-For is ignored."""
    if settings.trusted_proxies > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]


def _retry_after_only_when_refused(response: Response) -> Response:
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


# Probes and scrapes: no key, never counted.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"})
# Never counted by RATE_LIMIT: the open paths, and /status (monitoring's per-worker figures,
# still behind its key), so watching a server never spends a client's quota.
UNLIMITED = OPEN_PATHS | {"/status"}


def install_rate_limits(app: Flask, settings: Settings) -> None:
    if not settings.rate_limit:
        return
    from flask_limiter import Limiter

    # Registered before the limiter's own hook, so it runs first.
    app.before_request(lambda: None if request.path in OPEN_PATHS else refuse_wrong_key())
    # The limiter puts Retry-After on every answer; it means "come back later" and belongs
    # only to 429 and 503. Registered before the limiter, so it runs after its header hook.
    app.after_request(_retry_after_only_when_refused)
    Limiter(
        client_key, app=app, default_limits=[settings.rate_limit],
        storage_uri=settings.redis_url or "memory://",
        storage_options={"socket_timeout": settings.redis_timeout,  # type: ignore[dict-item]
                         "socket_connect_timeout": settings.redis_timeout},  # type: ignore[dict-item]
        headers_enabled=True, swallow_errors=True,  # Redis down: serve, don't 500
        default_limits_exempt_when=lambda: request.path in UNLIMITED,
    )


def message_limiter() -> Callable[[], ApiError | None] | None:
    """For a WebSocket's messages, which no request hook sees: a function that counts one
    message against RATE_LIMIT in the bucket this request's handshake was counted in (same
    identity, same endpoint, flask-limiter's own storage: Redis when configured) and answers
    the 429 to send when over, else None. None without RATE_LIMIT: nothing to call."""
    limiters: set[Limiter] = current_app.extensions.get("limiter", set())
    limiter = next(iter(limiters), None)
    if limiter is None:
        return None
    endpoint = limiter.identify_request()
    # As flask-limiter checks a request: its default limits, smallest first, stop at the
    # first one breached (the larger ones are not charged for a refused message).
    buckets = [(lim.limit, (lim.key_func(), lim.scope_for(endpoint, request.method)))
               for lim in sorted(limiter.limit_manager.default_limits, key=lambda x: x.limit)
               if not lim.is_exempt]

    def count() -> ApiError | None:
        try:
            for item, args in buckets:
                if not limiter.limiter.hit(item, *args):
                    reset = limiter.limiter.get_window_stats(item, *args).reset_time
                    wait = max(1, math.ceil(reset - time.time()))
                    return ApiError(429, "rate_limited", f"{item} exceeded: retry in {wait} s",
                                    headers={"Retry-After": str(wait)})
        except Exception as exc:  # as swallow_errors does for requests: storage down, serve
            log.warning("rate limit storage failed, message not counted: %s", exc)
        return None

    return count
