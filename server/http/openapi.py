"""The OpenAPI 3.1 document of the native API, generated from ``server.schemas``.

Operations are a declarative table (path, method, summary, request and response models per
status, tags, security); their bodies' schemas come from the pydantic models through
``model_json_schema``, so the document cannot drift from what the server validates. Nothing
here imports Flask: ``build_document()`` is a pure function, served by ``blueprints.docs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel

from server import schemas as s
from server.http.auth import UNLIMITED  # every other operation may answer 429

JSON = "application/json"
SSE = "text/event-stream"
CSV = "text/csv"
REF = "#/components/schemas/{model}"

Security = Literal["api_key", "admin", "open"]
SchemaMode = Literal["validation", "serialization"]

# Errors each kind of operation can answer, beyond those its security adds.
JSON_BODY = (400, 413, 415, 422)
MODEL = (404,)
STREAM = (503,)

ERROR_TEXT = {
    400: "Malformed JSON or an empty body.",
    401: "API key or admin token missing or wrong (with WWW-Authenticate: Bearer).",
    403: "Admin endpoints are off: ADMIN_TOKEN is not set.",
    404: "Unknown model, version, label, experiment or route.",
    413: "Body larger than MAX_BODY_BYTES, or more rows than the endpoint takes.",
    409: "Conflicts with what the server holds (e.g. an outcome already recorded).",
    415: "Wrong Content-Type.",
    422: "Valid JSON that does not fit: wrong feature count, NaN, infinity, non-numbers, "
         "unknown fields. ``details`` says where.",
    429: "Rate limited: retry after Retry-After seconds.",
    503: "This worker holds MAX_STREAMS streams already: retry after Retry-After seconds.",
}

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
IRIS_BY_NAME = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                "petal_width": 0.2}


@dataclass(frozen=True)
class Body:
    """A request or response body: a pydantic model as JSON, or a raw schema for another
    media type (text, SSE, CSV)."""

    model: type[BaseModel] | None = None
    media: str = JSON
    schema: Mapping[str, Any] | None = None
    description: str = ""
    examples: Mapping[str, Any] = field(default_factory=dict)
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query"]
    description: str
    example: str | None = None


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tags: tuple[str, ...]
    responses: Mapping[int, Body]
    request: tuple[Body, ...] = ()
    params: tuple[Param, ...] = ()
    security: Security = "api_key"
    errors: tuple[int, ...] = ()
    description: str = ""
    external: str | None = None
    error_body: Body | None = None  # the protocol endpoints answer errors in their own shape

    @property
    def operation_id(self) -> str:
        words = [w.strip("{}") for w in self.path.replace(":", "/").split("/") if w]
        return "_".join([self.method.lower(), *words]).replace("-", "_") or self.method.lower()


MODEL_P = Param("model", "path", "Model name.", "iris")
VERSION_P = Param("version", "path", "Version number or label (stable, canary, latest).", "2")
VERSION_Q = Param("version", "query", "Version number or label when the body names none.")
EXPERIMENT_P = Param("name", "path", "Experiment name.", "iris-ab")

TEXT = {"type": "string"}
BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}
ANY_OBJECT = {"type": "object"}
PROTOCOL_ERROR = Body(schema={"type": "object", "required": ["error"],
                              "properties": {"error": {"type": "string"}}})
SSE_BODY = Body(media=SSE, schema=TEXT, description=(
    "Server-sent events: every event `data: <json>`, the last `data: [DONE]`; `: ping` "
    "comments while idle; a failure mid-stream is `event: error` before `[DONE]`."))


def _json(model: type[BaseModel], description: str = "", headers: tuple[str, ...] = (),
          **examples: Any) -> Body:
    return Body(model=model, description=description, headers=headers,
                examples={k: {"value": v} for k, v in examples.items()})


PREDICT_200 = _json(s.PredictResponse, "The prediction.", ("X-Cache",))

# --- scoring jobs -------------------------------------------------------------------------
PARQUET = "application/vnd.apache.parquet"
JOB_P = Param("job_id", "path", "The job's id (32 hex digits).",
              "3d5522f155af066f8aa6100b00274937")


def _job_error(description: str) -> Body:
    return Body(model=s.ErrorResponse, description=description)


JOBS_OFF = "`jobs_off`: the server has no REDIS_URL (the broker and the job store)."
JOB_404 = _job_error("`job_not_found`: no such job for this API key (unknown, another key's, "
                     "or expired after JOB_RESULT_TTL); or " + JOBS_OFF)
JOBS_503 = _job_error("`jobs_unavailable`: Redis is unreachable.")
JOB_409 = _job_error("`job_not_succeeded`: there is no result yet (or ever: the job failed "
                     "or was cancelled).")
JOB_FILE = ("Supports `Range` (206 with those bytes, 416 beyond the end), `If-None-Match` "
            "and `If-Modified-Since`.")
JOB_OPERATIONS = (
    Operation("POST", "/jobs", "Submit a scoring job: a CSV or Parquet file as the body",
              ("jobs",),
              {202: _json(s.JobCreated, "Queued; `Location` is the status URL.",
                          ("Location",)),
               404: _job_error("Unknown model or version; or " + JOBS_OFF),
               413: _job_error("The upload is larger than JOB_MAX_BYTES (checked as it "
                               "arrives)."),
               422: _job_error("No model named, a CSV header that lacks a feature, a file "
                               "that is not CSV or Parquet, chunk_rows out of range, or "
                               "`object_storage_unavailable` for the JSON form."),
               429: Body(model=s.ErrorResponse, headers=("Retry-After",), description=(
                   "`too_many_jobs`: the key has JOB_MAX_ACTIVE_PER_KEY jobs queued or "
                   "running (or the rate limit).")),
               503: Body(model=s.ErrorResponse, headers=("Retry-After",), description=(
                   "`jobs_unavailable` (Redis unreachable), "
                   "`queue_unavailable` or `jobs_storage_full`."))},
              request=(Body(media=CSV, schema=TEXT, description=(
                           "A header row naming the features (extra columns pass through), "
                           "then one row per line.")),
                       Body(media=PARQUET, schema=BINARY, description="A Parquet file."),
                       _json(s.JobInputRequest, s3={"input": "s3://bucket/rows.csv",
                                                    "model": "iris"})),
              params=(Param("model", "query", "Model name.", "iris"), VERSION_Q,
                      Param("chunk_rows", "query", "Rows per part, 1000-1000000 (50000): "
                            "the grain of progress, cancelling and resuming.")),
              errors=(400, 404, 415), description=(
                  "The body is streamed to JOBS_DIR, never held in memory; a body sent as "
                  "`application/octet-stream` is told apart by its first bytes. Queue "
                  "workers (`celery -A server.jobs.queue worker`) score it; the result has "
                  "the input's format. The job belongs to the API key that sent it.")),
    Operation("GET", "/jobs", "The caller's scoring jobs, newest first", ("jobs",),
              {200: _json(s.JobList), 404: _job_error(JOBS_OFF), 503: JOBS_503}),
    Operation("GET", "/jobs/{job_id}", "A scoring job's state and progress", ("jobs",),
              {200: _json(s.JobView), 404: JOB_404, 503: JOBS_503}, params=(JOB_P,)),
    Operation("DELETE", "/jobs/{job_id}", "Cancel a scoring job", ("jobs",),
              {202: _json(s.JobView, "Cancelled (a queued job), or the cancel is on its way "
                                     "(a running job stops before its next chunk)."),
               404: JOB_404, 409: _job_error("`job_finished`: the job has already ended."),
               503: JOBS_503}, params=(JOB_P,)),
    Operation("GET", "/jobs/{job_id}/events", "A scoring job's progress as server-sent events",
              ("jobs",), {200: SSE_BODY, 404: JOB_404,
                          503: Body(model=s.ErrorResponse, headers=("Retry-After",),
                                    description="Redis unreachable, or MAX_STREAMS reached.")},
              params=(JOB_P,), description=(
                  "`event: progress` `{job_id, state, rows_done, rows_total, "
                  "rows_per_second, eta_seconds, rejects}` whenever they change, then the "
                  "whole job (as GET /jobs/{job_id}) once it has ended, then `[DONE]`. "
                  "Accepts `?token=` (POST /auth/stream-token).")),
    Operation("GET", "/jobs/{job_id}/result", "Download a succeeded job's result", ("jobs",),
              {200: Body(media=CSV, schema=TEXT, description=(
                  "The input's rows with prediction columns appended, in the input's "
                  "format (`application/vnd.apache.parquet` for a Parquet job). " + JOB_FILE)),
               206: Body(media=CSV, schema=TEXT, description="The bytes a `Range` asked for."),
               404: JOB_404, 409: JOB_409,
               416: _job_error("The `Range` lies beyond the end of the file."),
               503: JOBS_503}, params=(JOB_P,)),
    Operation("GET", "/jobs/{job_id}/rejects", "Download a succeeded job's rejected rows",
              ("jobs",),
              {200: Body(media=CSV, schema=TEXT, description=(
                  "`row,reason`: each row that could not be scored (data rows counted from "
                  "1) and why, in the words of POST /predict/csv. " + JOB_FILE)),
               206: Body(media=CSV, schema=TEXT, description="The bytes a `Range` asked for."),
               404: JOB_404, 409: JOB_409,
               416: _job_error("The `Range` lies beyond the end of the file."),
               503: JOBS_503}, params=(JOB_P,)),
)
PREDICT_DOC = ("Features are a list in the model's feature order, or an object keyed by feature "
               "name. The version comes from the path, else the body, else `?version=`, else "
               "`latest`.")

OPERATIONS: tuple[Operation, ...] = (
    # --- predictions ----------------------------------------------------------------------
    Operation("POST", "/predict", "Predict one row", ("predict",), {200: PREDICT_200},
              request=(_json(s.PredictRequest, by_list={"model": "iris", "features": IRIS_ROW},
                             by_name={"model": "iris", "version": "stable",
                                      "features": IRIS_BY_NAME}),),
              params=(VERSION_Q,), errors=JSON_BODY + MODEL, description=PREDICT_DOC),
    Operation("POST", "/predict/{model}", "Predict one row with the model in the path",
              ("predict",), {200: PREDICT_200},
              request=(_json(s.PredictRequest, features={"features": IRIS_ROW}),),
              params=(MODEL_P, VERSION_Q), errors=JSON_BODY + MODEL,
              description=PREDICT_DOC + " A bare JSON list as the body is the features."),
    Operation("POST", "/predict/{model}/versions/{version}", "Predict one row with a version",
              ("predict",), {200: PREDICT_200},
              request=(_json(s.PredictRequest, features={"features": IRIS_ROW}),),
              params=(MODEL_P, VERSION_P), errors=JSON_BODY + MODEL, description=PREDICT_DOC),
    Operation("POST", "/predict/batch", "Predict up to MAX_BATCH rows in one model call",
              ("predict",), {200: _json(s.BatchResponse, "One answer per row, in order.")},
              request=(_json(s.BatchRequest, rows={
                  "model": "iris", "instances": [IRIS_ROW, [6.7, 3.0, 5.2, 2.3]]}),),
              errors=JSON_BODY + MODEL,
              description="413 `too_many_rows` beyond MAX_BATCH rows (default 1000)."),
    # --- experiments ----------------------------------------------------------------------
    *(Operation("POST", path, summary, ("experiments",),
                {200: _json(s.ABResponse, "The prediction of the user's arm.", ("X-Cache",))},
                request=(_json(s.ABRequest, user={"experiment": "iris-ab", "user_id": "u42",
                                                  "features": IRIS_ROW}),),
                errors=JSON_BODY + MODEL,
                description="The same user lands in the same arm in every worker and host.")
      for path, summary in (("/predict/ab", "Predict through an A/B experiment"),
                            ("/predict/ab-test", "Predict through an A/B experiment (alias)"))),
    Operation("GET", "/experiments", "List experiments with per-arm figures", ("experiments",),
              {200: _json(s.ExperimentsResponse)}),
    Operation("GET", "/experiments/{name}", "One experiment with per-arm figures",
              ("experiments",), {200: _json(s.ExperimentView)}, params=(EXPERIMENT_P,),
              errors=MODEL),
    Operation("POST", "/experiments/{name}/outcome", "Record an outcome for a user's arm",
              ("experiments",), {200: _json(s.OutcomeResponse)},
              request=(_json(s.OutcomeRequest, conversion={"user_id": "u42", "value": 1}),),
              params=(EXPERIMENT_P,), errors=JSON_BODY + MODEL + (409,),
              description="One outcome per user the experiment served, counted for the arm "
                          "that served them: `409 not_served` for a user it never served, "
                          "`409 outcome_recorded` for a second outcome."),
    Operation("POST", "/auth/stream-token", "A stream token for browsers",
              ("streaming",), {200: _json(s.StreamTokenResponse)},
              description="Browsers cannot put an API key on an EventSource or a WebSocket: "
                          "SSE endpoints and WebSockets accept this token as `?token=`."),
    # --- models ---------------------------------------------------------------------------
    Operation("GET", "/models", "Every model: versions, labels, features, classes, sha256",
              ("models",), {200: _json(s.ModelsResponse)}),
    Operation("GET", "/models/{model}", "One model", ("models",), {200: _json(s.ModelInfo)},
              params=(MODEL_P,), errors=MODEL),
    # --- operations -----------------------------------------------------------------------
    Operation("GET", "/health", "Liveness", ("operations",), {200: _json(s.HealthResponse)},
              security="open"),
    Operation("GET", "/ready", "Readiness: 200 once every model is loaded", ("operations",),
              {200: _json(s.ReadyResponse), 503: _json(s.ReadyResponse, "Not ready (yet).")},
              security="open"),
    Operation("GET", "/status", "Uptime, predictions served, models, cache state",
              ("operations",), {200: _json(s.StatusResponse)}),
    # --- monitoring -----------------------------------------------------------------------
    Operation("GET", "/predictions", "The prediction log, newest first", ("monitoring",),
              {200: _json(s.PredictionsPage)},
              params=tuple(Param(n, "query", d) for n, d in (
                  ("model", "Only this model."), ("version", "Only this version."),
                  ("since", "From this time (ISO 8601 or Unix seconds)."),
                  ("until", "Before this time."), ("request_id", "Only this request's rows."),
                  ("limit", "Rows per page, 1-1000 (100)."),
                  ("cursor", "The previous page's `next`."))),
              security="admin", errors=(404, 422, 503)),
    Operation("POST", "/feedback", "The truth for logged predictions", ("monitoring",),
              {200: _json(s.FeedbackResponse)},
              request=(_json(s.FeedbackItem, one={"request_id": "r-1", "label": "setosa"},
                             regressor={"request_id": "r-2", "value": 151.3}),
                       _json(s.FeedbackBatch, many={"items": [
                           {"request_id": "r-1", "label": "setosa"},
                           {"request_id": "r-3", "row": 2, "label": "virginica"}]})),
              errors=JSON_BODY + (404, 503),
              description="An unknown request id is `not_found` in its item's result and "
                          "fails none of the others."),
    Operation("GET", "/models/{model}/versions/{version}/quality",
              "Accuracy or MAE/RMSE over the labelled predictions", ("monitoring",),
              {200: _json(s.QualityResponse)},
              params=(MODEL_P, VERSION_P, Param("since", "query", "From this time.")),
              errors=MODEL + (422, 503)),
    Operation("GET", "/models/{model}/versions/{version}/drift",
              "Live drift against the training profile, per feature", ("monitoring",),
              {200: _json(s.DriftResponse)}, params=(MODEL_P, VERSION_P),
              errors=MODEL + (503,),
              description="PSI and a chi-square p-value per feature and for the predictions "
                          "over DRIFT_WINDOW_SECONDS, summed over every worker (and instance, "
                          "with Redis). `status` is `no_reference` for a version without a "
                          "usable profile.json and `not_enough_rows` below DRIFT_MIN_ROWS, "
                          "with the `reason`; `404 drift_off` under DRIFT=off."),
    Operation("GET", "/metrics", "Prometheus metrics, summed over every worker",
              ("operations",), {200: Body(media="text/plain", schema=TEXT,
                                          description="Prometheus text exposition format.")},
              security="open"),
    # --- admin ----------------------------------------------------------------------------
    *(Operation("POST", path, summary, ("admin",),
                {200: _json(s.ReloadResponse, "Rescanned in every worker.")}, security="admin")
      for path, summary in (("/admin/reload", "Rescan the model repository"),
                            ("/model/reload", "Rescan the model repository (alias)"))),
    Operation("GET", "/models/{model}/versions/{version}/artifact", "Download an artifact",
              ("admin",), {200: Body(media="application/octet-stream", schema=BINARY,
                                     description="The joblib artifact; its sha256 is the ETag.")},
              params=(MODEL_P, VERSION_P), security="admin", errors=MODEL),
    Operation("GET", "/download/model/{model}", "Download the latest artifact (alias)",
              ("admin",), {200: Body(media="application/octet-stream", schema=BINARY,
                                     description="The joblib artifact; its sha256 is the ETag.")},
              params=(MODEL_P,), security="admin", errors=MODEL),
    Operation("POST", "/train/stream", "Train a new version, streamed epoch by epoch", ("admin",),
              {200: SSE_BODY},
              request=(Body(model=s.TrainRequest, media=JSON),
                       Body(media=CSV, schema=TEXT, description=(
                           "Training rows with a header: the features and `target`; "
                           "model and epochs then go in the query."))),
              security="admin", errors=JSON_BODY + MODEL + STREAM,
              description="One event per epoch `{epoch, total_epochs, loss, accuracy}`, then "
                          "`{status: complete, version}`; the new version serves at once. "
                          "`\"source\": \"feedback\"` trains on the prediction log's labelled "
                          "rows (`since`, `version` narrow them); 503 while its database is "
                          "down."),
    # --- streaming ------------------------------------------------------------------------
    Operation("POST", "/predict/stream", "Predict many rows as server-sent events",
              ("streaming",), {200: SSE_BODY},
              request=(_json(s.BatchRequest, rows={"model": "iris", "instances": [IRIS_ROW]}),),
              errors=JSON_BODY + MODEL + STREAM,
              description="One event per row `{index, prediction, ...}` and `event: progress` "
                          "events `{done, total}`."),
    Operation("POST", "/predict/csv", "Score a CSV body, streamed back with predictions",
              ("streaming",),
              {200: Body(media=CSV, schema=TEXT,
                         description="The rows sent, with prediction columns appended. "
                                     "With `Accept: text/event-stream`, progress events.")},
              request=(Body(media=CSV, schema=TEXT,
                            description="A header row of feature names, then one row per line."),),
              params=(Param("model", "query", "Model name.", "iris"), VERSION_Q),
              errors=(400, 404, 413, 415, 422) + STREAM),
    Operation("GET", "/stream/events", "Live server events (reloads, new versions, metrics)",
              ("streaming",), {200: SSE_BODY}, errors=STREAM),
    *JOB_OPERATIONS,
    # --- this document --------------------------------------------------------------------
    Operation("GET", "/openapi.json", "This document", ("docs",),
              {200: Body(schema=ANY_OBJECT, description="OpenAPI 3.1.")}, security="open"),
    Operation("GET", "/docs", "Swagger UI over this document", ("docs",),
              {200: Body(media="text/html", schema=TEXT)}, security="open"),
    # --- the live dashboard -----------------------------------------------------------------
    Operation("GET", "/dashboard", "The live operations page", ("dashboard",),
              {200: Body(media="text/html", schema=TEXT)}, security="open",
              description="Live figures from /ws/monitor and /stream/events, A/B arms, "
                          "a prediction form and a training button; same origin only."),
    Operation("GET", "/dashboard/{asset}", "A file of the dashboard page", ("dashboard",),
              {200: Body(media="text/javascript", schema=TEXT,
                         description="dashboard.js, dashboard.css, uPlot.iife.min.js or "
                                     "uPlot.min.css (text/css for the stylesheets).")},
              params=(Param("asset", "path", "File name.", "dashboard.js"),),
              security="open", errors=(404,)),
    # --- other protocols on the same port: see their own specs ------------------------------
    *(Operation(method, path, summary, ("tfserving",),
                {200: Body(schema=ANY_OBJECT, description="As TF Serving answers.")},
                request=(Body(schema=ANY_OBJECT),) if method == "POST" else (),
                params=(MODEL_P,), errors=(400, 404, 413, 415) if method == "POST" else (404,),
                external="https://www.tensorflow.org/tfx/serving/api_rest",
                error_body=PROTOCOL_ERROR)
      for method, path, summary in (
          ("GET", "/v1/models/{model}", "TF Serving: model status"),
          ("GET", "/v1/models/{model}/metadata", "TF Serving: model metadata"),
          ("POST", "/v1/models/{model}:predict", "TF Serving: predict (instances or inputs)"),
          ("POST", "/v1/models/{model}:classify", "TF Serving: classify"),
          ("POST", "/v1/models/{model}:regress", "TF Serving: regress"))),
    *(Operation(method, path, summary, ("v2",),
                {200: Body(schema=ANY_OBJECT, description="As the Open Inference Protocol says.")},
                request=(Body(schema=ANY_OBJECT),) if method == "POST" else (),
                params=tuple(p for p in (MODEL_P, VERSION_P) if f"{{{p.name}}}" in path),
                errors=((400, 413, 415) if method == "POST" else ())
                + ((404,) if "{model}" in path else ()),
                external="https://kserve.github.io/website/latest/modelserving/data_plane/"
                         "v2_protocol/",
                error_body=PROTOCOL_ERROR)
      for method, path, summary in (
          ("GET", "/v2", "Open Inference Protocol: server metadata"),
          ("GET", "/v2/health/live", "Open Inference Protocol: live"),
          ("GET", "/v2/health/ready", "Open Inference Protocol: ready"),
          ("GET", "/v2/models/{model}", "Open Inference Protocol: model metadata"),
          ("GET", "/v2/models/{model}/ready", "Open Inference Protocol: model ready"),
          ("POST", "/v2/models/{model}/infer",
           "Open Inference Protocol: infer (JSON or the binary tensor extension)"),
          ("GET", "/v2/models/{model}/versions/{version}",
           "Open Inference Protocol: model version metadata"),
          ("GET", "/v2/models/{model}/versions/{version}/ready",
           "Open Inference Protocol: model version ready"),
          ("POST", "/v2/models/{model}/versions/{version}/infer",
           "Open Inference Protocol: infer with a version"))),
)

SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "One of API_KEYS; `Authorization: Bearer <key>` works too. "
                              "Needed only when the server sets API_KEYS."},
    "AdminToken": {"type": "http", "scheme": "bearer",
                   "description": "ADMIN_TOKEN (or send it as X-Admin-Token)."},
}
SECURITY: dict[Security, list[dict[str, list[str]]]] = {
    # The empty requirement: with API_KEYS unset the model endpoints are open.
    "api_key": [{"ApiKey": []}, {}],
    "admin": [{"AdminToken": []}],
    "open": [],
}
HEADERS = {
    "X-Request-ID": {"description": "The request's id: the client's X-Request-ID if it sent a "
                                    "safe one, else a new one.",
                     "required": True, "schema": {"type": "string"}},
    "X-Cache": {"description": "HIT or MISS: whether the prediction came from the cache.",
                "schema": {"type": "string", "enum": ["HIT", "MISS"]}},
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}},
    "Location": {"description": "Where the new resource is.", "schema": {"type": "string"}},
}


class Components:
    """Component schemas gathered from the models, each under its own name."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: SchemaMode) -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF, mode=mode)
        for name, sub in schema.pop("$defs", {}).items():
            self._add(name, sub)
        self._add(model.__name__, schema)
        return {"$ref": REF.format(model=model.__name__)}

    def _add(self, name: str, schema: dict[str, Any]) -> None:
        known = self.schemas.setdefault(name, schema)
        if known != schema:
            # The same model as request and answer with two shapes: name them apart first.
            raise ValueError(f"two different schemas named {name!r} in the document")


