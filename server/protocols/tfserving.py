"""TF Serving REST (v1) shapes over our models: paths, request bodies, signatures, answers.

Pure helpers for ``server.http.blueprints.v1_tfserving`` (no Flask here). What a model looks like
to a TF Serving client:

- One input tensor ``inputs``: DT_DOUBLE ``[-1, n_features]`` (its TensorInfo also carries a
  ``feature_names`` list, an extension TF clients ignore). Rows may be sent as lists in feature
  order, as objects keyed by feature name, or as ``{"inputs": [...]}`` objects naming the tensor.
- Signatures, like a TF Estimator export:
  - classifier with probabilities: ``serving_default`` (predict) -> ``probabilities``
    ``[-1, n_classes]`` in ``class_names`` order; ``predict`` -> ``predictions`` (the native
    API's ``prediction``, the class value) and ``probabilities``; ``classification``
    (classify) -> ``[[class_name, probability], ...]`` per example.
  - classifier without probabilities: ``serving_default`` -> ``predictions``; ``classification``
    gives ``[[predicted_class_name, 1.0]]``.
  - regressor: ``serving_default`` -> ``predictions`` (one float per row); ``regression``.
  So a ``:predict`` element is a classifier's probability vector (what a TF classifier's default
  signature returns) or a regressor's float, bit-for-bit the numbers of ``/predict/batch``.
- One output: ``predictions``/``outputs`` hold that output alone; several: a list of objects
  per row (``instances``) or an object of columns (``inputs``), as TF Serving answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

from server.errors import ApiError, echo, message_only, not_found, validation_error
from server.model.loaded import LoadedVersion
from server.model.predict import to_matrix
from server.model.registry import ModelEntry
from server.protocols import native
from server.schemas import Row, error_details

PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"
VERBS = {"predict": PREDICT, "classify": CLASSIFY, "regress": REGRESS}
DEFAULT = "serving_default"
INPUT = "inputs"

PATH_RE = re.compile(
    r"(?P<model>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>[^/:]+)|/(?P<sub>metadata))?/?"
)

# The native API's rules for numbers: strict (no "1.5" strings, no booleans), finite only.
_NUMBERS = ConfigDict(strict=True, allow_inf_nan=False)
_ROWS: TypeAdapter[list[Any]] = TypeAdapter(list[Row], config=_NUMBERS)
_COLUMNS: TypeAdapter[dict[str, list[float]]] = TypeAdapter(dict[str, list[float]],
                                                            config=_NUMBERS)
_MATRIX: TypeAdapter[list[list[float]]] = TypeAdapter(list[list[float]], config=_NUMBERS)


# -- paths and bodies ------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What a ``/v1/models/...`` path names."""

    model: str
    version: str | None
    label: str | None
    verb: str | None  # predict | classify | regress
    metadata: bool


def _ascii_digits(text: str) -> bool:
    """0-9 only: ``str.isdigit`` also takes other scripts' digits (``int("١")`` is 1)."""
    return text.isascii() and text.isdigit()


