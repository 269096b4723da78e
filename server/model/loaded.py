"""A loaded version: the estimator and everything the data plane needs, precomputed at load
(feature order, classes, the one-call fast paths, the ONNX backend)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sklearn.base import is_classifier

from server.model.formats import memory_bytes
from server.model.profile import Profile, ProfileError, load_profile
from server.model.repository import Stamp, VersionOnDisk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """One servable version with everything the data plane needs precomputed."""

    name: str
    version: str
    estimator: Any
    sha256: str
    stamp: Stamp
    n_features: int | None
    feature_names: tuple[str, ...] | None
    feature_index: dict[str, int] | None
    task: str  # "classification" | "regression"
    classes: list[Any] | None  # estimator.classes_ as JSON-ready values
    class_names: list[str] | None  # a label per class, aligned with classes
    has_proba: bool
    predict_is_argmax_proba: bool  # predict() is argmax of predict_proba(): call the model once
    proba: Callable[[np.ndarray], np.ndarray] | None  # predict_proba, or its fast equivalent
    # (class indices, probabilities) from one model call, where that gives predict's and
    # predict_proba's exact answers (multiclass logistic regression); else None
    scores: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None
    metadata: dict[str, Any]
    loaded_at: float
    # How this version is micro-batched: "stack" (gathered and stacked into one call) or
    # "off" (each request alone); see server.serving.batching.batch_mode
    microbatch: str = "off"
    microbatch_note: str | None = None
    # A one-row call's median cost at load (microseconds; the micro-batching probe times it)
    row_us: float | None = None
    # Whether this version's answers go through the prediction cache: "on" or "off", and
    # why (server.serving.cachepolicy: CACHE=auto caches only where that beats computing)
    cache: str = "on"
    cache_note: str | None = None
    # What answers: "sklearn" (the estimator) or "onnx" (an onnxruntime session that
    # matched it at load; server.model.onnx); why an asked-for ONNX backend is not used,
    # or what its check measured. With ONNX, ``proba`` and ``scores`` run the session and
    # ``predict_fn`` is its ``predict`` (classes mapped to classes_); None on sklearn.
    backend: str = "sklearn"
    backend_note: str | None = None
    predict_fn: Callable[[np.ndarray], np.ndarray] | None = None
    # The reference profile for drift monitoring (profile.json beside the artifact), or None
    # and why not: a version without a usable one serves as any other.
    profile: Profile | None = None
    profile_note: str | None = None
    # What the estimator costs in memory: its pickle size (server.model.formats.memory_bytes)
    memory_bytes: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "state": "AVAILABLE",
            "sha256": self.sha256,
            "task": self.task,
            "estimator": type(self.estimator).__name__,
            "n_features": self.n_features,
            "feature_names": list(self.feature_names) if self.feature_names else None,
            "loaded_at": self.loaded_at,
            "backend": self.backend,
            "micro_batching": self.microbatch,
            "cache": self.cache,
            "loaded": True,
            "memory_mb": round(self.memory_bytes / 1_000_000, 3),
        }
        if self.microbatch_note is not None:
            out["micro_batching_note"] = self.microbatch_note
        if self.cache_note is not None:
            out["cache_note"] = self.cache_note
        if self.backend_note is not None:
            out["backend_note"] = self.backend_note
        if self.classes is not None:
            out["classes"] = self.classes
            out["class_names"] = self.class_names
        for key in ("description", "metrics"):
            if key in self.metadata:
                out[key] = self.metadata[key]
        return out



def build_version(found: VersionOnDisk, estimator: Any, sha256: str) -> LoadedVersion:
    meta = found.metadata
    n_features = getattr(estimator, "n_features_in_", None)
    names = meta.get("feature_names")
    if names is None and getattr(estimator, "feature_names_in_", None) is not None:
        names = [str(n) for n in estimator.feature_names_in_]
    if names is not None:
        names = tuple(str(n) for n in names)
        if n_features is not None and len(names) != n_features:
            raise ValueError(f"metadata lists {len(names)} feature names, model takes {n_features}")
        n_features = len(names)
    classes = class_names = None
    classifier = is_classifier(estimator) or meta.get("task") == "classification"
    if classifier and getattr(estimator, "classes_", None) is not None:
        classes = np.asarray(estimator.classes_).tolist()
        given = meta.get("class_names")
        if given is not None and len(given) != len(classes):
            raise ValueError(f"metadata lists {len(given)} class names, model has {len(classes)}")
        class_names = [str(c) for c in (given if given is not None else classes)]
    scores = _scores_function(estimator, n_features) if classifier else None
    return _with_backend(LoadedVersion(
        name=found.name,
        version=found.version,
        estimator=estimator,
        sha256=sha256,
        stamp=found.stamp,
        n_features=int(n_features) if n_features is not None else None,
        feature_names=names,
        feature_index={n: i for i, n in enumerate(names)} if names else None,
        task="classification" if classifier else "regression",
        classes=classes,
        class_names=class_names,
        has_proba=classifier and hasattr(estimator, "predict_proba"),
        predict_is_argmax_proba=classifier and _predicts_by_argmax(estimator),
        proba=_proba_function(estimator) if classifier and hasattr(estimator, "predict_proba")
        else None,
        scores=scores,
        metadata=meta,
        loaded_at=time.time(),
        memory_bytes=memory_bytes(estimator),
    ))


def with_profile(lv: LoadedVersion, raw: bytes | None | OSError) -> LoadedVersion:
    """``lv`` with the profile read from ``raw`` (profile.json's bytes, None when absent, the
    error when unreadable), checked against ``lv``; never raises: a profile that does not fit
    leaves the version without a reference, and ``profile_note`` says why."""
    if raw is None:
        return replace(lv, profile=None, profile_note="no profile.json beside the artifact")
    if isinstance(raw, OSError):
        note = f"profile.json unreadable: {raw.strerror or raw}"
    else:
        try:
            profile = load_profile(raw, lv.n_features, lv.feature_names, lv.classes)
            return replace(lv, profile=profile, profile_note=None)
        except ProfileError as exc:
            note = f"profile.json unusable: {exc}"[:300]
    log.warning("no drift reference", extra={"model": lv.name, "version": lv.version,
                                             "err": note})
    return replace(lv, profile=None, profile_note=note)


BACKENDS = ("sklearn", "onnx")


def _with_backend(lv: LoadedVersion) -> LoadedVersion:
    """Apply ``"backend"`` from metadata.json. An ONNX session replaces the estimator's calls
    only when it answered like the estimator on probe rows; otherwise, and for an unknown
    backend name (a typo must show but not take a model down), the estimator serves and
    ``backend_note`` says why."""
    wanted = lv.metadata.get("backend", "sklearn")
    if wanted == "sklearn":
        return lv
    where = {"model": lv.name, "version": lv.version}
    if wanted not in BACKENDS:
        note = f"unknown backend {wanted!r} (known: {', '.join(BACKENDS)}); serving on sklearn"
        log.warning("unknown backend in metadata.json", extra={**where, "err": note})
        return replace(lv, backend_note=note)
    from server.model.onnx import compile_onnx

    classifier = lv.task == "classification" and lv.classes is not None
    model, note = compile_onnx(lv.estimator, lv.n_features, classifier)
    if model is None:
        log.warning("onnx backend not used: serving on sklearn", extra={**where, "err": note})
        return replace(lv, backend_note=note)
    log.info("onnx backend in use", extra={**where, "note": note})
    with_proba = lv.has_proba and classifier
    return replace(
        lv, backend="onnx", backend_note=note, predict_fn=model.predict,
        # prediction is the session's own label, equal to predict() on every probe row
        predict_is_argmax_proba=False,
        proba=model.proba if with_proba else None,
        scores=model.scores if with_proba else None,
    )


def _proba_function(estimator: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``predict_proba``, or for a single-output forest the same sum computed without joblib.

    A forest's ``predict_proba`` adds its trees' probabilities in order into a float64 array
    through joblib even with ``n_jobs=1``: that dispatch is most of the ~3 ms a one-row call
    costs. Adding them in the same order here gives the same bits (a unit test pins that).
    Each tree is asked through its ``tree_.predict``, which is what the tree's own
    ``predict_proba`` returns once its fitted-state and feature-count checks are done (ours
    ran already): those checks cost more than walking a small tree.
    """
    from sklearn.ensemble._forest import ForestClassifier

    if not (isinstance(estimator, ForestClassifier) and estimator.n_outputs_ == 1):
        return estimator.predict_proba  # type: ignore[no-any-return]
    trees = [tree.tree_.predict for tree in estimator.estimators_]
    n_classes = int(estimator.n_classes_)

    def forest_proba(X: np.ndarray) -> np.ndarray:
        X32 = np.ascontiguousarray(X, dtype=np.float32)  # what the forest's own check does
        out = np.zeros((X32.shape[0], n_classes), dtype=np.float64)
        for predict in trees:
            out += predict(X32)[:, :n_classes]
        out /= len(trees)
        return out

    return forest_proba


