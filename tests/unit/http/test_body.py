"""Reading request bodies: the MAX_JSON_DEPTH bracket scan agrees with a real parse, costs a
small part of one, and every view that reads a JSON body refuses a too-deep one with a 400
before parsing it; a body the server cannot read (malformed chunks, cut short, stalled) is the
client's error in every view; CSV uploads keep to CSV_MAX_BYTES and the CSV_SPOOL_MB budget."""

from __future__ import annotations

import gzip
import io
import json
import timeit
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pydantic_core
import pytest
from flask import Flask
from flask.testing import FlaskClient
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidChunkSize,
    LimitRequestHeaders,
    NoMoreData,
)
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


class BrokenChunks(io.RawIOBase):
    """A server's input stream that hands over ``head`` and then fails as gunicorn does on a
    malformed chunked body."""

    def __init__(self, head: bytes, error: Exception) -> None:
        super().__init__()
        self.head, self.error = head, error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.head:
            raise self.error
        n = min(len(buffer), len(self.head))
        buffer[:n], self.head = self.head[:n], self.head[n:]
        return n


def streamed(stream: Any, length: int | None = None) -> dict[str, Any]:
    """The environ of a body read from ``stream`` as gunicorn hands it over: chunked, or with
    a Content-Length of ``length``."""
    size = {"HTTP_TRANSFER_ENCODING": "chunked"} if length is None else \
        {"CONTENT_LENGTH": str(length)}
    return {"wsgi.input": stream, "wsgi.input_terminated": True, **size}


# (id, gunicorn's error while the view reads, status, message part)
BAD_BODIES: list[tuple[str, Exception, int, str]] = [
    ("chunk-size-not-hex", InvalidChunkSize(b"zz"), 400, "Invalid chunk size"),
    ("chunk-missing-crlf", ChunkMissingTerminator(b"XY"), 400, "chunk terminator"),
    ("chunk-extension", InvalidChunkExtension("invalid chunk extension"), 400, "extension"),
    ("trailer-too-large", LimitRequestHeaders("limit request trailer section size"), 400,
     "trailer"),
    ("cut-short", NoMoreData(), 400, "ends early"),
    ("client-stalled", TimeoutError("timed out"), 408, "stopped sending"),
]
# (path, content type, head of the body) for every view that reads one
READERS: list[tuple[str, str, bytes]] = [
    ("/predict/iris", "application/json", b"[5.1,"),
    ("/predict/batch", "application/json", b'{"model":"iris",'),
    ("/predict/ab", "application/json", b'{"experiment":'),
    ("/predict/stream", "application/json", b'{"model":"iris",'),
    ("/predict/csv?model=iris", "text/csv", b"sepal length (cm),"),
    ("/v1/models/iris:predict", "application/json", b'{"instances":'),
    ("/v2/models/iris/infer", "application/json", b'{"inputs":'),
]


