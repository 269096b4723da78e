"""Who and where a prediction came from, for the prediction log: taken while the request is
at hand (a stream's rows are logged after the view has returned)."""

from __future__ import annotations

from server.http.auth import client_key
from server.http.context import request_id, state
from server.serving.predlog import Origin


def origin(door: str, experiment: str | None = None, arm: str | None = None) -> Origin | None:
    """The request's id, the door, and the API key's hash (never the key); None when the
    prediction log is off, so that nothing is computed for it."""
    if state().front.log is None:
        return None
    key = client_key() if state().settings.api_key_list else ""
    return Origin(request_id(), door, key[4:] if key.startswith("key:") else None,
                  experiment, arm)