Scores = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _scores_function(estimator: Any, n_features: int | None) -> Scores | None:
    """For multiclass LogisticRegression (alone or last in a Pipeline): ``predict`` is the
    argmax of ``decision_function`` and ``predict_proba`` its softmax, so one decision gives
    both, saving a second input validation and matrix product per call. The arithmetic is
    sklearn's own (``X @ coef_.T + intercept_``, then its softmax; a StandardScaler head as
    ``(X - mean_) / scale_``) without its input validation, which costs more than the
    model on one row: our own checks ran already. Used only when it answers exactly like
    the estimator on probe rows at load."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    final = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    if type(final) is not LogisticRegression or len(final.classes_) <= 2 or not n_features:
        return None
    head = _elementwise_head(estimator[:-1]) if isinstance(estimator, Pipeline) else None
    coef_t, intercept = final.coef_.T, final.intercept_

    def scores(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = (head(X) if head is not None else X) @ coef_t + intercept
        return np.argmax(d, axis=1), _softmax(d)

    rng = np.random.default_rng(0)
    for probe in (rng.normal(0, 3, (64, n_features)), rng.normal(0, 3, (1, n_features))):
        try:
            idx, proba = scores(probe)
        except Exception:  # noqa: BLE001 - an unexpected shape or type: the estimator serves
            return None
        if not (np.array_equal(final.classes_[idx], estimator.predict(probe))
                and np.array_equal(proba, estimator.predict_proba(probe))):
            log.warning("one-call scoring disagrees with the estimator; not used")
            return None
    return scores


def _softmax(d: np.ndarray) -> np.ndarray:
    """sklearn.utils.extmath.softmax on a float64 numpy array, in place, minus its dispatch."""
    d -= d.max(axis=1, keepdims=True)
    np.exp(d, out=d)
    d /= d.sum(axis=1, keepdims=True)
    return d


def _elementwise_head(head: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The steps before the classifier: StandardScalers as their own arithmetic, anything
    else through its ``transform`` (checked with the rest on the probes)."""
    from sklearn.preprocessing import StandardScaler

    steps = [step for _, step in head.steps]
    if not all(type(s) is StandardScaler for s in steps):
        return head.transform  # type: ignore[no-any-return]
    plan = [(s.mean_ if s.with_mean else None, s.scale_ if s.with_std else None) for s in steps]

    def transform(X: np.ndarray) -> np.ndarray:
        Z = X  # a new array from the first operation on: the caller's X is never changed
        for mean, scale in plan:
            if mean is not None:
                Z = Z - mean if Z is X else np.subtract(Z, mean, out=Z)
            if scale is not None:
                Z = Z / scale if Z is X else np.divide(Z, scale, out=Z)
        return np.array(Z, dtype=np.float64) if Z is X else Z

    return transform


def _predicts_by_argmax(estimator: Any) -> bool:
    """True for estimators whose ``predict`` is literally ``classes_[argmax(predict_proba)]``
    (trees and forests, alone or last in a Pipeline), so one call gives both, bit for bit."""
    from sklearn.ensemble._forest import BaseForest
    from sklearn.pipeline import Pipeline
    from sklearn.tree import DecisionTreeClassifier

    final = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    single_output = getattr(final, "n_outputs_", 1) == 1
    return single_output and isinstance(final, (BaseForest, DecisionTreeClassifier)) and \
        hasattr(final, "classes_")
