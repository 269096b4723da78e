"""Request bodies as pydantic models: strict numbers, finite only, no unknown fields; and the
answers as response models, which document the API (``server.http.openapi``) but serialize
nothing."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from server.errors import MESSAGE_CHARS, echo

LIST_TAG = "[list]"
OBJECT_TAG = "[object]"


def _row_kind(value: Any) -> str:
    return OBJECT_TAG if isinstance(value, dict) else LIST_TAG


Row = Annotated[
    Union[
        Annotated[list[float], Tag(LIST_TAG)],
        Annotated[dict[str, float], Tag(OBJECT_TAG)],
    ],
    Discriminator(_row_kind),
]


def _version(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError("version must be a string or an integer")


# ``json_schema_input_type`` only tells the OpenAPI document what is accepted; it validates nothing.
# Written ``str | int | None``, not ``Optional[Union[str, int]]``: typing caches unions by
# equality, so a ``Union[int, str]`` made earlier by any other module came back instead and
# flipped the order in the document, which then depended on what the process imported first.
Version = Annotated[Optional[str],
                    BeforeValidator(_version, json_schema_input_type=str | int | None)]

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _user_id(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("user_id must be a non-empty string or an integer")


UserId = Annotated[str, BeforeValidator(_user_id, json_schema_input_type=Union[str, int]),
                   Field(max_length=256)]
# A client's own id for the request (seed 004's clients send one): echoed as the request id.
RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
# ``model_version`` is the guides' name for ``version`` (seed 000's clients send it).
VERSION_NAMES = AliasChoices("version", "model_version")


class PredictRequest(BaseModel):
    """One row: ``features`` in the model's feature order, or keyed by feature name."""

    model_config = _STRICT
    model: str | None = Field(None, description="Model name (or the path's).")
    version: Version = Field(None, validation_alias=VERSION_NAMES,
                             description="Version number, label or 'latest' (alias "
                             "model_version).")
    features: Row
    request_id: Optional[RequestId] = Field(None, description="Used as the request's id.")
    user_id: Optional[UserId] = Field(
        None, description="Routes the row through the one active experiment that targets "
        "the model (when no version is named), as /predict/ab does.")


class BatchRequest(BaseModel):
    """Up to MAX_BATCH rows predicted with one model call."""

    model_config = _STRICT
    model: str | None = None
    version: Version = Field(None, validation_alias=VERSION_NAMES)
    instances: list[Row] = Field(min_length=1)
    request_id: Optional[RequestId] = None


class ABRequest(BaseModel):
    """A prediction through an experiment: the user's arm picks the version."""

    model_config = _STRICT
    experiment: str = Field(min_length=1)
    user_id: UserId
    features: Row
    request_id: Optional[RequestId] = None


class OutcomeRequest(BaseModel):
    """An observed outcome for a user the experiment served: 0/1 (conversion) or any number
    (revenue, time...). One per user; it counts for the arm that served them."""

    model_config = _STRICT
    user_id: UserId
    # Bounded so that sums of squares stay finite: one 1e308 would spoil the stats for good.
    value: float = Field(ge=-1e12, le=1e12)



# What datetime can show back: the years 1 to 9999, in Unix seconds.
EARLIEST, LATEST = -62135596800.0, 253402300799.0