@pytest.mark.parametrize(("error", "status", "words"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
@pytest.mark.parametrize(("path", "content_type", "head"), READERS,
                         ids=[r[0] for r in READERS])
def test_a_body_that_cannot_be_read_is_the_clients_error(
    client: FlaskClient, path: str, content_type: str, head: bytes, error: Exception,
    status: int, words: str,
) -> None:
    resp = client.post(path, headers={"Content-Type": content_type},
                       environ_overrides=streamed(BrokenChunks(head, error)))
    assert resp.status_code == status, resp.get_data(as_text=True)
    payload = resp.get_json()
    assert words in payload["error"]
    if not path.startswith(("/v1", "/v2")):
        assert payload["code"] == ("request_timeout" if status == 408 else "bad_body")


@pytest.mark.parametrize(("error", "status", "words"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
def test_a_declared_length_body_read_in_one_call_fails_the_same_way(
    client: FlaskClient, error: Exception, status: int, words: str,
) -> None:
    # A body with a Content-Length is read straight from wsgi.input (BodyRequest._whole_body)
    resp = client.post("/predict/iris", headers={"Content-Type": "application/json"},
                       environ_overrides=streamed(BrokenChunks(b"[5.1,", error), length=200))
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert words in resp.get_json()["error"]


def test_a_body_shorter_than_its_declared_length_is_400(client: FlaskClient) -> None:
    resp = client.post("/predict/iris", headers={"Content-Type": "application/json"},
                       environ_overrides=streamed(io.BytesIO(b"[5.1, 3.5, 1.4, 0.2]"), 50))
    assert resp.status_code == 400 and resp.get_json()["code"] == "bad_body"
    assert "ends early" in resp.get_json()["error"]


def test_a_declared_length_body_is_read_whole(client: FlaskClient) -> None:
    body = b"[5.1, 3.5, 1.4, 0.2]"
    resp = client.post("/predict/iris", headers={"Content-Type": "application/json"},
                       environ_overrides=streamed(io.BytesIO(body + b"junk"), len(body)))
    assert resp.status_code == 200 and resp.get_json()["label"] == "setosa"


def test_an_error_of_ours_while_reading_stays_a_500(client: FlaskClient) -> None:
    resp = client.post("/predict/iris", headers={"Content-Type": "application/json"},
                       environ_overrides=streamed(BrokenChunks(b"", RuntimeError("bug"))))
    assert resp.status_code == 500 and resp.get_json()["code"] == "internal_error"


CSV_MAX = 2000
SPOOL_BYTES = 5000
IRIS_HEADER = b"sepal_length,sepal_width,petal_length,petal_width\n"


def iris_csv(size: int) -> bytes:
    """An iris CSV of ``size`` bytes: rows of 16 bytes, then blank lines (no rows)."""
    rows = IRIS_HEADER + b"5.1,3.5,1.4,0.2\n" * ((size - len(IRIS_HEADER)) // 16)
    return rows + b"\n" * (size - len(rows))


@pytest.fixture(scope="module")
def csv_app(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return create_app(Settings(model_dir=demo_repo, model_poll_seconds=0, cache="off",
                               runtime_dir=str(tmp_path_factory.mktemp("csv-runtime")),
                               csv_max_bytes=CSV_MAX, csv_spool_mb=SPOOL_BYTES / (1 << 20)))


def held(app: Flask) -> int:
    budget = app.extensions.get("upload_spool")
    return 0 if budget is None else int(budget.held)


class Unread(io.RawIOBase):
    """A body that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read")


def post_csv(app: Flask, body: bytes | io.IOBase, length: int | None = None,
             gzipped: bool = False) -> Any:
    """POST /predict/csv: ``body`` as bytes (a Content-Length), or a stream sent chunked or
    with the Content-Length ``length``. The answer stays open (its spool held) until closed."""
    headers = {"Content-Type": "text/csv", **({"Content-Encoding": "gzip"} if gzipped else {})}
    with app.test_client() as c:
        if isinstance(body, bytes):
            return c.post("/predict/csv?model=iris", data=body, headers=headers)
        return c.post("/predict/csv?model=iris", headers=headers,
                      environ_overrides=streamed(body, length))


def test_csv_at_the_limit_is_scored_and_its_spool_given_back(csv_app: Flask) -> None:
    resp = post_csv(csv_app, iris_csv(CSV_MAX))
    assert resp.status_code == 200
    assert resp.get_data(as_text=True).count("\n") == (CSV_MAX - len(IRIS_HEADER)) // 16 + 1
    resp.close()
    assert held(csv_app) == 0


def test_csv_declared_past_the_limit_is_413_before_reading(csv_app: Flask) -> None:
    resp = post_csv(csv_app, Unread(), CSV_MAX + 1)
    assert resp.status_code == 413
    payload = resp.get_json()
    assert payload["code"] == "body_too_large"
    assert payload["error"] == f"request body larger than {CSV_MAX} bytes (CSV_MAX_BYTES)"
    assert held(csv_app) == 0


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_csv_growing_past_the_limit_is_413_as_it_arrives(csv_app: Flask, gzipped: bool) -> None:
    body = iris_csv(CSV_MAX + 1)
    resp = post_csv(csv_app, io.BytesIO(gzip.compress(body) if gzipped else body),
                    gzipped=gzipped)
    assert resp.status_code == 413, resp.get_data(as_text=True)
    assert "CSV_MAX_BYTES" in resp.get_json()["error"]
    assert held(csv_app) == 0


def test_gzip_csv_is_inflated_and_a_gzip_bomb_stops_at_the_limit(csv_app: Flask) -> None:
    body = iris_csv(CSV_MAX)
    ok = post_csv(csv_app, io.BytesIO(gzip.compress(body)), gzipped=True)
    assert ok.status_code == 200 and ok.get_data().startswith(IRIS_HEADER[:-1])
    ok.close()
    bomb = gzip.compress(IRIS_HEADER + b"0" * (64 << 20))  # 64 MB of zeros in ~64 KB
    resp = post_csv(csv_app, io.BytesIO(bomb), gzipped=True)
    assert resp.status_code == 413
    cut = post_csv(csv_app, io.BytesIO(gzip.compress(body)[:-20]), gzipped=True)
    assert cut.status_code == 400 and cut.get_json()["code"] == "bad_gzip"
    assert held(csv_app) == 0


def test_a_full_spool_refuses_a_new_upload_with_503_until_it_is_given_back(
    csv_app: Flask,
) -> None:
    first = post_csv(csv_app, iris_csv(CSV_MAX))  # held until its answer is closed
    assert first.status_code == 200 and held(csv_app) == CSV_MAX
    second = post_csv(csv_app, iris_csv(CSV_MAX))
    assert held(csv_app) == 2 * CSV_MAX
    third = post_csv(csv_app, Unread(), CSV_MAX)
    assert third.status_code == 503
    assert third.headers["Retry-After"] == "1" and third.get_json()["code"] == "spool_full"
    first.close()
    assert held(csv_app) == CSV_MAX
    again = post_csv(csv_app, iris_csv(CSV_MAX))
    assert again.status_code == 200
    for resp in (second, again):
        resp.close()
    assert held(csv_app) == 0


@pytest.mark.parametrize(("body", "status"), [
    (b"a,b\n1,2\n", 422),  # the header lacks the model's features
    (b"", 422),
    (b"\xff" * 10, 422),
], ids=["bad-header", "empty", "not-text"])
def test_a_refused_csv_gives_its_spool_back(csv_app: Flask, body: bytes, status: int) -> None:
    assert post_csv(csv_app, body).status_code == status
    assert held(csv_app) == 0


def test_a_malformed_body_mid_csv_gives_its_spool_back(csv_app: Flask) -> None:
    resp = post_csv(csv_app, BrokenChunks(iris_csv(1000), InvalidChunkSize(b"zz")))
    assert resp.status_code == 400 and resp.get_json()["code"] == "bad_body"
    assert held(csv_app) == 0