def parse_path(rest: str, method: str) -> Target:
    """``rest`` is the path after ``/v1/models/``; TF Serving answers 400 to what it can't parse."""
    match = PATH_RE.fullmatch(rest)
    if not rest:
        raise ApiError(400, "bad_request", "Missing model name in request.")
    if match is None or (match["verb"] and match["verb"] not in VERBS) or \
            (match["version"] is not None and not _ascii_digits(match["version"])):
        raise ApiError(400, "bad_request", f"Malformed request: {method} /v1/models/{echo(rest)}")
    version = match["version"]
    if version is not None and len(version) <= 18:
        version = str(int(version))  # TF Serving reads an int64: /versions/01 is version 1
    return Target(match["model"], version, match["label"], match["verb"],
                  match["sub"] is not None)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN parses here so it can be refused as a value)."""
    body = native.parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the request body must be a JSON object")
    return body


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise validation_error(
            f"unknown key '{unknown[0]}': expected {', '.join(sorted(allowed))}", [unknown[0]])


def signature_name(body: dict[str, Any]) -> str:
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise validation_error("signature_name must be a string", ["signature_name"])
    return name


def _rows(value: Any, loc: list[Any]) -> list[Any]:
    """Strictly validated rows: lists of numbers or objects of numbers; no NaN, no strings."""
    try:
        return _ROWS.validate_python(value)
    except ValidationError as exc:
        raise _invalid(exc, loc) from exc


def _invalid(exc: ValidationError, loc: list[Any]) -> ApiError:
    details = [{"loc": [*loc, *d["loc"]], "msg": d["msg"]} for d in error_details(exc.errors())]
    where = ".".join(str(p) for p in details[0]["loc"])
    return ApiError(422, "validation_error", f"{where}: {details[0]['msg']}", details)


def _unwrap_tensor_name(rows: list[Any], lv: LoadedVersion) -> list[Any]:
    """``{"inputs": [..]}`` names our one input tensor: take its value as the row."""
    if not isinstance(rows[0], dict) or (lv.feature_index is not None
                                         and INPUT in lv.feature_index):
        return rows
    return [r[INPUT] if isinstance(r, dict) and list(r) == [INPUT] else r for r in rows]


# How a codec applies the front door's row limit: (rows, loc) -> None, or raises 413.
CheckRows = Callable[[int, list[Any]], None]


def predict_matrix_of(lv: LoadedVersion, body: dict[str, Any],
                      check_rows: CheckRows) -> tuple[np.ndarray, str]:
    """The matrix of a ``:predict`` body and its format, ``instances`` or ``inputs``."""
    _check_keys(body, {"signature_name", "instances", "inputs"})
    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise validation_error(
            "send exactly one of 'instances' (row format) or 'inputs' (columnar format)", [])
    key = "instances" if has_rows else "inputs"
    value = body[key]
    if isinstance(value, dict) and has_columns:
        if list(value) == [INPUT] and (lv.feature_index is None or INPUT not in lv.feature_index):
            value = value[INPUT]  # the map form naming our one tensor
        else:
            return columns_to_matrix(lv, value, check_rows), key
    if not isinstance(value, list) or not value:
        raise validation_error(f"'{key}' must be a non-empty list of rows", [key])
    check_rows(len(value), [key])
    if has_rows:
        rows = _unwrap_tensor_name(value, lv)
        return to_matrix(lv, _rows(rows, [key]), [key]), key
    try:
        matrix = _MATRIX.validate_python(value)
    except ValidationError as exc:
        raise _invalid(exc, [key]) from exc
    return to_matrix(lv, matrix, [key]), key


def columns_to_matrix(lv: LoadedVersion, columns: dict[str, Any],
                      check_rows: CheckRows) -> np.ndarray:
    """``{"feature": [v0, v1, ...], ...}``: one column per feature, all the same length."""
    try:
        checked = _COLUMNS.validate_python(columns)
    except ValidationError as exc:
        raise _invalid(exc, ["inputs"]) from exc
    index = lv.feature_index
    if index is None:
        raise validation_error(
            f"model '{lv.name}' has no feature names: send 'inputs' as a 2-D list", ["inputs"])
    unknown = [k for k in checked if k not in index]
    if unknown:
        raise validation_error(f"unknown feature '{unknown[0]}'", ["inputs", unknown[0]])
    missing = [n for n in index if n not in checked]
    if missing:
        raise validation_error(f"missing feature '{missing[0]}'", ["inputs", missing[0]])
    lengths = {len(v) for v in checked.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise validation_error("every feature in 'inputs' needs the same, non-zero number of "
                               f"values; got lengths {sorted(lengths)}", ["inputs"])
    check_rows(lengths.pop(), ["inputs"])
    return np.column_stack([np.asarray(checked[n], dtype="<f8") for n in index])


def examples_matrix(lv: LoadedVersion, body: dict[str, Any],
                    check_rows: CheckRows) -> np.ndarray:
    """``:classify``/``:regress`` bodies: ``examples`` (objects, one-element lists allowed, as
    tf.Example features are lists) plus an optional shared ``context``."""
    _check_keys(body, {"signature_name", "context", "examples"})
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise validation_error("'examples' must be a non-empty list of objects", ["examples"])
    check_rows(len(examples), ["examples"])
    context = body.get("context") or {}
    if not isinstance(context, dict):
        raise validation_error("'context' must be an object of features", ["context"])
    rows: list[Any] = []
    for i, example in enumerate(examples):
        if isinstance(example, dict):
            clash = [k for k in context if k in example]
            if clash:
                raise validation_error(f"feature '{clash[0]}' is in both 'context' and "
                                       f"examples[{i}]", ["examples", i, clash[0]])
            example = {k: _scalar(v) for k, v in (*context.items(), *example.items())}
        rows.append(example)
    return to_matrix(lv, _rows(rows, ["examples"]), ["examples"])


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


# -- signatures ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    method: str
    outputs: tuple[str, ...]


def signatures(lv: LoadedVersion) -> dict[str, Signature]:
    if lv.task != "classification":
        return {DEFAULT: Signature(PREDICT, ("predictions",)),
                "regression": Signature(REGRESS, ("outputs",))}
    if not lv.has_proba:
        return {DEFAULT: Signature(PREDICT, ("predictions",)),
                "classification": Signature(CLASSIFY, ("classes",))}
    return {DEFAULT: Signature(PREDICT, ("probabilities",)),
            "predict": Signature(PREDICT, ("predictions", "probabilities")),
            "classification": Signature(CLASSIFY, ("classes", "scores"))}


def choose_signature(lv: LoadedVersion, verb: str, name: str) -> Signature:
    """The signature a verb runs: the one named, or the verb's default."""
    sigs = signatures(lv)
    method = VERBS[verb]
    if name in ("", DEFAULT) and sigs[DEFAULT].method != method:
        # :classify/:regress on the default signature: use the model's own signature for it.
        name = next((n for n, s in sigs.items() if s.method == method), "")
        if not name:
            kind = "classifier" if lv.task == "classification" else "regressor"
            other = ":classify" if lv.task == "classification" else ":regress"
            raise validation_error(
                f"model '{lv.name}' version {lv.version} is a {kind}: it has no {method} "
                f"signature; use :predict or {other}", ["signature_name"])
    name = name or DEFAULT
    sig = sigs.get(name)
    if sig is None:
        raise validation_error(f'Serving signature name: "{name}" not found in signature def',
                               ["signature_name"])
    if sig.method != method:
        raise validation_error(
            f"signature '{echo(name)}' has method_name {sig.method}, not {method}",
            ["signature_name"])
    return sig


