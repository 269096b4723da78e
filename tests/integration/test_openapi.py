"""GET /openapi.json is a valid OpenAPI 3.1 document generated from the pydantic schemas, it
covers every route the blueprints register, /docs serves Swagger UI from this origin, and
schemathesis finds no server error and no answer that contradicts the document."""

from __future__ import annotations

import copy
import importlib
import pkgutil
import re
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import server.http.blueprints
from server.http.openapi import JSON, OPERATIONS, build_document
from tests.conftest import ADMIN_TOKEN, LiveServer

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

DOCUMENT = build_document()
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# Routes the document does not describe, each for a reason: WebSockets are not HTTP
# operations, TF Serving's catch-all is listed path by path, Swagger UI's own files.
UNDESCRIBED = {"/ws/predict", "/ws/monitor", "/v1/models", "/v1/models/{}", "/docs/",
               "/docs/init.js", "/docs/{}"}


def _native_json(op: Any) -> bool:
    """Operations of our own API whose bodies, both ways, are JSON."""
    return (not {"tfserving", "v2", "docs"} & set(op.tags)
            and all(b.media == JSON for b in (*op.request, *op.responses.values())))


NATIVE_JSON = sorted(op.operation_id for op in OPERATIONS if _native_json(op))
SCHEMA = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT)).include(
    operation_id=NATIVE_JSON)
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, response_headers_conformance]


def _flask_routes() -> set[tuple[str, str]]:
    """(METHOD, path with every parameter as {}) for every route of every blueprint module."""
    app = Flask(__name__, static_folder=None)
    for info in pkgutil.iter_modules(server.http.blueprints.__path__):
        module = importlib.import_module(f"server.http.blueprints.{info.name}")
        app.register_blueprint(module.bp)
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<[^>]+>", "{}", rule.rule)
        for method in rule.methods or ():
            if method not in {"HEAD", "OPTIONS"}:
                routes.add((method, path))
    return routes


def _documented() -> set[tuple[str, str]]:
    return {(method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
            for path, item in DOCUMENT["paths"].items() for method in item}


def test_served_document_is_valid_openapi_31(live_server: LiveServer) -> None:
    resp = live_server.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    served = resp.json()
    OpenAPIV31SpecValidator(served).validate()
    assert served["openapi"] == "3.1.0"
    assert served == DOCUMENT, differences(served, DOCUMENT)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two JSON documents differ, as paths (the first 20)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only on one side" for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            out += differences(a[k], b[k], f"{path}/{k}")
        return out[:20]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def test_bodies_come_from_the_pydantic_models() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    for name in ("PredictRequest", "BatchRequest", "ABRequest", "OutcomeRequest",
                 "PredictResponse", "BatchResponse", "ABResponse", "ErrorResponse",
                 "HealthResponse", "ReadyResponse", "ModelsResponse", "ReloadResponse"):
        assert name in schemas
    predict = DOCUMENT["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"][JSON]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"}
    assert predict["responses"]["422"]["content"][JSON]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    # Strictness shows in the document: unknown fields are refused.
    assert schemas["PredictRequest"]["additionalProperties"] is False
    assert "$defs" not in str(DOCUMENT)


@pytest.mark.parametrize(("path", "method", "media"), [
    ("/metrics", "get", "text/plain"),
    ("/predict/stream", "post", "text/event-stream"),
    ("/stream/events", "get", "text/event-stream"),
    ("/train/stream", "post", "text/event-stream"),
    ("/predict/csv", "post", "text/csv"),
])
def test_non_json_answers_have_their_media_type(path: str, method: str, media: str) -> None:
    assert media in DOCUMENT["paths"][path][method]["responses"]["200"]["content"]


def test_admin_and_model_endpoints_declare_their_security() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header",
                                 "name": "X-API-Key"}
    assert schemes["AdminToken"]["scheme"] == "bearer"
    assert DOCUMENT["paths"]["/admin/reload"]["post"]["security"] == [{"AdminToken": []}]
    assert {"ApiKey": []} in DOCUMENT["paths"]["/predict"]["post"]["security"]
    assert DOCUMENT["paths"]["/health"]["get"]["security"] == []


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    routes = {r for r in _flask_routes() if r[1] not in UNDESCRIBED}
    documented = _documented()
    assert routes - documented == set(), "routes missing from server.http.openapi.OPERATIONS"
    # TF Serving's paths are served by one catch-all route, so they are not in the map.
    served = {r for r in documented - routes if not r[1].startswith("/v1/models/")}
    assert served == set(), "documented operations no blueprint serves"


def test_docs_page_uses_only_same_origin_assets(live_server: LiveServer) -> None:
    page = live_server.get("/docs")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = page.text
    assert 'data-spec="/openapi.json"' in html
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert urls and all(u.startswith("/docs/") for u in urls), urls
    for url in urls:
        asset = live_server.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "SwaggerUIBundle" in live_server.get("/docs/swagger-ui-bundle.js").text
    assert "validatorUrl: null" in live_server.get("/docs/init.js").text


@pytest.mark.parametrize("name", ["index.j2", "..%2F__init__.py", "swagger-ui.js.map",
                                  "%2e%2e%2fdocs.py"])
def test_docs_serves_no_other_file(live_server: LiveServer, name: str) -> None:
    resp = live_server.get(f"/docs/{name}")
    assert resp.status_code == 404
    assert resp.json()["code"] == "not_found"


def test_schemathesis_covers_the_native_json_api() -> None:
    assert {"post_predict", "post_predict_batch", "post_predict_ab", "get_experiments",
            "post_experiments_name_outcome", "get_health", "get_ready", "get_status",
            "get_models", "post_admin_reload"} <= set(NATIVE_JSON)


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_answers_as_documented(case: schemathesis.Case, live_server: LiveServer) -> None:
    headers = ADMIN if "admin" in (case.operation.tags or []) else {}
    response = case.call(base_url=live_server.url, headers=headers, timeout=10)
    case.validate_response(response, checks=CHECKS)


HUGE = 1e308  # finite, so accepted; the models' arithmetic overflows on it


@pytest.mark.parametrize(("path", "body"), [
    ("/predict/diabetes", {"features": [HUGE] * 10}),
    ("/predict/breast_cancer", {"features": [HUGE] * 30}),
    ("/predict/batch", {"model": "diabetes", "instances": [[HUGE] * 10]}),
], ids=["regressor", "classifier-probabilities", "batch"])
def test_overflowing_inputs_never_answer_null_numbers(
    live_server: LiveServer, path: str, body: dict[str, Any],
) -> None:
    resp = live_server.post(path, json=body)
    assert resp.status_code == 422, resp.text[:300]
    assert resp.json()["code"] == "model_rejected_input"