def parse_time(raw: Any) -> float:
    """A point in time: Unix seconds (a number or its text) or ISO 8601 text
    (``2026-12-03T10:00:00Z``; no zone = UTC)."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError("a time is ISO 8601 text or Unix seconds")
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            try:
                when = datetime.fromisoformat(raw.strip())
            except ValueError:
                raise ValueError(f"not a time: '{echo(raw)}' (ISO 8601 or Unix seconds)"
                                 ) from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            value = when.timestamp()
    else:
        value = float(raw) if abs(raw) < 1e300 else math.inf  # a 400-digit int: no float
    if not math.isfinite(value) or not EARLIEST <= value <= LATEST:
        raise ValueError(f"not a time: '{echo(str(raw))}' (Unix seconds from year 1 to 9999)")
    return value


def _time(value: Any) -> Any:
    return None if value is None else parse_time(value)


# Unix seconds once validated; ISO 8601 text or Unix seconds on the way in.
Time = Annotated[Optional[float],
                 BeforeValidator(_time, json_schema_input_type=str | float | None)]


class TrainRequest(BaseModel):
    """What to train: a model that exists, for 1..1000 epochs, on the model's training data
    (``source: repository``) or on the labelled rows of the prediction log (``feedback``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1, max_length=128, description="Model name.")
    epochs: int = Field(10, ge=1, le=1000, description="Passes over the training rows.")
    source: Literal["repository", "feedback"] = Field(
        "repository", description="'repository': the model's data/train.csv (or the CSV "
        "posted as the body); 'feedback': the prediction log's rows that have a true label "
        "or value (POST /feedback) and their features logged.")
    since: Time = Field(None, description="With source 'feedback': only rows predicted at "
                        "or after this time (ISO 8601, no zone = UTC, or Unix seconds).")
    version: Version = Field(None, validation_alias=VERSION_NAMES,
                             description="With source 'feedback': only rows predicted by "
                             "this version (number or label); default: every version.")

    @model_validator(mode="after")
    def _feedback_only(self) -> TrainRequest:
        if self.source != "feedback" and (self.since is not None or self.version is not None):
            raise ValueError("'since' and 'version' choose prediction log rows: they need "
                             "\"source\": \"feedback\"")
        return self


class FeedbackItem(BaseModel):
    """The truth for one logged prediction: a class (``label``) or a number (``value``)."""

    model_config = _STRICT
    request_id: str = Field(pattern=r"^[A-Za-z0-9._:@/+=-]{1,128}$",
                            description="The id the prediction was answered with.")
    row: int = Field(0, ge=0, le=1_000_000_000,
                     description="The row of a batch (0 for a single prediction).")
    label: str | int | None = Field(  # not Optional[Union[...]]: see Version above
        None, description="The true class, as the answer's `label` names it.")
    value: Optional[float] = Field(None, ge=-1e300, le=1e300,
                                   description="The true value, for a regressor.")

    @model_validator(mode="after")
    def _one_truth(self) -> FeedbackItem:
        if (self.label is None) == (self.value is None):
            raise ValueError("send exactly one of 'label' (a class) or 'value' (a number)")
        if isinstance(self.label, str) and not 1 <= len(self.label) <= 256:
            raise ValueError("'label' must be 1 to 256 characters")
        return self


class FeedbackBatch(BaseModel):
    model_config = _STRICT
    items: list[FeedbackItem] = Field(min_length=1, max_length=10_000)


def error_details(errors: list[Any]) -> list[dict[str, Any]]:
    """pydantic errors as ``{"loc", "msg"}`` with the union tags taken out of the path."""
    return [
        {"loc": [echo(p) if isinstance(p, str) else p for p in e["loc"]
                 if p not in (LIST_TAG, OBJECT_TAG)],
         "msg": echo(e["msg"].removeprefix("Value error, "), MESSAGE_CHARS)}
        for e in errors
    ]


# --- Answers ------------------------------------------------------------------------------
# These document what the server sends (``server.http.openapi`` turns them into the OpenAPI
# components); the views build plain dicts. They stay open to extra keys so that a new field
# in an answer is not a breaking change for a client validating against the document.

Prediction = Annotated[
    Union[float, str, bool],
    Field(description="The estimator's own prediction: a class (as the model stores it, e.g. 0) "
                      "for classifiers, a float for regressors."),
]


class ErrorDetail(BaseModel):
    """Where a validation error is: a path into the body (keys and list indexes) and why."""

    loc: list[Union[str, int]] = Field(description="Path into the body, e.g. ['features', 1].")
    msg: str = Field(description="What is wrong there.")


class ErrorResponse(BaseModel):
    """Every error, whatever the status."""

    error: str = Field(description="A message for a person.")
    code: str = Field(description="A machine code, e.g. validation_error, model_not_found.")
    request_id: str = Field(description="The request's id, also in the X-Request-ID header.")
    details: Optional[list[ErrorDetail]] = Field(
        None, description="Validation errors (422, 413 too many rows), one per field.")