def _media(body: Body, components: Components, mode: SchemaMode) -> dict[str, Any]:
    if body.model is not None:
        schema: Mapping[str, Any] = components.ref(body.model, mode)
    else:
        schema = body.schema or {}
    out: dict[str, Any] = {"schema": dict(schema)}
    if body.examples:
        out["examples"] = dict(body.examples)
    return out


def _response(body: Body, components: Components, status: int) -> dict[str, Any]:
    names = ("X-Request-ID", *body.headers)
    return {
        "description": body.description or ERROR_TEXT.get(status, "OK"),
        "headers": {n: {"$ref": f"#/components/headers/{n}"} for n in names},
        "content": {body.media: _media(body, components, "serialization")},
    }


def _error_statuses(op: Operation) -> list[int]:
    extra = {"api_key": (401,), "admin": (401, 403), "open": ()}[op.security]
    limited = () if op.path in UNLIMITED else (429,)
    return sorted({*op.errors, *extra, *limited})


def _operation(op: Operation, components: Components) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                           "tags": list(op.tags)}
    if op.description:
        out["description"] = op.description
    if op.external:
        out["externalDocs"] = {"url": op.external, "description": "The protocol's own spec."}
    if op.params:
        out["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.where == "path",
             "description": p.description,
             # An empty query value means "not given"; a path segment is never empty.
             "schema": {"type": "string", **({"minLength": 1} if p.where == "path" else {})},
             **({"example": p.example} if p.example is not None else {})}
            for p in op.params
        ]
    if op.request:
        out["requestBody"] = {"required": True, "content": {
            b.media: _media(b, components, "validation") for b in op.request}}
    responses = {str(status): _response(body, components, status)
                 for status, body in op.responses.items()}
    for status in _error_statuses(op):
        if str(status) not in responses:
            error = op.error_body or Body(model=s.ErrorResponse)
            if status in (429, 503):
                error = replace(error, headers=("Retry-After",))
            responses[str(status)] = _response(error, components, status)
    out["responses"] = responses
    out["security"] = SECURITY[op.security]
    return out


@cache
def build_document(version: str = "1") -> dict[str, Any]:
    """The whole OpenAPI 3.1 document. Cached: it depends on the code only. Callers that
    change it must copy it first."""
    components = Components()
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Prediction server",
            "version": version,
            "summary": "scikit-learn models over HTTP: native JSON API, SSE streams, "
                       "TF Serving and Open Inference Protocol endpoints.",
            "description": "Every error is JSON `{error, code, request_id}` (plus `details` "
                           "for validation) and every response carries X-Request-ID. "
                           "WebSockets (`/ws/predict`, `/ws/monitor`) are not described here.",
        },
        "tags": [{"name": t} for t in dict.fromkeys(t for op in OPERATIONS for t in op.tags)],
        "paths": paths,
        "components": {"schemas": dict(sorted(components.schemas.items())),
                       "headers": HEADERS, "securitySchemes": SECURITY_SCHEMES},
    }
