"""The optional ONNX Runtime backend: an estimator converted with skl2onnx and answered by a
single-threaded onnxruntime session, used only when it answers like the estimator.

A version opts in with ``"backend": "onnx"`` in its ``metadata.json``; ``compile_onnx`` is
called once at load. It converts with float64 input first (float32 when the converter or the
runtime cannot do float64), then compares the session with the estimator on probe rows: the
predicted classes must be identical and probabilities / regression values within
``TOLERANCE``. Anything else (packages missing, no converter, a disagreement) returns no
model and the reason, and the version is served by its estimator.

Tree models: scikit-learn rounds the input to float32 before comparing it with a float64
threshold. skl2onnx's float64 graph compares the float64 input with a shifted threshold
instead, which picks the other branch for some inputs (3 of iris' own 150 rows with a
100-tree forest); a Cast to float32 and back in front of every tree ensemble node makes the
comparison scikit-learn's own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

TOLERANCE = 1e-6  # largest absolute difference from the estimator accepted on any probe value
PROBE_ROWS = 256  # random rows at the training scale, plus one single-row call
EDGE_ROWS = 256  # tree models: rows with one feature on (or next to) a split threshold
TARGET_OPSET = {"": 21, "ai.onnx.ml": 3}  # what skl2onnx 1.20 and onnxruntime 1.31 agree on
TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")  # ai.onnx.ml, up to opset 3


class Disagreement(Exception):
    """The session answered differently from the estimator on a probe row."""


@dataclass(frozen=True)
class OnnxModel:
    """One inference session standing in for an estimator's predict / predict_proba."""

    session: Any  # onnxruntime.InferenceSession
    input_name: str
    output_names: list[str]  # [label, probabilities] for classifiers, [values] for regressors
    input_dtype: type[np.floating[Any]]  # np.float64, or np.float32 when that graph was used
    classes: np.ndarray | None  # estimator.classes_ (sorted), for classifiers
    float32_scores: bool  # the probabilities passed through float32 (tree nodes, float32 input)

    def _run(self, X: np.ndarray, outputs: int) -> list[np.ndarray]:
        """The first ``outputs`` outputs (a ZipMap after them is never turned into dicts)."""
        feed = np.ascontiguousarray(X, dtype=self.input_dtype)
        return self.session.run(  # type: ignore[no-any-return]
            self.output_names[:outputs], {self.input_name: feed})

    def _indices(self, label: np.ndarray) -> np.ndarray:
        # The graph's labels are classes_ itself, which scikit-learn keeps sorted.
        assert self.classes is not None
        return np.searchsorted(self.classes, label)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``estimator.predict``: classes as values of ``classes_``, or regression values."""
        out = self._run(X, 1)[0]
        if self.classes is not None:
            return self.classes[self._indices(out)]  # type: ignore[no-any-return]
        values = np.asarray(out, dtype=np.float64)
        return values.ravel() if values.ndim == 2 and values.shape[1] == 1 else values

    def proba(self, X: np.ndarray) -> np.ndarray:
        """``estimator.predict_proba``, as float64."""
        return self._float64(self._run(X, 2)[1])

    def scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into classes_ of the predicted classes, probabilities) from one run."""
        label, proba = self._run(X, 2)
        return self._indices(label), self._float64(proba)

    def _float64(self, proba: np.ndarray) -> np.ndarray:
        """Tree operators answer float32 probabilities (0.51 comes out as 0.50999999). Rounded
        to 7 decimals, about what float32 holds, a forest's vote fractions get back the
        float64 values scikit-learn computes (99% of the probabilities of iris' 100-tree
        forest, to the bit); the probe check measures the rounded values."""
        proba = np.asarray(proba, dtype=np.float64)
        return np.round(proba, 7) if self.float32_scores else proba