def _tensor(dtype: str, dims: Sequence[int | None], name: str) -> dict[str, Any]:
    # proto3 JSON writes int64 as strings, as TF Serving does: "size": "-1".
    return {"dtype": dtype,
            "tensor_shape": {"dim": [{"size": str(-1 if d is None else d), "name": ""}
                                     for d in dims], "unknown_rank": False},
            "name": name}


def _class_dtype(classes: list[Any] | None) -> str:
    first = classes[0] if classes else 0.0
    if isinstance(first, bool):
        return "DT_BOOL"
    if isinstance(first, int):
        return "DT_INT64"
    return "DT_STRING" if isinstance(first, str) else "DT_DOUBLE"


def metadata(lv: LoadedVersion) -> dict[str, Any]:
    """GetModelMetadataResponse as TF Serving writes it in JSON."""
    n_classes = len(lv.classes) if lv.classes is not None else None
    features = _tensor("DT_DOUBLE", [None, lv.n_features], "inputs:0")
    if lv.feature_names:
        features["feature_names"] = list(lv.feature_names)
    examples = {INPUT: _tensor("DT_STRING", [None], "input_example_tensor:0")}
    tensors = {
        "predictions": _tensor(_class_dtype(lv.classes), [None], "predictions:0")
        if lv.task == "classification" else _tensor("DT_DOUBLE", [None], "predictions:0"),
        "probabilities": _tensor("DT_DOUBLE", [None, n_classes], "probabilities:0"),
        "classes": _tensor("DT_STRING", [None, n_classes if lv.has_proba else 1], "classes:0"),
        "scores": _tensor("DT_DOUBLE", [None, n_classes], "scores:0"),
        "outputs": _tensor("DT_DOUBLE", [None, 1], "outputs:0"),
    }
    defs = {
        name: {"inputs": {INPUT: features} if sig.method == PREDICT else examples,
               "outputs": {o: tensors[o] for o in sig.outputs},
               "method_name": sig.method}
        for name, sig in signatures(lv).items()
    }
    return {"model_spec": {"name": lv.name, "signature_name": "", "version": lv.version},
            "metadata": {"signature_def": {"signature_def": defs}}}


# -- answers ---------------------------------------------------------------------------------
def predict_answer(sig: Signature, results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """``{"predictions": ...}`` for ``instances``, ``{"outputs": ...}`` for ``inputs``."""
    columns: dict[str, list[Any]] = {}
    for name in sig.outputs:
        if name == "probabilities":
            columns[name] = [list(r["probabilities"].values()) for r in results]
        else:
            columns[name] = [r["prediction"] for r in results]
    if len(columns) == 1:
        only = next(iter(columns.values()))
        return {"predictions": only} if key == "instances" else {"outputs": only}
    if key == "inputs":
        return {"outputs": columns}
    return {"predictions": [dict(zip(columns, row)) for row in zip(*columns.values())]}


def classify_answer(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"results": [
        [[name, p] for name, p in r["probabilities"].items()] if "probabilities" in r
        else [[r["label"], 1.0]]
        for r in results
    ]}


def regress_answer(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"results": [r["prediction"] for r in results]}


# -- status ----------------------------------------------------------------------------------
def _status(version: str, state: str, code: str = "OK", message: str = "") -> dict[str, Any]:
    return {"version": version, "state": state,
            "status": {"error_code": code, "error_message": message}}


def model_status(entry: ModelEntry, version: str | None, label: str | None) -> dict[str, Any]:
    """GetModelStatusResponse: every version, or the one a version or label names. A version
    that failed to load is in state END with its error, as TF Serving shows it."""
    every = {v: _status(v, "END", "UNKNOWN", f.error) for v, f in entry.failed.items()}
    every.update({v: _status(v, "AVAILABLE") for v in entry.servable})  # loaded or not
    if label is not None:
        if label not in entry.labels:
            raise not_found("label", f"model '{entry.name}' has no label '{echo(label)}'")
        version = entry.labels[label]
    if version is None:
        if not every:
            raise not_found("version", f"model '{entry.name}' has no versions")
        return {"model_version_status": [every[v] for v in sorted(every, key=int)]}
    if version not in every:
        raise not_found("version", f"model '{entry.name}' has no version '{echo(version)}'")
    return {"model_version_status": [every[version]]}


# The protocol's error shape: {"error": "..."}, invalid input 400 (see errors.message_only).
error_answer = message_only
