"""MAX_JSON_DEPTH: the bracket scan agrees with a real parse, costs a small part of one, and
every view that reads a JSON body refuses a too-deep one with a 400 before parsing it."""

from __future__ import annotations

import io
import json
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pydantic_core
import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from server import create_app
from server.config import Settings
from server.http.body import json_too_deep

ROW = [5.1, 3.5, 1.4, 0.2]


def nested(depth: int, inner: str = "1") -> str:
    """``depth`` levels of alternating arrays and objects around ``inner``."""
    text = inner
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k":{text}}}'
    return text


def true_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(true_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(true_depth, value.values()), default=0)
    return 0


# (id, body, limit, too deep?)
CASES: list[tuple[str, bytes, int, bool]] = [
    ("scalar", b"42", 0, False),
    ("at-the-limit", nested(32).encode(), 32, False),
    ("one-past-the-limit", nested(33).encode(), 32, True),
    ("flat-batch", orjson.dumps({"instances": [ROW] * 1000}), 3, False),
    ("batch-one-too-deep", orjson.dumps({"instances": [ROW] * 1000}), 2, True),
    ("brackets-in-strings", orjson.dumps({"k": ["[[[[{{{{" * 20, "]]]]"]}), 2, False),
    ("escaped-quote-keeps-string-open", b'{"a":"\\"[[[[[[","b":1}', 1, False),
    ("escaped-backslash-ends-string", b'["\\\\",[[[1]]]]', 3, True),
    ("backslash-run-then-escaped-quote", b'["\\\\\\"[[[",1]', 1, False),
    ("unicode-escape-of-bracket", b'["\\u005b\\u005b",[1]]', 2, False),
    ("utf8-text", '{"name":"säule [é]","v":[[1]]}'.encode(), 3, False),
    ("closing-before-opening", b"]]]]][[[", 3, False),
    ("unterminated-string-hides-the-rest", b'["abc[[[[[[[', 2, False),
    ("deep-nesting-20000", b"[" * 20_000 + b"]" * 20_000, 32, True),
]


@pytest.mark.parametrize(("body", "limit", "deep"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_scan_finds_nesting_beyond_the_limit(body: bytes, limit: int, deep: bool) -> None:
    assert json_too_deep(body, limit) is deep


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab[]{}"\\ é,:'),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(alphabet='k[]{}"\\', max_size=4), inner, max_size=3),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_scan_agrees_with_a_parse(value: Any) -> None:
    body = json.dumps(value, ensure_ascii=False).encode()
    depth = true_depth(value)
    assert not json_too_deep(body, depth)
    if depth:
        assert json_too_deep(body, depth - 1)


def test_scan_costs_a_small_part_of_a_parse() -> None:
    """The figure docs/operations.md quotes: a 64 KB batch body, scan against parse (same run)."""
    body = orjson.dumps({"model": "iris", "instances": [ROW] * 3640})
    assert 60_000 < len(body) < 70_000

    def best(stmt: Any) -> float:
        return min(timeit.repeat(stmt, number=20, repeat=5))

    scan = best(lambda: json_too_deep(body, 32))
    parse = best(lambda: pydantic_core.from_json(body, allow_inf_nan=True))
    assert scan < parse / 3, (scan, parse)


@pytest.fixture(scope="module")
def client(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    runtime = tmp_path_factory.mktemp("runtime")
    app = create_app(Settings(model_dir=demo_repo, model_poll_seconds=0, cache="off",
                              runtime_dir=str(runtime), max_body_bytes=65536))
    with app.test_client() as c:
        yield c


def oip(data: str) -> str:
    return f'{{"inputs":[{{"name":"x","shape":[1,4],"datatype":"FP64","data":{data}}}]}}'


# (id, path, body, status) for bodies one level past MAX_JSON_DEPTH (32) in each protocol
TOO_DEEP: list[tuple[str, str, str, int]] = [
    ("native-features", "/predict", f'{{"model":"iris","features":{nested(32)}}}', 400),
    ("native-bare-list", "/predict/iris", nested(33), 400),
    ("batch-extra-field", "/predict/batch",
     f'{{"model":"iris","instances":[[1,2,3,4]],"x":{nested(32)}}}', 400),
    ("ab-user-id", "/predict/ab",
     f'{{"experiment":"iris-ab","user_id":{nested(32)},"features":[1,2,3,4]}}', 400),
    ("tf-serving", "/v1/models/iris:predict", f'{{"instances":{nested(32)}}}', 400),
    ("open-inference", "/v2/models/iris/infer", oip(nested(30)), 400),
]


@pytest.mark.parametrize(("path", "body", "status"), [c[1:] for c in TOO_DEEP],
                         ids=[c[0] for c in TOO_DEEP])
def test_too_deep_body_is_refused_before_parsing(client: FlaskClient, path: str, body: str,
                                                 status: int) -> None:
    resp = client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == status
    payload = resp.get_json()
    assert "MAX_JSON_DEPTH" in payload["error"]
    if not path.startswith(("/v1", "/v2")):
        assert payload["code"] == "bad_json"


def test_body_at_the_limit_reaches_validation(client: FlaskClient) -> None:
    resp = client.post("/predict/iris", data=nested(32),
                       headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.get_json()["code"] == "validation_error"


def test_body_without_content_type_is_checked_too(client: FlaskClient) -> None:
    resp = client.post("/predict/iris", data=nested(40))
    assert resp.status_code == 400 and resp.get_json()["code"] == "bad_json"


BINARY_HEAD = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                        "parameters": {"binary_data_size": 32}}]})


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json", ""])
def test_binary_tensor_tail_is_not_scanned(client: FlaskClient, content_type: str) -> None:
    """Only the head of the binary extension is JSON: '[' bytes in the tensor are data."""
    tail = b"[" * 32  # four float64s, every byte 0x5b
    resp = client.post("/v2/models/iris/infer", data=BINARY_HEAD + tail,
                       headers={"Content-Type": content_type,
                                "Inference-Header-Content-Length": str(len(BINARY_HEAD))})
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_binary_tensor_head_is_scanned(client: FlaskClient) -> None:
    head = oip(nested(30)).encode()
    resp = client.post("/v2/models/iris/infer", data=head + b"\0" * 32,
                       headers={"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(head))})
    assert resp.status_code == 400 and "MAX_JSON_DEPTH" in resp.get_json()["error"]


def test_chunked_body_past_the_limit_is_413_in_every_protocol(client: FlaskClient) -> None:
    body = orjson.dumps({"instances": [[1.00000001, 2, 3, 4]] * 4000})
    for path in ("/predict/batch", "/v1/models/iris:predict"):
        # No Content-Length: the server reads up to the limit and must refuse, not cut.
        resp = client.post(path, input_stream=io.BytesIO(body),
                           headers={"Content-Type": "application/json"},
                           environ_overrides={"wsgi.input_terminated": True})
        assert resp.status_code == 413, (path, resp.get_data(as_text=True))
