"""Open Inference Protocol (KServe V2) tensors: JSON and the binary tensor data extension.

Decoding turns the request's input tensors into one float64 matrix; encoding turns per-row
results into ``predict`` / ``predict_proba`` output tensors, as JSON data or raw little-endian
bytes after the JSON header (``Inference-Header-Content-Length``). No Flask here.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pydantic_core

from server.errors import ApiError, message_only
from server.model.loaded import LoadedVersion

DTYPES = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "INT16": "<i2",
          "INT8": "i1", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
          "FP16": "<f2", "BOOL": "?"}
FLOAT_INPUTS = {"FP64", "FP32", "FP16"}
# The integers each integer datatype holds, as Python ints: compared exactly (2**63 is not
# an INT64, though float64 cannot tell it from 2**63 - 1).
INT_RANGES = {t: (int(np.iinfo(DTYPES[t]).min), int(np.iinfo(DTYPES[t]).max))
              for t in ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")}
INPUT_DTYPES = {*FLOAT_INPUTS, *INT_RANGES, "BOOL", "BYTES"}
NON_FINITE = "is NaN or infinity"  # the same words for JSON and binary data


def bad(message: str, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_argument", message)


@dataclass
class InferRequest:
    id: str | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]] | None
    parameters: dict[str, Any]
    binary: bytes  # what followed the JSON header (empty without the extension)


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split JSON header and binary tail; check the envelope's shape."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise bad("Inference-Header-Content-Length must be an integer") from None
        if size < 0 or size > len(body):
            raise bad(f"Inference-Header-Content-Length {size} exceeds the body ({len(body)} "
                      "bytes)")
        head, binary = body[:size], body[size:]
    else:
        head, binary = body, b""
    if not head.strip():
        raise bad("empty request body")
    try:
        doc = pydantic_core.from_json(head, allow_inf_nan=True)
    except ValueError as exc:
        raise bad(f"malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise bad("the request must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise bad("'inputs' must be a non-empty list of tensors")
    outputs = doc.get("outputs")
    if outputs is not None and (not isinstance(outputs, list) or
                                not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                        for o in outputs)):
        raise bad("'outputs' must be a list of {name, parameters?}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("'parameters' must be an object")
    rid = doc.get("id")
    return InferRequest(None if rid is None else str(rid), inputs, outputs, params, binary)


def declared_rows(req: InferRequest) -> int:
    """The rows the request's shapes announce, before any tensor is decoded: the first
    dimension of a 2-D input or of one-input-per-feature columns (0 when unknown; a single
    1-D input may be one row, and is counted once decoded)."""
    shape = req.inputs[0].get("shape")
    if not isinstance(shape, list) or not shape or not isinstance(shape[0], int):
        return 0
    return shape[0] if len(shape) >= 2 or len(req.inputs) > 1 else 0


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"input '{tensor.get('name')}': 'shape' must be a list of integers >= 0")
    return shape


def _decode_one(tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name = tensor.get("name")
    if not isinstance(name, str):
        raise bad("every input needs a 'name'")
    dtype = tensor.get("datatype")
    if dtype not in INPUT_DTYPES:
        raise bad(f"input '{name}': unsupported datatype {dtype!r}")
    shape = _shape(tensor)
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size < 0:
            raise bad(f"input '{name}': binary_data_size must be an integer")
        if offset + size > len(binary):
            raise bad(f"input '{name}': {size} bytes announced, {len(binary) - offset} sent")
        raw = binary[offset : offset + size]
        offset += size
        if dtype == "BYTES":
            values = _unpack_bytes(raw, name)
        else:
            item = np.dtype(DTYPES[dtype]).itemsize
            if size != count * item:
                raise bad(f"input '{name}': {size} bytes for shape {shape} of {dtype} "
                          f"(expected {count * item})")
            return _from_binary(raw, dtype, name).reshape(shape), offset
    else:
        if "data" not in tensor:
            raise bad(f"input '{name}' has no 'data'")
        values = _flatten(tensor["data"], name)
    if len(values) != count:
        raise bad(f"input '{name}': {len(values)} values for shape {shape}")
    return _numbers(values, dtype, name).reshape(shape), offset


def _flatten(data: Any, name: str) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _from_binary(raw: bytes, dtype: str, name: str) -> np.ndarray:
    """Raw little-endian tensor bytes as float64, held to what the JSON form may hold: no NaN
    or infinity, and a BOOL is one byte 0 or 1. Integers fit their datatype by construction."""
    if dtype == "BOOL":
        raw_bytes = np.frombuffer(raw, dtype="u1")
        _refuse_first(raw_bytes > 1, name, "is not a BOOL (a byte 0 or 1)")
        return raw_bytes.astype("<f8")
    values = np.frombuffer(raw, dtype=DTYPES[dtype])
    if dtype in FLOAT_INPUTS:
        _refuse_first(~np.isfinite(values), name, NON_FINITE)
    return values.astype("<f8")


def _refuse_first(wrong: np.ndarray, name: str, why: str) -> None:
    """400 naming the first element of a tensor where ``wrong`` holds (vectorised check)."""
    if wrong.any():
        raise bad(f"input '{name}': element {int(np.argmax(wrong))} {why}")


def _numbers(values: list[Any], dtype: str, name: str) -> np.ndarray:
    """JSON data (or BYTES elements) as float64, each value checked against its datatype:
    a number (a boolean for BOOL), finite, an integer within range for the integer types,
    and representable in FP16/FP32 (70000 is no FP16: it would become infinity)."""
    out = np.empty(len(values), dtype="<f8")
    bounds = INT_RANGES.get(dtype)
    for i, v in enumerate(values):
        if dtype == "BYTES":
            try:
                v = float(v.decode() if isinstance(v, bytes) else v)
            except (TypeError, ValueError, UnicodeDecodeError, OverflowError):
                raise bad(f"input '{name}': element {i} is not a number") from None
        elif dtype == "BOOL":
            if not isinstance(v, bool):
                raise bad(f"input '{name}': element {i} is not a boolean (BOOL)")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"input '{name}': element {i} is not a number ({dtype})")
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f"input '{name}': element {i} {NON_FINITE}")
        if bounds is not None:
            if isinstance(v, float) and not v.is_integer():
                raise bad(f"input '{name}': element {i} is not an integer ({dtype})")
            if not bounds[0] <= v <= bounds[1]:
                raise bad(f"input '{name}': element {i} is out of range for {dtype} "
                          f"[{bounds[0]}, {bounds[1]}]")
        try:
            out[i] = v
        except OverflowError:  # an integer beyond float64 (JSON integers have no bound)
            raise bad(f"input '{name}': element {i} is out of range for {dtype}") from None
    if dtype in ("FP32", "FP16"):  # the values the client's tensor holds, as in binary form
        with np.errstate(over="ignore"):
            narrowed = out.astype(DTYPES[dtype])
        _refuse_first(~np.isfinite(narrowed), name, f"is out of range for {dtype}")
        out = narrowed.astype("<f8")
    return out


def _unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad(f"input '{name}': truncated BYTES element")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise bad(f"input '{name}': truncated BYTES element")
        out.append(raw[pos : pos + length])
        pos += length
    return out


def to_matrix(lv: LoadedVersion, req: InferRequest) -> np.ndarray:
    """The inputs as one (rows x features) matrix: one 2-D tensor, or one column per input
    (ordered by feature name when every input is named after a feature)."""
    arrays = []
    offset = 0
    for tensor in req.inputs:
        array, offset = _decode_one(tensor, req.binary, offset)
        arrays.append(array)
    if offset != len(req.binary):
        raise bad(f"{len(req.binary) - offset} bytes after the last binary input")
    width = lv.n_features
    if len(arrays) == 1:
        X = arrays[0]
        if X.ndim == 1:
            X = X.reshape(1, -1) if width is None or X.size == width else X.reshape(-1, 1)
        elif X.ndim > 2:
            raise bad(f"input '{req.inputs[0]['name']}': shape must be [rows, features]")
    else:
        names = [t["name"] for t in req.inputs]
        index = lv.feature_index or {}
        if index and set(names) == set(index):
            arrays = [arrays[names.index(n)] for n in index]
        columns = []
        for tensor, array in zip(req.inputs, arrays):
            if array.ndim == 2 and array.shape[1] == 1:
                array = array[:, 0]
            if array.ndim != 1:
                raise bad(f"input '{tensor['name']}': one input per feature must be [rows] "
                          "or [rows, 1]")
            columns.append(array)
        if len({c.shape[0] for c in columns}) != 1:
            raise bad("inputs have different row counts")
        X = np.column_stack(columns)
    if width is not None and X.shape[1] != width:
        raise bad(f"expected {width} features per row, got {X.shape[1]}")
    if X.shape[0] == 0:
        raise bad("no rows to infer")
    return np.ascontiguousarray(X, dtype="<f8")


def available_outputs(lv: LoadedVersion) -> list[str]:
    return ["predict", "predict_proba"] if lv.has_proba else ["predict"]


def metadata(lv: LoadedVersion, versions: list[str]) -> dict[str, Any]:
    n = lv.n_features if lv.n_features is not None else -1
    outputs = [{"name": "predict", "datatype": _predict_dtype(lv), "shape": [-1]}]
    if lv.has_proba and lv.classes is not None:
        outputs.append({"name": "predict_proba", "datatype": "FP64",
                        "shape": [-1, len(lv.classes)]})
    out: dict[str, Any] = {
        "name": lv.name, "versions": versions, "platform": "scikit-learn",
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, n]}],
        "outputs": outputs,
    }
    params: dict[str, Any] = {"version": lv.version, "task": lv.task, "sha256": lv.sha256}
    if lv.feature_names:
        params["feature_names"] = list(lv.feature_names)
    if lv.class_names:
        params["class_names"] = lv.class_names
    out["parameters"] = params
    return out


def _predict_dtype(lv: LoadedVersion) -> str:
    if lv.task != "classification" or lv.classes is None:
        return "FP64"
    if all(isinstance(c, bool) for c in lv.classes):
        return "BOOL"
    if all(isinstance(c, int) for c in lv.classes):
        return "INT64"
    if all(isinstance(c, (int, float)) for c in lv.classes):
        return "FP64"
    return "BYTES"


def encode_response(lv: LoadedVersion, req: InferRequest, results: list[dict[str, Any]]
                    ) -> tuple[bytes, int | None]:
    """The JSON answer, and the JSON header's length when binary outputs follow it."""
    wanted = req.outputs or [{"name": n} for n in available_outputs(lv)]
    binary_default = bool(req.parameters.get("binary_data_output", False))
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for spec in wanted:
        name = spec["name"]
        if name not in available_outputs(lv):
            raise bad(f"unknown output '{name}' (this model has {available_outputs(lv)})")
        if name == "predict":
            dtype = _predict_dtype(lv)
            values: Any = [r["prediction"] for r in results]
            shape = [len(results)]
        else:
            dtype = "FP64"
            names = lv.class_names or []
            values = [[r["probabilities"][c] for c in names] for r in results]
            shape = [len(results), len(names)]
        params = spec.get("parameters") or {}
        as_binary = bool(params.get("binary_data", binary_default)) if isinstance(params, dict) \
            else binary_default
        tensor: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if as_binary:
            blob = _pack(values, dtype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values if name == "predict" else [x for row in values for x in row]
        tensors.append(tensor)
    body = {"model_name": lv.name, "model_version": lv.version, "outputs": tensors}
    if req.id is not None:
        body["id"] = req.id
    head = orjson.dumps(body)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _pack(values: Any, dtype: str) -> bytes:
    if dtype == "BYTES":
        parts = [str(v).encode() for v in values]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.asarray(values, dtype=DTYPES[dtype]).tobytes()


# The protocol's error shape: {"error": "..."}, invalid input 400 (see errors.message_only).
error_answer = message_only
