"""Every kind of bad request gets the contract's JSON error with the right 4xx status and a
field path, never a 500, and the server goes on answering normal predictions after it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import LiveServer

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
GOOD = {"model": "iris", "features": [5.1, 3.5, 1.4, 0.2]}
ROW = "[5.1,3.5,1.4,0.2]"


def _rows(n: int) -> str:
    return '{"model":"iris","instances":[' + ",".join([ROW] * n) + "]}"


# (id, method, path, headers, body, status, code, loc of the first detail or None)
CASES: list[tuple[str, str, str, dict[str, str], str | bytes, int, str, Any]] = [
    ("malformed-json", "POST", "/predict", JSON, '{"model": "iris", "features": [1,2', 400,
     "bad_json", None),
    ("empty-body", "POST", "/predict", JSON, "", 400, "empty_body", None),
    ("blank-body", "POST", "/predict", JSON, "  \n ", 400, "empty_body", None),
    ("invalid-utf8", "POST", "/predict", JSON, b'{"model": "\xff\xfe"}', 400, "bad_json", None),
    ("deep-nesting", "POST", "/predict", JSON, "[" * 20_000 + "]" * 20_000, 400, "bad_json",
     None),
    ("text-plain", "POST", "/predict", {"Content-Type": "text/plain"}, '{"model":"iris"}', 415,
     "unsupported_media_type", None),
    # a prediction's body sent with `curl -d`'s form type is read as JSON (as TF Serving does)
    ("form-encoded-not-json", "POST", "/predict/batch", FORM, "a=1", 400, "bad_json", None),
    ("form-encoded-deep", "POST", "/predict", FORM, "[" * 40 + "]" * 40, 400, "bad_json", None),
    # ... but outcomes and admin endpoints stay strict: no cross-site form posts to them
    ("form-encoded-outcome", "POST", "/experiments/iris-ab/outcome", FORM,
     '{"user_id": "u1", "value": 1}', 415, "unsupported_media_type", None),
    ("body-is-string", "POST", "/predict", JSON, '"iris"', 422, "validation_error", []),
    ("body-is-number", "POST", "/predict", JSON, "42", 422, "validation_error", []),
    ("list-to-predict-without-model", "POST", "/predict", JSON, ROW, 422, "validation_error", []),
    ("missing-features", "POST", "/predict", JSON, '{"model":"iris"}', 422, "validation_error",
     ["features"]),
    ("extra-field", "POST", "/predict", JSON, '{"model":"iris","features":' + ROW + ',"x":1}',
     422, "validation_error", ["x"]),
    ("missing-model", "POST", "/predict", JSON, '{"features":' + ROW + "}", 422,
     "validation_error", ["model"]),
    ("model-path-body-conflict", "POST", "/predict/iris", JSON,
     '{"model":"diabetes","features":' + ROW + "}", 422, "validation_error", ["model"]),
    ("too-few-features", "POST", "/predict/iris", JSON, '{"features":[1,2,3]}', 422,
     "validation_error", ["features"]),
    ("too-many-features", "POST", "/predict/iris", JSON, '{"features":[1,2,3,4,5]}', 422,
     "validation_error", ["features"]),
    ("bare-list-wrong-count", "POST", "/predict/iris", JSON, "[1,2]", 422, "validation_error",
     ["features"]),
    ("empty-features", "POST", "/predict/iris", JSON, '{"features":[]}', 422,
     "validation_error", ["features"]),
    ("string-feature", "POST", "/predict/iris", JSON, '{"features":[1,"2",3,4]}', 422,
     "validation_error", ["features", 1]),
    ("null-feature", "POST", "/predict/iris", JSON, '{"features":[1,2,null,4]}', 422,
     "validation_error", ["features", 2]),
    ("bool-feature", "POST", "/predict/iris", JSON, '{"features":[true,2,3,4]}', 422,
     "validation_error", ["features", 0]),
    ("nan-feature", "POST", "/predict/iris", JSON, '{"features":[1,NaN,3,4]}', 422,
     "validation_error", ["features", 1]),
    ("infinity-feature", "POST", "/predict/iris", JSON, '{"features":[1,2,Infinity,4]}', 422,
     "validation_error", ["features", 2]),
    ("minus-infinity-feature", "POST", "/predict/iris", JSON, '{"features":[1,2,3,-Infinity]}',
     422, "validation_error", ["features", 3]),
    ("beyond-float64", "POST", "/predict/iris", JSON, '{"features":[1e400,2,3,4]}', 422,
     "validation_error", ["features", 0]),
    ("nested-list", "POST", "/predict/iris", JSON, '{"features":[[1,2,3,4]]}', 422,
     "validation_error", ["features", 0]),
    ("features-is-string", "POST", "/predict/iris", JSON, '{"features":"1,2,3,4"}', 422,
     "validation_error", ["features"]),
    ("unknown-feature-name", "POST", "/predict/iris", JSON,
     '{"features":{"sepal_length":1,"sepal_width":2,"petal_length":3,"petal_width":4,'
     '"petal_colour":5}}', 422, "validation_error", ["features", "petal_colour"]),
    ("missing-feature-name", "POST", "/predict/iris", JSON,
     '{"features":{"sepal_length":1,"sepal_width":2,"petal_length":3}}', 422,
     "validation_error", ["features", "petal_width"]),
    ("unknown-model", "POST", "/predict/nosuch", JSON, '{"features":' + ROW + "}", 404,
     "model_not_found", None),
    ("unknown-version", "POST", "/predict/iris/versions/9", JSON, '{"features":' + ROW + "}",
     404, "version_not_found", None),
    ("unknown-label", "POST", "/predict/iris?version=beta", JSON, '{"features":' + ROW + "}",
     404, "version_not_found", None),
    ("version-float", "POST", "/predict/iris", JSON, '{"version":2.5,"features":' + ROW + "}",
     422, "validation_error", ["version"]),
    ("version-bool", "POST", "/predict/iris", JSON, '{"version":true,"features":' + ROW + "}",
     422, "validation_error", ["version"]),
    ("batch-over-max", "POST", "/predict/batch", JSON, _rows(1001), 413, "too_many_rows",
     ["instances"]),
    ("batch-empty", "POST", "/predict/batch", JSON, '{"model":"iris","instances":[]}', 422,
     "validation_error", ["instances"]),
    ("batch-ragged-row", "POST", "/predict/batch", JSON,
     '{"model":"iris","instances":[[1,2,3,4],[1,2,3]]}', 422, "validation_error",
     ["instances", 1]),
    ("batch-string-cell", "POST", "/predict/batch", JSON,
     '{"model":"iris","instances":[[1,2,3,4],[1,"x",3,4]]}', 422, "validation_error",
     ["instances", 1, 1]),
    ("batch-instances-not-list", "POST", "/predict/batch", JSON,
     '{"model":"iris","instances":{"a":1}}', 422, "validation_error", ["instances"]),
    ("batch-body-is-list", "POST", "/predict/batch", JSON, "[" + ROW + "]", 422,
     "validation_error", []),
    ("body-over-limit", "POST", "/predict/batch", JSON,
     '{"model":"iris","instances":[' + ",".join(["[1.00000001,2,3,4]"] * 4000) + "]}", 413,
     "body_too_large", None),
    ("get-on-post-route", "GET", "/predict", {}, "", 405, "method_not_allowed", None),
    ("get-on-batch", "GET", "/predict/batch", {}, "", 405, "method_not_allowed", None),
    ("unknown-route", "GET", "/nope", {}, "", 404, "not_found", None),
    ("unknown-model-info", "GET", "/models/nosuch", {}, "", 404, "model_not_found", None),
    ("reload-without-token", "POST", "/admin/reload", {}, "", 401, "unauthorized", None),
    ("reload-wrong-token", "POST", "/model/reload", {"Authorization": "Bearer nope"}, "", 401,
     "unauthorized", None),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code", "loc"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_json_4xx_and_server_keeps_serving(
    live_server: LiveServer, method: str, path: str, headers: dict[str, str],
    body: str | bytes, status: int, code: str, loc: Any,
) -> None:
    data = body.encode() if isinstance(body, str) else body
    resp = live_server.request(method, path, headers=headers, data=data)
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["Content-Type"] == "application/json"
    payload = resp.json()
    assert payload["code"] == code
    assert payload["error"]
    assert payload["request_id"] == resp.headers["X-Request-ID"]
    if loc is not None:
        assert payload["details"][0]["loc"] == loc
    after = live_server.post("/predict", json=GOOD)
    assert after.status_code == 200 and after.json()["label"] == "setosa"


@pytest.mark.parametrize("path", ["/predict/iris", "/predict", "/predict/batch"])
def test_curl_d_with_its_form_type_is_read_as_json(live_server: LiveServer, path: str) -> None:
    body = {"/predict/iris": ROW, "/predict": '{"model": "iris", "features": ' + ROW + "}",
            "/predict/batch": '{"model": "iris", "instances": [' + ROW + "]}"}[path]
    resp = live_server.post(path, data=body, headers=FORM)
    assert resp.status_code == 200, resp.text


def test_a_browser_form_post_is_not_read_as_json(live_server: LiveServer) -> None:
    # a cross-site page can post a form without a preflight; browsers name its origin
    resp = live_server.post("/predict/iris", data=ROW,
                            headers={**FORM, "Origin": "https://elsewhere.example"})
    assert resp.status_code == 415


def test_a_415_names_the_header_to_send(live_server: LiveServer) -> None:
    resp = live_server.post("/predict/iris", data=ROW, headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415 and "Content-Type: application/json" in resp.json()["error"]


def test_case_table_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_request_id_is_echoed_when_sent(live_server: LiveServer) -> None:
    resp = live_server.post("/predict", json=GOOD, headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    assert resp.json()["request_id"] == "abc-123"


def test_unsafe_request_id_is_replaced(live_server: LiveServer) -> None:
    resp = live_server.post("/predict", json=GOOD, headers={"X-Request-ID": "a b\tc"})
    assert resp.headers["X-Request-ID"] != "a b\tc"
    assert len(resp.headers["X-Request-ID"]) == 32


def test_chunked_body_over_the_limit_is_413_not_cut(live_server: LiveServer) -> None:
    body = ('{"model":"iris","instances":[' + ",".join(["[1.00000001,2,3,4]"] * 4000)
            + "]}").encode()
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))  # no Content-Length
    resp = live_server.post("/predict/batch", data=chunks,
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["code"] == "body_too_large"


@pytest.mark.parametrize("value", [1e308, -1e13, float("inf")])
def test_outcome_values_are_bounded(live_server: LiveServer, value: float) -> None:
    resp = live_server.post("/experiments/iris-ab/outcome",
                            data=f'{{"user_id": "u", "value": {value!r}}}'.replace("inf",
                                                                               "Infinity"),
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["details"][0]["loc"] == ["value"]