def compile_onnx(estimator: Any, n_features: int | None,
                 classifier: bool) -> tuple[OnnxModel | None, str]:
    """(the session, what was checked) when it answers like ``estimator``; else (None, why).

    ``classifier``: the estimator answers classes (it has ``classes_``); its probabilities
    are compared too when it has ``predict_proba``."""
    try:
        import onnxruntime
        import skl2onnx  # noqa: F401 - imported here only to report a missing package
    except ImportError as exc:
        return None, f"onnx backend unavailable ({exc}); install requirements-onnx.txt"
    if not n_features:
        return None, "the number of features is unknown"
    try:
        classes = np.asarray(estimator.classes_) if classifier else None
        if classes is not None and not np.all(classes[:-1] < classes[1:]):
            return None, "classes_ is not sorted"
        probes = _probe_rows(estimator, n_features)
    except Exception as exc:  # noqa: BLE001 - an odd estimator is a reason, not a failed load
        return None, f"no probe rows: {type(exc).__name__}: {_first_line(exc)}"
    reasons = []
    for dtype in (np.float64, np.float32):
        width = "float64" if dtype is np.float64 else "float32"
        try:
            session, float32_scores = _session(estimator, n_features, dtype, classifier)
            model = OnnxModel(session, session.get_inputs()[0].name,
                              [o.name for o in session.get_outputs()], dtype, classes,
                              float32_scores)
            worst = _max_difference(model, estimator, probes, classifier)
        except Disagreement as exc:
            reasons.append(f"{width} graph: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - every converter or runtime failure is a reason
            reasons.append(f"{width} graph: {type(exc).__name__}: {_first_line(exc)}")
            continue
        rows = sum(len(p) for p in probes)
        checked = (f"classes identical on {rows} probe rows" if worst is None else
                   f"max |difference| {worst:.2g} on {rows} probe rows")
        note = f"onnxruntime {onnxruntime.__version__}, {width} input; {checked}"
        if reasons:
            note += f" ({reasons[0]})"
        return model, note
    return None, "; ".join(reasons)


def _session(estimator: Any, n_features: int, dtype: type[np.floating[Any]],
             classifier: bool) -> tuple[Any, bool]:
    """(an inference session, whether its scores pass through float32)"""
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor = DoubleTensorType if dtype is np.float64 else FloatTensorType
    has_proba = classifier and hasattr(estimator, "predict_proba")
    with warnings.catch_warnings():
        # The converter reads attributes scikit-learn has deprecated; that noise says nothing
        # about the graph, which the probe rows judge.
        warnings.simplefilter("ignore")
        graph = to_onnx(estimator, initial_types=[("X", tensor([None, n_features]))],
                        # plain arrays of probabilities rather than a list of dicts
                        options={"zipmap": False} if has_proba else None,
                        target_opset=TARGET_OPSET)
    trees = any(n.op_type in TREE_OPS and n.domain == "ai.onnx.ml" for n in graph.graph.node)
    if dtype is np.float64 and trees:
        _fit_trees_to_float64(graph, round_inputs=not _uses_float64_trees(estimator))
    options = ort.SessionOptions()
    # One thread, no pool: a gevent worker runs one model call at a time anyway.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: its warnings would bypass our JSON log
    session = ort.InferenceSession(graph.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, trees or dtype is np.float32


def _fit_trees_to_float64(graph: Any, round_inputs: bool) -> None:
    """Around each tree ensemble node of a float64 graph: Cast its input to float32 and back
    (scikit-learn's own rounding; not for HistGradientBoosting, which compares float64), and
    Cast its scores to float64, since onnxruntime's tree operators answer float32 whatever
    the graph declares (without that, only RandomForestClassifier's graph would run)."""
    from onnx import TensorProto, helper

    declared = {o.name: o for o in graph.graph.output}
    nodes = []
    for i, node in enumerate(graph.graph.node):
        if node.op_type not in TREE_OPS or node.domain != "ai.onnx.ml":
            nodes.append(node)
            continue
        if round_inputs:
            source = node.input[0]
            as32, back = f"{source}_as_float32_{i}", f"{source}_rounded_{i}"
            nodes.append(helper.make_node("Cast", [source], [as32], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Cast", [as32], [back], to=TensorProto.DOUBLE))
            node.input[0] = back
        k = 1 if node.op_type == "TreeEnsembleClassifier" else 0  # (label, scores) / (values)
        scores, raw = node.output[k], f"{node.output[k]}_float32_{i}"
        node.output[k] = raw
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [raw], [scores], to=TensorProto.DOUBLE))
        if scores in declared:
            declared[scores].type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)


def _steps(estimator: Any) -> list[Any]:
    from sklearn.pipeline import Pipeline

    return [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]


def _uses_float64_trees(estimator: Any) -> bool:
    """HistGradientBoosting compares float64 inputs: rounding them would be wrong there."""
    return any(type(s).__name__.startswith("HistGradientBoosting") for s in _steps(estimator))


def _max_difference(model: OnnxModel, estimator: Any, probes: list[np.ndarray],
                    classifier: bool) -> float | None:
    """The largest |session - estimator| over every probe value (None when only classes
    are compared); raises on any disagreement beyond TOLERANCE or on a class that differs."""
    worst: float | None = None
    has_proba = classifier and hasattr(estimator, "predict_proba")
    for X in probes:
        want = np.asarray(estimator.predict(X))
        if has_proba:  # what the data plane calls: both from one run
            assert model.classes is not None
            idx, proba = model.scores(X)
            got = model.classes[idx]
        else:
            got = model.predict(X)
        if classifier:
            if got.shape != want.shape or not np.array_equal(got, want):
                raise Disagreement(f"predicted classes differ on "
                                   f"{int(np.sum(got != want))} of {len(X)} probe rows")
            if not has_proba:
                continue
            want, got = estimator.predict_proba(X), proba
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            raise Disagreement(f"output shape {got.shape}, the estimator's {want.shape}")
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        if not diff <= TOLERANCE:  # also catches NaN
            raise Disagreement(f"answers differ by up to {diff:.2g} (tolerance {TOLERANCE:g})")
        worst = diff if worst is None else max(worst, diff)
    return worst


def _probe_rows(estimator: Any, n_features: int) -> list[np.ndarray]:
    """Deterministic rows at the scale the model was trained on (from its own statistics):
    a batch, a single row and, for tree models, rows on their split thresholds."""
    rng = np.random.default_rng(0)
    center, spread = _input_scale(estimator, n_features)
    probes = [rng.normal(center, spread, (PROBE_ROWS, n_features)),
              rng.normal(center, spread, (1, n_features))]
    splits = _splits(estimator)
    if splits is not None:
        features, thresholds = splits
        pick = rng.integers(0, len(features), EDGE_ROWS)
        t = thresholds[pick]
        t32 = t.astype(np.float32)
        # the threshold, its float32 rounding and neighbours, and a 2-decimal version of it
        choices = np.stack([t, t32, np.nextafter(t32, np.float32(-np.inf)),
                            np.nextafter(t32, np.float32(np.inf)), np.round(t, 2)]
                           ).astype(np.float64)
        rows = rng.normal(center, spread, (EDGE_ROWS, n_features))
        rows[np.arange(EDGE_ROWS), features[pick]] = \
            choices[rng.integers(0, len(choices), EDGE_ROWS), np.arange(EDGE_ROWS)]
        probes.append(rows)
    return probes


def _input_scale(estimator: Any, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(center, spread) per feature: a leading scaler's statistics, a tree model's threshold
    range, else (0, 3) as the other load-time checks use."""
    center, spread = np.zeros(n_features), np.full(n_features, 3.0)
    first = _steps(estimator)[0]
    if getattr(first, "mean_", None) is not None and getattr(first, "scale_", None) is not None:
        return np.asarray(first.mean_, dtype=float), 2.0 * np.asarray(first.scale_, dtype=float)
    if getattr(first, "data_min_", None) is not None:  # MinMaxScaler
        lo, hi = np.asarray(first.data_min_), np.asarray(first.data_max_)
        return (lo + hi) / 2, np.maximum(hi - lo, 1e-12)
    splits = _splits(estimator)
    if splits is not None:
        features, thresholds = splits
        for f in np.unique(features):
            lo, hi = thresholds[features == f].min(), thresholds[features == f].max()
            center[f], spread[f] = (lo + hi) / 2, max(hi - lo, abs(hi) * 0.1, 1e-6)
    return center, spread


def _splits(estimator: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(feature, threshold) of every split of a tree model used on its own (its thresholds
    are then in input space); None for anything else."""
    if hasattr(estimator, "tree_"):
        trees = [estimator.tree_]
    else:
        members = getattr(estimator, "estimators_", None)
        if members is None:
            return None
        # a list for forests, a 2-d array (stage x class) for gradient boosting
        members = list(members.ravel()) if isinstance(members, np.ndarray) else list(members)
        trees = [m.tree_ for m in members if hasattr(m, "tree_")]
        if not trees or len(trees) != len(members):
            return None
    features = np.concatenate([t.feature for t in trees])
    thresholds = np.concatenate([t.threshold for t in trees])
    inner = features >= 0
    if not inner.any():
        return None
    return features[inner], thresholds[inner]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]