class RowResult(BaseModel):
    """One row's answer. Classifiers add label (and, with predict_proba, confidence and
    probabilities); regressors answer the prediction alone."""

    prediction: Prediction
    label: Optional[str] = Field(None, description="Class name of the prediction.")
    confidence: Optional[float] = Field(None, description="Probability of the predicted class.")
    probabilities: Optional[dict[str, float]] = Field(
        None, description="Probability per class name.")


class PredictResponse(RowResult):
    """One prediction. ``X-Cache: HIT|MISS`` tells whether it came from the cache."""

    model: str
    version: str = Field(description="The version that answered, always a string.")
    cached: bool = Field(description="Served from the prediction cache.")
    request_id: str


class ABResponse(PredictResponse):
    """A prediction through an experiment, with the arm the user landed in."""

    experiment: str
    arm: str = Field(description="The arm's name; the same user always gets the same arm.")


class BatchResponse(BaseModel):
    """Predictions for every row, in the order sent; classifier-only columns as in predict."""

    model: str
    version: str
    count: int = Field(ge=1)
    predictions: list[Prediction]
    labels: Optional[list[str]] = None
    confidences: Optional[list[float]] = None
    probabilities: Optional[list[dict[str, float]]] = None
    cached: int = Field(ge=0, description="How many rows were served from the cache.")
    request_id: str


class HealthResponse(BaseModel):
    """Liveness: the process answers (no I/O behind it)."""

    status: str = Field(description="Always 'ok'.")


class ReadyResponse(BaseModel):
    """Readiness: 200 once every model is loaded, 503 (same shape, with a reason) before."""

    status: str = Field(description="'ready' or 'not_ready'.")
    models: dict[str, list[str]] = Field(description="Servable versions per model.")
    failed: list[str] = Field(description="'model/version' artifacts that failed to load.")
    cache: str = Field(description="Cache state: ok, off, degraded...")
    prediction_log: str = Field(description="The prediction log's state: ok, down, starting "
                                "or off (never a reason to be unready).")
    reason: Optional[str] = Field(None, description="Why not ready.")


class CacheStatus(BaseModel):
    """The prediction cache as this worker sees it."""

    enabled: bool
    backend: str = Field(description="off, memory or redis.")
    state: str
    hits: int
    misses: int
    hit_ratio: Optional[float]


class ModelStatus(BaseModel):
    latest: Optional[str]
    labels: dict[str, str]
    versions: list[str]
    failed: list[str]


class StatusResponse(BaseModel):
    """What this worker serves and has served."""

    status: str
    pid: int
    uptime_seconds: float
    predictions_served: int
    rss_mb: Optional[float] = None
    streams: dict[str, int] = Field(description="Streams started, completed, cancelled; rows.")
    scope: str = Field(description="Whose figures these are: 'this worker'.")
    models: dict[str, ModelStatus]
    last_reload: Optional[float] = Field(description="Unix time of the last repository scan.")
    cache: CacheStatus
    blas_threads: Optional[int] = Field(
        None, description="Most threads a BLAS/OpenMP pool of this worker may use (BLAS_THREADS).")


class VersionInfo(BaseModel):
    """One version of a model: loaded (AVAILABLE) or not (FAILED, with the error)."""

    version: str
    state: str = Field(description="AVAILABLE or FAILED.")
    error: Optional[str] = None
    sha256: Optional[str] = Field(None, description="The artifact's sha256 (hex).")
    task: Optional[str] = Field(None, description="classification or regression.")
    estimator: Optional[str] = Field(None, description="The estimator's class name.")
    n_features: Optional[int] = None
    feature_names: Optional[list[str]] = None
    loaded_at: Optional[float] = None
    classes: Optional[list[Union[float, str, bool]]] = None
    class_names: Optional[list[str]] = None
    description: Optional[str] = None
    metrics: Optional[dict[str, Any]] = None


