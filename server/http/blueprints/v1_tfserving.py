"""TF Serving REST API (v1) over the same data plane: models, versions, labels, cache, auth.

``GET /v1/models/<m>[/versions/<v>|/labels/<l>][/metadata]`` and
``POST /v1/models/<m>[/versions/<v>|/labels/<l>]:predict|:classify|:regress``.

What the answers hold (details in ``server.protocols.tfserving``): a ``:predict`` element is a
classifier's probability vector in class order (TF classifiers' default signature), or a
regressor's float; ``signature_name: "predict"`` adds the predicted class as ``predictions``.
``:classify`` gives ``[[class_name, probability], ...]`` per example and ``:regress`` one float
per example; the other task's verb is a 400. Errors are ``{"error": "..."}`` only, with TF
Serving's codes: our 422 (invalid argument) becomes 400.

One route takes everything after ``/v1/models/`` and
``server.protocols.tfserving.parse_path`` reads it: Flask's converters would take
``iris:predict`` for a model name. The body is read as JSON whatever its Content-Type,
because TF Serving does and ``curl -d`` sends a form type.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from server.errors import ApiError
from server.http.app import error_handlers
from server.http.auth import require_api_key
from server.http.context import json_response, state
from server.http.origin import origin
from server.protocols import tfserving as tf

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

bp = Blueprint("v1_tfserving", __name__)
bp.before_request(require_api_key)
error_handlers(bp, tf.error_answer)


# Every method is routed here so that a wrong one, too, gets a TF-shaped error.
@bp.route("/v1/models", methods=METHODS, defaults={"rest": ""})
@bp.route("/v1/models/<path:rest>", methods=METHODS)
def v1_models(rest: str) -> Response:
    target = tf.parse_path(rest, request.method)
    g.model = target.model
    allowed = ("POST",) if target.verb else ("GET", "HEAD")
    if request.method not in allowed:
        what = f":{target.verb}" if target.verb else "model status and metadata"
        raise ApiError(405, "method_not_allowed", f"use {allowed[0]} for {what}",
                       headers={"Allow": ", ".join(allowed)})
    front = state().front
    if target.verb is None:
        if target.metadata:
            return json_response(tf.metadata(front.resolve(target.model, target.version,
                                                           target.label)))
        entry = state().registry.get(target.model)
        return json_response(tf.model_status(entry, target.version, target.label))
    body = tf.parse_body(request.get_data(cache=False))
    name = tf.signature_name(body)
    lv = front.resolve(target.model, target.version, target.label)
    g.version = lv.version
    sig = tf.choose_signature(lv, target.verb, name)
    if target.verb == "predict":
        X, key = tf.predict_matrix_of(lv, body, front.check_rows)
        outcome = front.predict(lv, X, [key], origin("tfserving"))
        answer = tf.predict_answer(sig, outcome.results, key)
    else:
        X = tf.examples_matrix(lv, body, front.check_rows)
        outcome = front.predict(lv, X, ["examples"], origin("tfserving"))
        answer = (tf.classify_answer(outcome.results) if target.verb == "classify"
                  else tf.regress_answer(outcome.results))
    g.cache = "HIT" if outcome.cached else "MISS"
    g.model_seconds = outcome.model_seconds
    return json_response(answer, headers={"X-Cache": g.cache})
