"""The one front-door core. Every protocol served over HTTP (native JSON, TF Serving, Open
Inference, SSE, CSV, WebSocket) resolves its target, applies the row limits, calls the data
plane and decides readiness here; a protocol keeps only its codec and the function that
renders an ``ApiError`` in its own error shape. JSON rows become a matrix here too; CSV rows
(over HTTP and in offline scoring) are read by ``protocols.csvrows.parse_rows``.

Transport-free: no Flask, no sockets. The HTTP layer reaches it as ``state().front``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.errors import ApiError, echo, not_found, validation_error
from server.model.loaded import LoadedVersion
from server.model.predict import RowInput, to_matrix
from server.model.registry import ModelRegistry
from server.serving.dataplane import DataPlane, Outcome
from server.serving.drift import DriftMonitor
from server.serving.predlog import Origin, PredictionLog, RowNumbers


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (from Settings)."""

    max_batch: int = 1000  # rows in one batch, TF Serving or Open Inference request
    stream_max_rows: int = 100_000  # rows in one /predict/stream
    default_model: str = ""  # the model a request that names none gets


@dataclass(frozen=True)
class Readiness:
    """Whether this worker should get traffic, and why not."""

    ok: bool
    models: dict[str, list[str]] = field(default_factory=dict)  # servable versions
    failed: list[str] = field(default_factory=list)  # "model/version" that failed to load
    reason: str | None = None


def too_many_rows(n: int, limit: int, loc: list[Any]) -> ApiError:
    return ApiError(413, "too_many_rows", f"{n} rows sent, at most {limit} allowed",
                    [{"loc": loc, "msg": f"at most {limit} rows"}])


class FrontDoor:
    """Target, rows, limits, prediction and readiness, the same for every protocol."""

    def __init__(self, registry: ModelRegistry, dataplane: DataPlane,
                 limits: Limits | None = None, log: PredictionLog | None = None,
                 drift: DriftMonitor | None = None) -> None:
        self.registry = registry
        self.dataplane = dataplane
        self.limits = limits or Limits()
        self.log = log  # the prediction log; None when PREDICTION_LOG=off
        self.drift = drift  # live drift monitoring; None when DRIFT=off
        self.draining = False  # SIGTERM received: not ready, no new long-lived streams

    # -- the target ------------------------------------------------------------------------
    def model_name(self, named: str | None, where: str, loc: list[Any] | None = None) -> str:
        """The model a request names, else DEFAULT_MODEL; ``where`` says how to name one."""
        name = named or self.limits.default_model
        if not name:
            raise validation_error(f"name a model: {where}", loc or ["model"],
                                   "required (or set DEFAULT_MODEL)")
        return name

    def resolve(self, model: str, version: str | int | None = None,
                label: str | None = None) -> LoadedVersion:
        """A loaded version by number, label or ``latest`` (404 unknown, 503 failed)."""
        if label is not None:
            labels = self.registry.get(model).labels
            if label not in labels:
                raise not_found("label", f"model '{model}' has no label '{echo(label)}'")
            version = labels[label]
        return self.registry.resolve(model, version)

    # -- rows --------------------------------------------------------------------------------
    def check_rows(self, n: int, loc: list[Any], limit: int | None = None) -> None:
        """413 beyond ``limit`` rows (MAX_BATCH by default), before the rows are read."""
        limit = self.limits.max_batch if limit is None else limit
        if n > limit:
            raise too_many_rows(n, limit, loc)

    def matrix(self, lv: LoadedVersion, rows: Sequence[RowInput], loc: list[Any],
               limit: int | None = None) -> np.ndarray:
        """Rows (lists in feature order or objects by name) as the model's float64 matrix."""
        self.check_rows(len(rows), loc, limit)
        return to_matrix(lv, rows, loc)

    def predict(self, lv: LoadedVersion, X: np.ndarray, loc: list[Any],
                origin: Origin | None = None, rows: RowNumbers = 0) -> Outcome:
        """The data plane's answers for a matrix built for ``lv`` (through the cache), counted
        for drift and logged as coming from ``origin`` (``rows``: the first row's number in
        the request, or every row's)."""
        outcome = self.dataplane.predict_resolved(lv, X, loc)
        self.record(outcome, X, origin, rows)
        return outcome

    def record(self, outcome: Outcome, X: np.ndarray, origin: Origin | None,
               rows: RowNumbers = 0) -> None:
        """Count the served rows for drift monitoring and queue them for the prediction log
        (each a no-op when off; the log also when ``origin`` is None)."""
        if self.drift is not None:
            self.drift.observe(outcome, X)
        if self.log is not None and origin is not None:
            self.log.record(outcome, X, origin, rows)

    def chunk_predictor(self, lv: LoadedVersion, loc: list[Any], origin: Origin | None
                        ) -> Callable[..., list[dict[str, Any]]]:
        """For streams, which predict chunk by chunk: each chunk's answers, logged with the
        rows' numbers in the request (given, as CSV's are, or counted on)."""
        done = 0

        def predict(X: np.ndarray, numbers: list[int] | None = None) -> list[dict[str, Any]]:
            nonlocal done
            outcome = self.predict(lv, X, loc, origin, numbers if numbers is not None else done)
            done += len(X)
            return outcome.results

        return predict

    # -- readiness ---------------------------------------------------------------------------
    def readiness(self) -> Readiness:
        registry = self.registry
        models = registry.models
        servable = {n: e.servable for n, e in models.items() if e.servable}
        failed = [f"{n}/{v}" for n, e in models.items() for v in e.failed]
        if self.draining:
            reason: str | None = "shutting down: finishing requests in flight"
        elif not registry.loaded_once:
            reason = "models are loading"
        elif not servable:
            reason = "no servable model in the repository"
        else:
            reason = None
        return Readiness(reason is None, servable, failed, reason)

    def refuse_when_draining(self) -> None:
        """New long-lived streams and sockets are refused while draining: they would only be
        cut at the graceful timeout. One-shot predictions are still served."""
        if self.draining:
            raise ApiError(503, "draining", "this instance is shutting down; retry elsewhere",
                           headers={"Retry-After": "1"})
