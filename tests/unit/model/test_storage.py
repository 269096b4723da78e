"""The s3:// mirror against an in-memory client: changed objects by ETag, verified downloads,
deletions, unsafe keys, an outage kept as status; and MODEL_DIR as a string."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest

from server.config import Settings
from server.model.storage import S3Mirror, _safe


class FakeS3:
    """list_objects_v2 (through a paginator) and get_object over a dict of key -> bytes."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets: list[str] = []
        self.down = False
        self.wrong_etag = False

    def etag(self, data: bytes) -> str:
        return '"' + ("0" * 32 if self.wrong_etag else hashlib.md5(data).hexdigest()) + '"'

    def get_paginator(self, name: str) -> Any:
        fake = self

        class Pages:
            def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:
                if fake.down:
                    raise ConnectionError("endpoint unreachable")
                return [{"Contents": [{"Key": k, "ETag": fake.etag(v)}
                                      for k, v in fake.objects.items() if k.startswith(Prefix)]}]

        return Pages()

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.gets.append(Key)
        return {"Body": io.BytesIO(self.objects[Key])}


def test_sync_downloads_changed_objects_and_deletes_gone_ones(tmp_path: Path) -> None:
    s3 = FakeS3({"p/iris/1/model.joblib": b"a", "p/iris/1/metadata.json": b"{}",
                 "other/x": b"not ours"})
    mirror = S3Mirror("s3://b/p", tmp_path, client=s3)
    mirror.sync()
    assert (tmp_path / "iris" / "1" / "model.joblib").read_bytes() == b"a"
    assert sorted(s3.gets) == ["p/iris/1/metadata.json", "p/iris/1/model.joblib"]
    mirror.sync()  # nothing changed: nothing downloaded
    assert len(s3.gets) == 2
    s3.objects["p/iris/1/model.joblib"] = b"b"
    mirror.sync()
    assert s3.gets[-1] == "p/iris/1/model.joblib"
    assert (tmp_path / "iris" / "1" / "model.joblib").read_bytes() == b"b"
    del s3.objects["p/iris/1/model.joblib"], s3.objects["p/iris/1/metadata.json"]
    mirror.sync()
    assert not (tmp_path / "iris").exists()  # no empty folders left behind
    assert mirror.status()["state"] == "ok"


def test_a_download_that_does_not_match_its_etag_replaces_nothing(tmp_path: Path) -> None:
    s3 = FakeS3({"p/m/1/model.joblib": b"good"})
    mirror = S3Mirror("s3://b/p", tmp_path, client=s3)
    mirror.sync()
    s3.objects["p/m/1/model.joblib"] = b"corrupted"
    s3.wrong_etag = True
    mirror.sync()
    assert (tmp_path / "m" / "1" / "model.joblib").read_bytes() == b"good"
    assert mirror.status()["state"] == "degraded"
    assert "do not match the ETag" in str(mirror.status()["error"])


def test_an_outage_is_kept_as_status_and_the_mirror_stays(tmp_path: Path) -> None:
    s3 = FakeS3({"p/m/1/model.joblib": b"x"})
    mirror = S3Mirror("s3://b/p", tmp_path, client=s3)
    mirror.sync()
    s3.down = True
    mirror.sync()  # never raises
    assert mirror.status()["state"] == "degraded"
    assert (tmp_path / "m" / "1" / "model.joblib").exists()
    s3.down = False
    mirror.sync()
    assert mirror.status()["state"] == "ok"


@pytest.mark.parametrize(("key", "ok"), [
    ("iris/1/model.joblib", True), ("experiments.json", True), ("../x", False),
    ("iris/../../x", False), ("iris/.staging-3/model.joblib", False), ("iris/", False),
    ("", False), ("a//b", False),
])
def test_only_plain_relative_keys_reach_the_mirror(key: str, ok: bool) -> None:
    assert _safe(key) is ok


def test_model_dir_keeps_an_s3_url_and_names_its_local_mirror(tmp_path: Path) -> None:
    remote = Settings(model_dir="s3://bucket/prefix", model_cache_dir=str(tmp_path))
    assert remote.model_dir == "s3://bucket/prefix" and remote.model_dir_remote
    assert remote.model_path.parent == tmp_path
    other = Settings(model_dir="s3://bucket/other", model_cache_dir=str(tmp_path))
    assert other.model_path != remote.model_path
    local = Settings(model_dir="models")
    assert local.model_path == Path("models") and not local.model_dir_remote
