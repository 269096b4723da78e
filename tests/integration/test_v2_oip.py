"""The Open Inference Protocol, spoken to by the real ``tritonclient.http`` and by raw HTTP."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from sklearn import datasets
from tritonclient.utils import InferenceServerException

from tests.conftest import LiveServer

IRIS = datasets.load_iris().data


@pytest.fixture(scope="module")
def triton(live_server: LiveServer) -> Any:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{live_server.port}")
    yield client
    client.close()


def native(server: LiveServer, rows: np.ndarray, version: str = "2") -> dict[str, Any]:
    """The native /predict/batch answer, in 200-row requests (the shared server's body limit
    is small; forests answer each row alike whatever the batch)."""
    out: dict[str, Any] = {"predictions": [], "probabilities": []}
    for i in range(0, len(rows), 200):
        part = server.post("/predict/batch", json={"model": "iris", "version": version,
                                                   "instances": rows[i : i + 200].tolist()})
        for key in out:
            out[key] += part.json()[key]
    return out


def test_health_and_metadata_through_tritonclient(triton: Any, live_server: LiveServer) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("iris") and triton.is_model_ready("iris", "1")
    assert not triton.is_model_ready("ghost")
    meta = triton.get_model_metadata("iris")
    assert meta["name"] == "iris" and meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["predict", "predict_proba"]
    assert triton.get_model_metadata("diabetes")["outputs"] == [
        {"name": "predict", "datatype": "FP64", "shape": [-1]}]
    assert triton.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert live_server.get(path).status_code == 200


@pytest.mark.parametrize("rows", [1, 1000])
@pytest.mark.parametrize("dtype", ["FP64", "FP32"])
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_matches_native_predict(triton: Any, live_server: LiveServer, rows: int,
                                      dtype: str, binary_in: bool, binary_out: bool) -> None:
    X = np.resize(IRIS, (rows, 4)).astype(np.float64 if dtype == "FP64" else np.float32)
    tensor = httpclient.InferInput("input-0", list(X.shape), dtype)
    tensor.set_data_from_numpy(X, binary_data=binary_in)
    outputs = [httpclient.InferRequestedOutput("predict", binary_data=binary_out),
               httpclient.InferRequestedOutput("predict_proba", binary_data=binary_out)]
    result = triton.infer("iris", [tensor], outputs=outputs, request_id="req-1")
    expected = native(live_server, X.astype(np.float64))
    assert result.get_response()["id"] == "req-1"
    assert result.as_numpy("predict").tolist() == expected["predictions"]
    proba = result.as_numpy("predict_proba")
    names = ["setosa", "versicolor", "virginica"]
    assert proba.tolist() == [[p[n] for n in names] for p in expected["probabilities"]]


def test_infer_with_version_and_default_binary_outputs(triton: Any,
                                                       live_server: LiveServer) -> None:
    tensor = httpclient.InferInput("input-0", [3, 4], "FP64")
    tensor.set_data_from_numpy(IRIS[:3])
    result = triton.infer("iris", [tensor], model_version="1")  # no outputs: all, binary
    assert result.get_response()["model_version"] == "1"
    assert result.as_numpy("predict").tolist() == native(live_server, IRIS[:3], "1")["predictions"]


def test_json_tensors_nested_and_flat(live_server: LiveServer) -> None:
    for data in (IRIS[:2].tolist(), IRIS[:2].ravel().tolist()):
        body = {"id": "x", "parameters": {"a": 1},
                "inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": data}],
                "outputs": [{"name": "predict"}]}
        resp = live_server.post("/v2/models/iris/infer", json=body)
        assert resp.status_code == 200
        assert resp.json()["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [2],
                                           "data": [0, 0]}]
    ints = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [5, 3, 1, 0]}]}
    assert live_server.post("/v2/models/iris/infer", json=ints).status_code == 200
    strings = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BYTES",
                           "data": ["5.1", "3.5", "1.4", "0.2"]}]}
    answer = live_server.post("/v2/models/iris/infer", json=strings).json()
    assert answer["outputs"][0]["data"] == [0]


def test_one_input_per_feature_by_name(live_server: LiveServer) -> None:
    names = ["petal_width", "sepal_length", "petal_length", "sepal_width"]
    row = dict(zip(["sepal_length", "sepal_width", "petal_length", "petal_width"], IRIS[100]))
    body = {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [row[n]]}
                       for n in names]}
    resp = live_server.post("/v2/models/iris/infer", json=body).json()
    assert resp["outputs"][0]["data"] == native(live_server, IRIS[100:101])["predictions"]


def test_binary_request_without_content_type(live_server: LiveServer) -> None:
    header = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}],
                         "outputs": [{"name": "predict_proba",
                                      "parameters": {"binary_data": True}}]}).encode()
    body = header + struct.pack("<4f", 5.1, 3.5, 1.4, 0.2)
    resp = requests.post(live_server.url + "/v2/models/iris/infer", data=body, timeout=5,
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 200
    size = int(resp.headers["Inference-Header-Content-Length"])
    head = json.loads(resp.content[:size])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 24
    assert np.frombuffer(resp.content[size:], "<f8").sum() == pytest.approx(1.0)


def _binary(header: dict[str, Any], blob: bytes, claimed: int | None = None) -> bytes:
    return json.dumps(header).encode() + blob


BAD = [
    ("shape-mismatch", {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64",
                                    "data": [1, 2, 3, 4]}]}),
    ("wrong-width", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64",
                                 "data": [1, 2, 3]}]}),
    ("bad-datatype", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "COMPLEX",
                                  "data": [1, 2, 3, 4]}]}),
    ("int-with-floats", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32",
                                     "data": [1.5, 2, 3, 4]}]}),
    ("string-in-fp64", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                    "data": [1, "a", 3, 4]}]}),
    ("nan", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                         "data": [1, NaN := float("nan"), 3, 4]}]}),
    ("bool-in-fp64", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                  "data": [True, 2, 3, 4]}]}),
    ("no-inputs", {"inputs": []}),
    ("inputs-not-list", {"inputs": {"name": "x"}}),
    ("no-data", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64"}]}),
    ("bad-shape", {"inputs": [{"name": "x", "shape": "1x4", "datatype": "FP64", "data": [1]}]}),
    ("unknown-output", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                    "data": [1, 2, 3, 4]}], "outputs": [{"name": "logits"}]}),
    ("three-d", {"inputs": [{"name": "x", "shape": [1, 2, 2], "datatype": "FP64",
                             "data": [1, 2, 3, 4]}]}),
]


@pytest.mark.parametrize("body", [b for _, b in BAD], ids=[n for n, _ in BAD])
def test_bad_json_requests_get_protocol_errors(live_server: LiveServer,
                                               body: dict[str, Any]) -> None:
    resp = live_server.post("/v2/models/iris/infer", data=json.dumps(body),
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert set(resp.json()) == {"error"}


@pytest.mark.parametrize(("header_len", "blob", "size"), [
    ("40000", b"", 16),           # header length beyond the body
    ("abc", b"", 16),             # not a number
    (None, b"\x00" * 8, 16),      # truncated binary tensor
    (None, b"\x00" * 20, 16),     # bytes left over
    (None, b"\x00" * 12, 12),     # byte count disagrees with shape x FP32
])
def test_bad_binary_requests(live_server: LiveServer, header_len: str | None, blob: bytes,
                             size: int) -> None:
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    resp = requests.post(live_server.url + "/v2/models/iris/infer", data=header + blob,
                         headers={"Inference-Header-Content-Length":
                                  header_len or str(len(header))}, timeout=5)
    assert resp.status_code == 400 and set(resp.json()) == {"error"}


def test_unknown_model_and_version(live_server: LiveServer, triton: Any) -> None:
    assert live_server.get("/v2/models/ghost").status_code == 404
    assert live_server.get("/v2/models/iris/versions/9/ready").status_code == 404
    resp = live_server.post("/v2/models/ghost/infer", json={"inputs": []})
    assert resp.status_code == 404 and set(resp.json()) == {"error"}
    with pytest.raises(InferenceServerException):
        triton.get_model_metadata("ghost")
