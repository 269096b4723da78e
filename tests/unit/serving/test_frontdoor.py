"""The front-door core: naming a model, row limits, labels and readiness, as every protocol
sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import ApiError
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository
from server.serving.dataplane import DataPlane
from server.serving.frontdoor import FrontDoor, Limits


def door(registry: ModelRegistry, **limits: object) -> FrontDoor:
    return FrontDoor(registry, DataPlane(registry), Limits(**limits))  # type: ignore[arg-type]


def test_a_request_that_names_no_model_gets_the_default_or_a_422(
        registry: ModelRegistry) -> None:
    assert door(registry, default_model="iris").model_name(None, "here") == "iris"
    assert door(registry).model_name("diabetes", "here") == "diabetes"
    with pytest.raises(ApiError) as err:
        door(registry).model_name("", "'model' in the body")
    assert err.value.status == 422 and err.value.message == "name a model: 'model' in the body"
    assert err.value.details == [{"loc": ["model"], "msg": "required (or set DEFAULT_MODEL)"}]


@pytest.mark.parametrize(("n", "limit", "refused"), [(5, None, False), (6, None, True),
                                                     (6, 10, False), (11, 10, True)])
def test_rows_beyond_the_limit_are_413(registry: ModelRegistry, n: int, limit: int | None,
                                       refused: bool) -> None:
    front = door(registry, max_batch=5)
    if not refused:
        front.check_rows(n, ["instances"], limit)
        return
    with pytest.raises(ApiError) as err:
        front.check_rows(n, ["instances"], limit)
    assert (err.value.status, err.value.code) == (413, "too_many_rows")
    assert err.value.details == [{"loc": ["instances"], "msg": f"at most {limit or 5} rows"}]


@pytest.mark.parametrize(("version", "label", "expected"), [
    (None, None, "2"), ("1", None, "1"), (None, "stable", "1"), (None, "canary", "2"),
    ("stable", None, "1"),
])
def test_versions_and_labels_resolve_alike(registry: ModelRegistry, version: str | None,
                                           label: str | None, expected: str) -> None:
    assert door(registry).resolve("iris", version, label).version == expected


@pytest.mark.parametrize(("model", "version", "label", "code"), [
    ("nope", None, None, "model_not_found"), ("iris", "99", None, "version_not_found"),
    ("iris", None, "gone", "label_not_found"),
])
def test_unknown_targets_are_404(registry: ModelRegistry, model: str, version: str | None,
                                 label: str | None, code: str) -> None:
    with pytest.raises(ApiError) as err:
        door(registry).resolve(model, version, label)
    assert (err.value.status, err.value.code) == (404, code)


def test_readiness_loading_empty_ready_and_draining(registry: ModelRegistry,
                                                    tmp_path: Path) -> None:
    empty = ModelRegistry(ModelRepository(tmp_path))
    assert door(empty).readiness().reason == "models are loading"
    empty.reload()
    assert door(empty).readiness().reason == "no servable model in the repository"
    front = door(registry)
    ready = front.readiness()
    assert ready.ok and ready.reason is None and ready.models["iris"] == ["1", "2"]
    front.refuse_when_draining()  # not draining: nothing refused
    front.draining = True
    assert not front.readiness().ok
    assert front.readiness().reason == "shutting down: finishing requests in flight"
    with pytest.raises(ApiError) as err:
        front.refuse_when_draining()
    assert (err.value.status, err.value.code) == (503, "draining")
    assert err.value.headers == {"Retry-After": "1"}