class ModelInfo(BaseModel):
    """A model: its versions, the labels that name them, and the highest (``latest``)."""

    name: str
    latest: Optional[str]
    labels: dict[str, str] = Field(description="Label -> version, e.g. stable -> '1'.")
    versions: list[VersionInfo]
    problems: list[str] = Field(description="What is wrong with the model's folder, if anything.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ArmView(BaseModel):
    """An arm: its version and weight, then requests and outcomes summed over the workers."""

    version: str
    weight: int
    requests: Optional[int] = None
    outcomes: Optional[int] = None
    rate: Optional[float] = Field(None, description="Outcome rate (0/1 outcomes).")
    successes: Optional[int] = None
    mean: Optional[float] = Field(None, description="Mean outcome (numeric outcomes).")
    vs: Optional[str] = Field(None, description="The control arm this one is tested against.")
    p_value: Optional[float] = None


class ExperimentView(BaseModel):
    """An experiment with its per-arm figures and the test against the control arm."""

    name: str
    model: str
    valid: bool
    arms: dict[str, ArmView]
    error: Optional[str] = None
    counts_scope: Optional[str] = None
    outcome_type: Optional[str] = Field(None, description="binary or numeric.")
    test: Optional[str] = Field(None, description="two_proportion_z or welch_t.")
    shadow: Optional[dict[str, Any]] = None


class ExperimentsResponse(BaseModel):
    experiments: list[ExperimentView]
    counts_scope: str
    file_error: Optional[str] = Field(description="Why experiments.json could not be read.")


class OutcomeResponse(BaseModel):
    """The outcome as recorded, against the arm that served the user."""

    experiment: str
    user_id: str
    arm: str
    value: float
    recorded: bool
    request_id: str


class StreamTokenResponse(BaseModel):
    """A short-lived token that SSE endpoints and WebSockets accept as ``?token=``."""

    token: str = Field(description="Signed; never the API key itself.")
    expires_in: int = Field(description="Seconds the token is accepted (STREAM_TOKEN_SECONDS).")


class ReloadResponse(BaseModel):
    """What a repository rescan changed, as 'model/version' keys, and what is now served."""

    status: str
    pid: int
    added: list[str]
    changed: list[str]
    removed: list[str]
    failed: list[str]
    models: dict[str, list[str]]


class LoggedPrediction(BaseModel):
    """One logged row: where it came from, what the model answered, and its feedback."""

    id: int
    time: str = Field(description="ISO 8601, UTC.")
    request_id: str
    row: int = Field(description="The row's index in its request.")
    model: str
    version: str
    door: str = Field(description="native, batch, ab, stream, csv, tfserving, v2, websocket.")
    experiment: Optional[str] = None
    arm: Optional[str] = None
    api_key: Optional[str] = Field(None, description="A hash of the API key, never the key.")
    features: Optional[list[float]] = Field(None, description="null under "
                                            "PREDICTION_LOG_INPUTS=off.")
    features_sha256: str = Field(description="The first 32 hex digits of the row's SHA-256.")
    output: dict[str, Any] = Field(description="The row's answer as the native API gives it.")
    model_ms: Optional[float] = Field(None, description="Model time of the request's call.")
    cache_hit: Optional[bool] = None
    feedback: Optional[dict[str, Any]] = Field(None, description="{label, value, time}.")


class PredictionsPage(BaseModel):
    """Logged rows, newest first; ``next`` is the ``?cursor=`` of the following page."""

    predictions: list[LoggedPrediction]
    next: Optional[str] = None


class FeedbackResponse(BaseModel):
    """Per item: ``recorded`` or ``not_found`` (no logged row has that request id and row)."""

    recorded: int
    not_found: int
    results: list[dict[str, Any]]


class QualityResponse(BaseModel):
    """Over the labelled rows of one version: accuracy and per-class precision, recall and
    support for a classifier, MAE and RMSE for a regressor (null with nothing labelled)."""

    model: str
    version: str
    task: str
    since: Optional[str] = None
    labelled: int
    accuracy: Optional[float] = None
    classes: Optional[dict[str, dict[str, Any]]] = None
    mae: Optional[float] = None
    rmse: Optional[float] = None


class DriftScore(BaseModel):
    """One feature's (or the predictions') live distribution against the training one."""

    psi: Optional[float] = Field(description="Population stability index over the window; "
                                 "null below DRIFT_MIN_ROWS rows.")
    status: Optional[str] = Field(description="stable (PSI < 0.1), moderate (0.1-0.25) or "
                                  "drifted (> 0.25); null with the PSI.")
    p_value: Optional[float] = Field(None, description="Two-sample chi-square test on the "
                                     "bins (sparse bins pooled); null with too few rows.")
    live_proportions: Optional[list[float]] = Field(None, description="Share of the window's "
                                                    "rows per bin.")
    reference_proportions: Optional[list[float]] = Field(None, description="Share of the "
                                                         "training rows per bin.")
    edges: Optional[list[float]] = Field(None, description="Inner bin edges (a value equal to "
                                         "an edge is in the bin above it).")
    classes: Optional[list[Any]] = Field(None, description="A classifier's classes, the "
                                         "prediction's bins.")
    out_of_range: Optional[float] = Field(None, description="Share of live values outside the "
                                          "training minimum and maximum.")
    missing: Optional[float] = None
    reference_missing: Optional[float] = None


class DriftSinceStart(BaseModel):
    """The same scores over everything this server counted since it started."""

    counts_scope: str
    rows: int
    rows_served: int
    status: str
    reason: Optional[str] = None
    features: dict[str, DriftScore]
    prediction: Optional[DriftScore] = None


class DriftResponse(BaseModel):
    """A version's live traffic against its training profile, feature by feature."""

    model: str
    version: str
    window_seconds: int
    min_rows: int = Field(description="DRIFT_MIN_ROWS: fewer rows in the window, no scores.")
    status: str = Field(description="The worst of the features' and the prediction's "
                        "status, or not_enough_rows, or no_reference.")
    reason: Optional[str] = Field(description="Why there are no scores.")
    rows: Optional[int] = Field(description="Rows counted in the window (sampled beyond "
                                "DRIFT_SAMPLE_ROWS_PER_SECOND).")
    rows_served: Optional[int] = Field(None, description="Rows served in the window.")
    reference_rows: Optional[int] = Field(description="Rows of the training profile.")
    reference_created: Optional[str] = None
    counts_scope: Optional[str] = Field(None, description="all workers of this server, or "
                                        "all instances (redis).")
    note: Optional[str] = Field(None, description="Why the counts cover less than asked "
                                "(Redis unavailable).")
    worst_feature: Optional[str] = None
    features: dict[str, DriftScore]
    prediction: Optional[DriftScore]
    since_start: Optional[DriftSinceStart] = None


# --- Scoring jobs (POST /jobs and friends) ---------------------------------------------------
class JobInputRequest(BaseModel):
    """``POST /jobs`` as JSON: the input named by its place in object storage (not available
    yet: upload the file as the body instead)."""

    model_config = _STRICT

    input: str = Field(min_length=1, max_length=2048, description="s3://bucket/key")
    model: Optional[str] = Field(None, description="Model name (or ?model=).")
    version: Version = Field(None, validation_alias=VERSION_NAMES,
                             description="Version number or label (or ?version=).")
    chunk_rows: Optional[int] = Field(None, ge=1_000, le=1_000_000)


class JobCreated(BaseModel):
    """A queued job and where to follow it (``Location`` is the status URL)."""

    job_id: str = Field(description="32 hex digits.")
    status_url: str
    events_url: str
    result_url: str


class JobView(BaseModel):
    """A scoring job: its state and progress. Times are ISO 8601, UTC."""

    job_id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    version: str = Field(description="The version number the job scores with (a label or "
                         "latest is resolved when the job is submitted).")
    format: Literal["csv", "parquet"] = Field(description="Of the input and the result.")
    rows_done: int = Field(description="Rows scored so far (bad rows included).")
    rows_total: Optional[int] = Field(description="Known up front for Parquet, at the end "
                                      "for CSV.")
    rows_per_second: Optional[float] = Field(description="Of the worker's current attempt.")
    eta_seconds: Optional[float] = Field(description="Seconds left, estimated; 0 when done.")
    rejects: int = Field(description="Rows that could not be scored (see /rejects).")
    created: str
    started: Optional[str]
    finished: Optional[str]
    error: Optional[str] = Field(description="Why the job failed.")
    cancel_requested: bool
    bytes: int = Field(description="Size of the upload.")
    chunk_rows: int
    status_url: str
    events_url: str
    result_url: str
    rejects_url: str


class JobList(BaseModel):
    """The caller's jobs, newest first (at most 1000; finished ones until they expire)."""

    jobs: list[JobView]
