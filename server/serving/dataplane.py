"""The data plane: validated rows -> numpy array -> one model call -> per-row results.

Transport-free: HTTP blueprints, streams and tests all call ``DataPlane``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from server.errors import ApiError
from server.model.loaded import LoadedVersion
from server.model.predict import Columns, RowInput, predict_columns, to_matrix
from server.model.registry import ModelRegistry, ReloadReport
from server.runtime import prometheus
from server.serving.batching import MicroBatcher, cooperate
from server.serving.cache import NoCache, PredictionCache, row_keys
from server.serving.experiments import Arm, Experiment, Experiments, MemoryStats

log = logging.getLogger(__name__)



class Outcome:
    """What one predict call produced, for the HTTP layer to shape: the answers as
    ``columns`` (batch answers) or as ``results``, one dict per row; whichever was not
    produced is derived on first use."""

    def __init__(self, model: LoadedVersion, cached: int,
                 answers: Columns | list[dict[str, Any]], model_seconds: float = 0.0,
                 X: np.ndarray | None = None) -> None:
        self.model = model
        self.X = X  # the rows as predicted (the prediction log keeps their features)
        self.cached = cached
        self.model_seconds = model_seconds  # in the model call (0 when every row was cached)
        self._columns = answers if isinstance(answers, Columns) else None
        self._results = None if isinstance(answers, Columns) else answers

    @property
    def columns(self) -> Columns:
        if self._columns is None:
            self._columns = Columns.from_rows(self._results or [])
        return self._columns

    @property
    def results(self) -> list[dict[str, Any]]:
        if self._results is None:
            self._results = self.columns.rows()
        return self._results

    def __len__(self) -> int:
        return len(self._results) if self._results is not None else len(self.columns)


class DataPlane:
    """Resolve the model, build the matrix, look rows up in the cache, predict the misses."""

    def __init__(self, registry: ModelRegistry, cache: PredictionCache | None = None,
                 experiments: Experiments | None = None,
                 batcher: MicroBatcher | None = None, chunk_rows: int = 256,
                 model_timeout: float = 0.0) -> None:
        self.registry = registry
        self.batcher = batcher
        self.chunk_rows = max(2, chunk_rows)
        self.model_timeout = model_timeout
        self.cache: PredictionCache = cache if cache is not None else NoCache()
        self.experiments = experiments or Experiments(registry, MemoryStats())
        self.predictions = 0
        self.per_model: dict[str, int] = {}
        self._count_lock = threading.Lock()

    def predict(
        self, model: str, version: str | int | None, rows: Sequence[RowInput], loc: list[Any]
    ) -> Outcome:
        lv = self.registry.resolve(model, version)
        return self.predict_resolved(lv, to_matrix(lv, rows, loc), loc)

    def predict_resolved(self, lv: LoadedVersion, X: np.ndarray, loc: list[Any]) -> Outcome:
        """Predict the rows of a matrix already built for ``lv`` (through the cache)."""
        through_cache = self.cache.enabled and lv.cache == "on"
        if not through_cache:
            answers, seconds = self._call(lv, X, loc)
            outcome = Outcome(lv, 0, answers, seconds, X)
        else:
            results, cached, seconds = self._through_cache(lv, X, loc)
            outcome = Outcome(lv, cached, results, seconds, X)
        count = len(outcome)
        cached = outcome.cached
        prometheus.child(prometheus.PREDICTIONS, lv.name, lv.version).inc(count)
        prometheus.BATCH_ROWS.observe(count)
        if through_cache:
            prometheus.child(prometheus.CACHE, "hit").inc(cached)
            prometheus.child(prometheus.CACHE, "miss").inc(count - cached)
        key = f"{lv.name}:{lv.version}"
        with self._count_lock:
            self.predictions += count
            self.per_model[key] = self.per_model.get(key, 0) + count
        return outcome

    def _through_cache(
        self, lv: LoadedVersion, X: np.ndarray, loc: list[Any]
    ) -> tuple[list[dict[str, Any]], int, float]:
        keys = row_keys(lv.name, lv.version, X)
        found = [_decode(v) for v in self.cache.get_many(keys, lv)]
        missing = [i for i, r in enumerate(found) if r is None]
        if not missing:
            return found, len(found), 0.0  # type: ignore[return-value]
        answers, seconds = self._call(lv, X if len(missing) == len(X) else X[missing], loc)
        fresh = _rows(answers)
        for i, result in zip(missing, fresh):
            found[i] = result
        # A value that failed to decode counts as a miss and is overwritten here.
        self.cache.set_many({keys[i]: orjson.dumps(r) for i, r in zip(missing, fresh)}, lv)
        return found, len(found) - len(missing), seconds  # type: ignore[return-value]

    def _call(self, lv: LoadedVersion, X: np.ndarray,
              loc: list[Any]) -> tuple[Columns | list[dict[str, Any]], float]:
        """The model's answers for ``X`` (columns from one call or chunked calls, or the rows
        a micro-batch handed back) and the seconds they took, also observed per version in
        ``prediction_duration_seconds``."""
        started = time.perf_counter()
        try:
            if self.batcher is not None and len(X) == 1 and lv.microbatch != "off":
                answers: Columns | list[dict[str, Any]] = self.batcher.submit(lv, X)
            elif len(X) <= self.chunk_rows:
                answers = predict_columns(lv, X)
            else:
                answers = self._chunked(lv, X)
        except (ValueError, TypeError) as exc:
            # The model refused rows that passed our checks (e.g. a range it rejects).
            raise ApiError(422, "model_rejected_input", f"model rejected the input: {exc}",
                           [{"loc": list(loc), "msg": str(exc)[:300]}]) from exc
        except MemoryError as exc:
            # The call's arrays did not fit; they are garbage now and the worker serves on.
            log.warning("model call ran out of memory",
                        extra={"model": lv.name, "version": lv.version, "rows": len(X)})
            raise ApiError(503, "insufficient_memory",
                           f"not enough memory to predict {len(X)} rows now; retry, or send "
                           "fewer rows", headers={"Retry-After": "1"}) from exc
        seconds = time.perf_counter() - started
        prometheus.child(prometheus.MODEL_TIME, lv.name, lv.version).observe(seconds)
        return answers, seconds

    def _chunked(self, lv: LoadedVersion, X: np.ndarray) -> Columns:
        """Predict a big matrix in chunks, letting the worker's other requests run between
        them, and give up with 504 once the request's model time is over MODEL_TIMEOUT.

        A model call itself cannot be interrupted (gevent switches only when code yields),
        so the timeout is noticed at the next chunk boundary. No chunk has one row unless
        the matrix has (a one-row product can differ from a batch's in the last bits)."""
        bounds = list(range(0, len(X), self.chunk_rows))
        if len(bounds) > 1 and len(X) - bounds[-1] == 1:
            bounds.pop()
        bounds.append(len(X))
        deadline = time.monotonic() + self.model_timeout if self.model_timeout > 0 else None
        parts: list[Columns] = []
        for start, end in zip(bounds, bounds[1:]):
            if parts:
                cooperate()
                if deadline is not None and time.monotonic() > deadline:
                    raise ApiError(504, "model_timeout",
                                   f"the model took longer than {self.model_timeout:g} s; "
                                   f"{start} of {len(X)} rows were done")
            parts.append(predict_columns(lv, X[start:end]))
        return Columns.concat(parts)

    # -- A/B experiments ---------------------------------------------------------------------
    def predict_ab(self, experiment: str, user_id: str, rows: Sequence[RowInput],
                   loc: list[Any]) -> tuple[Outcome, Experiment, Arm]:
        exp = self.experiments.serving(experiment)
        arm = exp.assign(user_id)
        outcome = self.predict(exp.model, arm.version, rows, loc)
        self.experiments.stats.count_request(exp.name, arm.name)
        self.experiments.note_served(exp, arm, user_id)  # their outcome may now be recorded
        return outcome, exp, arm

    def shadow(self, exp: Experiment, rows: Sequence[RowInput], primary: Outcome) -> None:
        """Predict with the shadow version and record it; its failures stay here."""
        if exp.shadow is None:
            return
        ok = agreed = False
        try:
            out = self.predict(exp.model, exp.shadow, rows, ["features"])
            ok = True
            agreed = out.results[0]["prediction"] == primary.results[0]["prediction"]
        except Exception as exc:  # noqa: BLE001 - a shadow failure never reaches the caller
            log.warning("shadow prediction failed",
                        extra={"experiment": exp.name, "err": f"{type(exc).__name__}: {exc}"[:300]})
        self.experiments.stats.count_shadow(exp.name, ok, agreed)

    def on_reload(self, report: ReloadReport) -> None:
        """Forget answers of versions that went away or whose artifact changed."""
        if not report.touched:
            return
        for key in report.removed:
            model, version = key.rsplit("/", 1)
            self.cache.drop_version(model, version)
        self.sync_cache()

    def sync_cache(self) -> None:
        """Tell the cache which artifact each loaded version is: it drops the answers of a
        version recorded for another artifact (a changed one included), now or, if Redis is
        out, once it is back."""
        shas = {(entry.name, v): lv.sha256 for entry in self.registry.models.values()
                for v, lv in entry.versions.items()}
        shas.update({(entry.name, v): idle.sha256 for entry in self.registry.models.values()
                     for v, idle in entry.unloaded.items()})
        self.cache.sync_versions(shas)

    def cache_status(self) -> dict[str, Any]:
        return self.cache.status()


def _rows(answers: Columns | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return answers.rows() if isinstance(answers, Columns) else answers


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        result = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return result if isinstance(result, dict) and "prediction" in result else None
