"""TF Serving REST (v1) on the same port: TF Serving's shapes, the native API's numbers to the
bit, and ``{"error": "..."}`` with TF Serving's codes for every bad request, never a 500."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sklearn import datasets

from server.model.registry import FailedVersion, ModelEntry
from server.protocols.tfserving import model_status
from tests.answers import assert_close
from tests.conftest import LiveServer

IRIS = datasets.load_iris().data
CANCER = datasets.load_breast_cancer().data[:60]
DIABETES = datasets.load_diabetes().data[:100]
DATA = {"iris": IRIS, "breast_cancer": CANCER, "diabetes": DIABETES}
NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]
STATUS_OK = {"error_code": "OK", "error_message": ""}


def _post(server: LiveServer, path: str, body: Any) -> Any:
    resp = server.post(path, data=orjson.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    return orjson.loads(resp.content)


def _native(server: LiveServer, model: str, version: str) -> dict[str, Any]:
    return _post(server, "/predict/batch", {"model": model, "version": version,
                                            "instances": DATA[model].tolist()})


def _names(server: LiveServer, model: str) -> list[str]:
    return server.get(f"/models/{model}").json()["versions"][0]["feature_names"]  # type: ignore


def _shape(tensor: dict[str, Any]) -> list[int]:
    return [int(d["size"]) for d in tensor["tensor_shape"]["dim"]]


@pytest.mark.parametrize(
    ("path", "versions"),
    [("/v1/models/iris", ["1", "2"]), ("/v1/models/iris/", ["1", "2"]),
     ("/v1/models/iris/versions/1", ["1"]), ("/v1/models/iris/versions/02", ["2"]),
     ("/v1/models/iris/labels/stable", ["1"]), ("/v1/models/iris/labels/canary", ["2"]),
     ("/v1/models/diabetes", ["1"])],
    ids=["all-versions", "trailing-slash", "version", "version-int64", "label-stable",
         "label-canary", "regressor"],
)
def test_model_status_in_tf_serving_shape(live_server: LiveServer, path: str,
                                          versions: list[str]) -> None:
    resp = live_server.get(path)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": STATUS_OK} for v in versions]}


@pytest.mark.parametrize(
    ("path", "model", "version", "n_features", "default_output", "signatures"),
    [("/v1/models/iris/metadata", "iris", "2", 4, ("probabilities", [-1, 3]),
      {"serving_default", "predict", "classification"}),
     ("/v1/models/iris/versions/1/metadata", "iris", "1", 4, ("probabilities", [-1, 3]),
      {"serving_default", "predict", "classification"}),
     ("/v1/models/iris/labels/stable/metadata", "iris", "1", 4, ("probabilities", [-1, 3]),
      {"serving_default", "predict", "classification"}),
     ("/v1/models/breast_cancer/metadata", "breast_cancer", "1", 30, ("probabilities", [-1, 2]),
      {"serving_default", "predict", "classification"}),
     ("/v1/models/diabetes/metadata", "diabetes", "1", 10, ("predictions", [-1]),
      {"serving_default", "regression"})],
    ids=["latest", "version", "label", "pipeline-classifier", "regressor"],
)
def test_metadata_lists_the_signatures(
    live_server: LiveServer, path: str, model: str, version: str, n_features: int,
    default_output: tuple[str, list[int]], signatures: set[str],
) -> None:
    got = live_server.get(path).json()
    assert got["model_spec"] == {"name": model, "signature_name": "", "version": version}
    defs = got["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == signatures
    default = defs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    tensor = default["inputs"]["inputs"]
    assert tensor["dtype"] == "DT_DOUBLE" and _shape(tensor) == [-1, n_features]
    assert tensor["feature_names"] == _names(live_server, model)
    name, shape = default_output
    assert list(default["outputs"]) == [name]
    assert _shape(default["outputs"][name]) == shape
    if "predict" in defs:
        assert list(defs["predict"]["outputs"]) == ["predictions", "probabilities"]
        assert defs["classification"]["method_name"] == "tensorflow/serving/classify"


@pytest.mark.parametrize(
    ("path", "model", "version"),
    [("/v1/models/iris:predict", "iris", "2"),
     ("/v1/models/iris/versions/1:predict", "iris", "1"),
     ("/v1/models/iris/labels/stable:predict", "iris", "1"),
     ("/v1/models/iris/labels/canary:predict", "iris", "2"),
     ("/v1/models/breast_cancer:predict", "breast_cancer", "1"),
     ("/v1/models/diabetes/versions/1:predict", "diabetes", "1")],
    ids=["iris-latest", "iris-v1", "iris-stable", "iris-canary", "breast-cancer", "diabetes"],
)
def test_predict_equals_native_batch_in_every_input_form(
    live_server: LiveServer, path: str, model: str, version: str
) -> None:
    native = _native(live_server, model, version)
    if "probabilities" in native:  # a classifier's element: its probability vector
        expected = [list(p.values()) for p in native["probabilities"]]
    else:
        expected = native["predictions"]
    rows = DATA[model].tolist()
    names = _names(live_server, model)
    named = [dict(zip(names, r)) for r in rows]
    columns = {n: DATA[model][:, i].tolist() for i, n in enumerate(names)}
    assert _post(live_server, path, {"instances": rows}) == {"predictions": expected}
    assert _post(live_server, path, {"instances": named}) == {"predictions": expected}
    assert _post(live_server, path, {"instances": [{"inputs": r} for r in rows],
                                     "signature_name": "serving_default"}) == \
        {"predictions": expected}
    assert _post(live_server, path, {"inputs": rows}) == {"outputs": expected}
    assert _post(live_server, path, {"inputs": columns}) == {"outputs": expected}
    assert _post(live_server, path, {"inputs": {"inputs": rows}}) == {"outputs": expected}


def test_predict_signature_adds_the_predicted_class(live_server: LiveServer) -> None:
    native = _native(live_server, "iris", "1")
    proba = [list(p.values()) for p in native["probabilities"]]
    body = {"signature_name": "predict", "instances": IRIS.tolist()}
    got = _post(live_server, "/v1/models/iris/labels/stable:predict", body)
    assert got == {"predictions": [{"predictions": c, "probabilities": p}
                                   for c, p in zip(native["predictions"], proba)]}
    body = {"signature_name": "predict", "inputs": IRIS.tolist()}
    got = _post(live_server, "/v1/models/iris/labels/stable:predict", body)
    assert got == {"outputs": {"predictions": native["predictions"], "probabilities": proba}}


@pytest.mark.parametrize(
    ("path", "version"),
    [("/v1/models/iris:classify", "2"), ("/v1/models/iris/versions/1:classify", "1"),
     ("/v1/models/iris/labels/stable:classify", "1")],
    ids=["latest", "version", "label"],
)
def test_classify_gives_label_score_pairs(live_server: LiveServer, path: str,
                                          version: str) -> None:
    native = _native(live_server, "iris", version)
    expected = {"results": [[[c, p[c]] for c in CLASSES] for p in native["probabilities"]]}
    examples = [dict(zip(NAMES, r)) for r in IRIS.tolist()]
    assert _post(live_server, path, {"examples": examples}) == expected
    # tf.Example features are lists; shared features may come once in "context".
    listed = [{k: [v] for k, v in e.items() if k != "sepal_width"} for e in examples[:1]]
    got = _post(live_server, path, {"signature_name": "classification", "examples": listed,
                                    "context": {"sepal_width": float(IRIS[0, 1])}})
    if version == "2":  # the forest: a one-row call gives the bits of the 150-row one
        assert got == {"results": expected["results"][:1]}
    else:  # LogisticRegression: one row (gemv) against row 0 of a 150-row product (gemm)
        assert list(got) == ["results"] and len(got["results"]) == 1
        assert [c for c, _ in got["results"][0]] == CLASSES
        assert_close([p for _, p in got["results"][0]],
                     [p for _, p in expected["results"][0]])


def test_regress_gives_one_float_per_example(live_server: LiveServer) -> None:
    native = _native(live_server, "diabetes", "1")
    names = _names(live_server, "diabetes")
    examples = [dict(zip(names, r)) for r in DIABETES.tolist()]
    got = _post(live_server, "/v1/models/diabetes:regress", {"examples": examples})
    assert got == {"results": native["predictions"]}
    assert all(isinstance(v, float) for v in got["results"])


def test_curl_style_form_content_type_is_read_as_json(live_server: LiveServer) -> None:
    # `curl -d` sends application/x-www-form-urlencoded; TF Serving reads the body anyway.
    resp = live_server.post("/v1/models/iris/versions/1:predict",
                            data=b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}',
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200
    assert len(resp.json()["predictions"][0]) == 3


ROW = [5.1, 3.5, 1.4, 0.2]
GOOD = {"instances": [ROW]}
EX = dict(zip(NAMES, ROW))
BAD: list[tuple[str, str, str, Any, int]] = [
    ("unknown-model-predict", "POST", "/v1/models/nope:predict", GOOD, 404),
    ("unknown-model-status", "GET", "/v1/models/nope", None, 404),
    ("unknown-model-metadata", "GET", "/v1/models/nope/metadata", None, 404),
    ("unknown-version-predict", "POST", "/v1/models/iris/versions/9:predict", GOOD, 404),
    ("unknown-version-status", "GET", "/v1/models/iris/versions/9", None, 404),
    ("huge-version", "GET", "/v1/models/iris/versions/" + "9" * 40, None, 404),
    ("unknown-label-predict", "POST", "/v1/models/iris/labels/nope:predict", GOOD, 404),
    ("unknown-label-status", "GET", "/v1/models/iris/labels/nope", None, 404),
    ("unknown-label-metadata", "GET", "/v1/models/iris/labels/nope/metadata", None, 404),
    ("latest-is-not-a-label", "POST", "/v1/models/iris/labels/latest:predict", GOOD, 404),
    ("version-not-a-number", "POST", "/v1/models/iris/versions/stable:predict", GOOD, 400),
    ("unknown-verb", "POST", "/v1/models/iris:explain", GOOD, 400),
    ("no-model-name", "GET", "/v1/models", None, 400),
    ("too-few-features", "POST", "/v1/models/iris:predict", {"instances": [[1, 2, 3]]}, 400),
    ("too-many-features", "POST", "/v1/models/iris:predict", {"inputs": [[1, 2, 3, 4, 5]]}, 400),
    ("ragged-rows", "POST", "/v1/models/iris:predict", {"instances": [ROW, [1, 2]]}, 400),
    ("flat-instances", "POST", "/v1/models/iris:predict", {"instances": ROW}, 400),
    ("flat-inputs", "POST", "/v1/models/iris:predict", {"inputs": ROW}, 400),
    ("string-feature", "POST", "/v1/models/iris:predict", {"instances": [[1, "2", 3, 4]]}, 400),
    ("null-feature", "POST", "/v1/models/iris:predict", {"instances": [[1, None, 3, 4]]}, 400),
    ("bool-feature", "POST", "/v1/models/iris:predict", {"instances": [[True, 2, 3, 4]]}, 400),
    ("nan-feature", "POST", "/v1/models/iris:predict", '{"instances": [[1, NaN, 3, 4]]}', 400),
    ("infinity-feature", "POST", "/v1/models/iris:predict", '{"inputs": [[Infinity,2,3,4]]}',
     400),
    ("missing-instances", "POST", "/v1/models/iris:predict", {}, 400),
    ("both-forms", "POST", "/v1/models/iris:predict", {"instances": [ROW], "inputs": [ROW]}, 400),
    ("empty-instances", "POST", "/v1/models/iris:predict", {"instances": []}, 400),
    ("instances-not-list", "POST", "/v1/models/iris:predict", {"instances": "rows"}, 400),
    ("unknown-key", "POST", "/v1/models/iris:predict", {"instances": [ROW], "rows": 1}, 400),
    ("malformed-json", "POST", "/v1/models/iris:predict", '{"instances": [[1,2', 400),
    ("empty-body", "POST", "/v1/models/iris:predict", "", 400),
    ("body-is-list", "POST", "/v1/models/iris:predict", [ROW], 400),
    ("deep-nesting", "POST", "/v1/models/iris:predict", "[" * 20_000 + "]" * 20_000, 400),
    ("unknown-named-feature", "POST", "/v1/models/iris:predict",
     {"instances": [{**EX, "colour": 1.0}]}, 400),
    ("missing-named-feature", "POST", "/v1/models/iris:predict",
     {"instances": [{"sepal_length": 1.0}]}, 400),
    ("columns-missing-feature", "POST", "/v1/models/iris:predict",
     {"inputs": {"sepal_length": [1.0]}}, 400),
    ("columns-unequal", "POST", "/v1/models/iris:predict",
     {"inputs": {n: [1.0] * (2 if n == "petal_width" else 1) for n in NAMES}}, 400),
    ("columns-string", "POST", "/v1/models/iris:predict",
     {"inputs": {n: ["1"] for n in NAMES}}, 400),
    ("unknown-signature", "POST", "/v1/models/iris:predict",
     {"signature_name": "nope", "instances": [ROW]}, 400),
    ("signature-not-string", "POST", "/v1/models/iris:predict",
     {"signature_name": 3, "instances": [ROW]}, 400),
    ("predict-on-classify-signature", "POST", "/v1/models/iris:predict",
     {"signature_name": "classification", "instances": [ROW]}, 400),
    ("classify-on-regressor", "POST", "/v1/models/diabetes:classify",
     {"examples": [[0.0] * 10]}, 400),
    ("regress-on-classifier", "POST", "/v1/models/iris:regress", {"examples": [EX]}, 400),
    ("classify-without-examples", "POST", "/v1/models/iris:classify", {"instances": [ROW]}, 400),
    ("classify-context-clash", "POST", "/v1/models/iris:classify",
     {"examples": [EX], "context": {"sepal_length": 1.0}}, 400),
    ("classify-nan", "POST", "/v1/models/iris:classify", '{"examples": [{"sepal_length": NaN,'
     '"sepal_width": 1, "petal_length": 1, "petal_width": 1}]}', 400),
    ("get-on-predict", "GET", "/v1/models/iris:predict", None, 405),
    ("post-on-status", "POST", "/v1/models/iris", GOOD, 405),
    ("put-on-metadata", "PUT", "/v1/models/iris/metadata", GOOD, 405),
    ("delete-on-model", "DELETE", "/v1/models/iris", None, 405),
    ("too-many-rows", "POST", "/v1/models/iris:predict", {"instances": [[1, 2, 3, 4]] * 1001},
     413),
    ("body-too-large", "POST", "/v1/models/iris:predict", " " * 70_000 + "{}", 413),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_requests_answer_tf_serving_errors(
    live_server: LiveServer, method: str, path: str, body: Any, status: int
) -> None:
    data = body if isinstance(body, str) or body is None else orjson.dumps(body)
    resp = live_server.request(method, path, data=data,
                               headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    got = resp.json()
    assert list(got) == ["error"] and isinstance(got["error"], str) and got["error"]
    assert resp.headers["X-Request-ID"]


def test_bad_requests_leave_the_server_answering(live_server: LiveServer) -> None:
    for _ in range(3):
        live_server.post("/v1/models/iris:predict", data="{", headers={"Connection": "close"})
    assert _post(live_server, "/v1/models/iris/versions/2:predict", GOOD)["predictions"]


def test_failed_version_shows_state_end_with_its_error() -> None:
    # Pure: a broken artifact on disk would need a server of its own (seconds to stop).
    loaded: dict[str, Any] = {"1": None, "2": None}  # only the keys matter here
    failed = {"3": FailedVersion("iris", "3", "UnpicklingError: bad", (0, 0, 0, 0, ""))}
    entry = ModelEntry("iris", {"stable": "1", "bad": "3"}, loaded, failed)
    end = {"version": "3", "state": "END",
           "status": {"error_code": "UNKNOWN", "error_message": "UnpicklingError: bad"}}
    ok = [{"version": v, "state": "AVAILABLE", "status": STATUS_OK} for v in ("1", "2")]
    assert model_status(entry, None, None) == {"model_version_status": [*ok, end]}
    assert model_status(entry, "3", None) == {"model_version_status": [end]}
    assert model_status(entry, None, "bad") == {"model_version_status": [end]}
    assert model_status(entry, None, "stable") == {"model_version_status": ok[:1]}
