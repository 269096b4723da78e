"""MODEL_DIR=s3://... against moto's standalone S3 server on a free port: the demo serves, a
version uploaded later serves within two polls and a deleted one goes, the workers of one
host download each object once, and stopping S3 fails no prediction (it shows in /ready)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer, Process, free_port, wait_until

pytestmark = pytest.mark.slow

boto3 = pytest.importorskip("boto3")
MOTO = Path(sys.executable).parent / "moto_server"
BUCKET, PREFIX = "models", "prod/repo"
ROW = {"features": [6.3, 2.5, 5.0, 1.9]}
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
       "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer(Process):
    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        super().__init__([str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
                         {**os.environ, **AWS}, tmp / f"moto-{self.port}.log")

    def start(self) -> MotoServer:
        super().start()
        wait_until(lambda: requests.get(self.endpoint, timeout=1).status_code < 500, 20)
        return self

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": "test", "aws_secret_access_key": "test",
            "region_name": "us-east-1"})


def upload(s3: Any, root: Path, under: str = "") -> None:
    """Every file of ``root`` (or of its ``under`` folder) to the bucket, artifacts last
    within a version so that a poll never finds an artifact without its metadata."""
    base = root / under if under else root
    files = sorted((p for p in base.rglob("*") if p.is_file()),
                   key=lambda p: (p.name.startswith("model."), str(p)))
    for path in files:
        s3.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(root)}")


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoServer]:
    if not MOTO.exists():
        pytest.skip("moto[server] is not installed")
    server = MotoServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(moto: MotoServer, demo_repo: Path, tmp_path: Path,
              server_factory: Callable[..., LiveServer]) -> LiveServer:
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    upload(s3, demo_repo)
    return server_factory(Path("unused"), MODEL_DIR=f"s3://{BUCKET}/{PREFIX}",
                          AWS_ENDPOINT_URL=moto.endpoint, MODEL_CACHE_DIR=str(tmp_path / "cache"),
                          MODEL_POLL_SECONDS="0.5", **AWS)


def versions_seen(server: LiveServer, n: int = 8) -> Counter[str]:
    return Counter(server.fresh("POST", "/predict/iris", json=ROW).json().get("version")
                   for _ in range(n))


def test_the_demo_serves_from_s3_and_each_object_is_downloaded_once(
    s3_server: LiveServer, demo_repo: Path, admin: dict[str, str]
) -> None:
    ready = s3_server.get("/ready").json()
    assert ready["models"] == {"breast_cancer": ["1"], "diabetes": ["1"], "iris": ["1", "2"]}
    assert ready["storage"]["state"] == "ok" and ready["storage"]["url"].startswith("s3://")
    assert versions_seen(s3_server) == Counter({"2": 8})
    downloads = Counter(line.split('"key":"')[1].split('"')[0]
                        for line in s3_server.log_text().splitlines()
                        if '"msg":"model file downloaded"' in line)
    files = [p for p in demo_repo.rglob("*") if p.is_file()]
    assert len(downloads) == len(files) and set(downloads.values()) == {1}  # 2 workers
    trained = s3_server.post("/train/stream", json={"model": "iris", "epochs": 1}, headers=admin)
    assert trained.status_code == 409 and trained.json()["code"] == "repository_read_only"


def test_an_uploaded_version_serves_within_two_polls_and_a_deleted_one_goes(
    s3_server: LiveServer, moto: MotoServer, demo_repo: Path, tmp_path: Path
) -> None:
    s3 = moto.client()
    staged = tmp_path / "staged"
    shutil.copytree(demo_repo / "iris" / "1", staged / "iris" / "3")
    began = time.monotonic()
    upload(s3, staged)
    wait_until(lambda: versions_seen(s3_server) == Counter({"3": 8}), 5)
    assert time.monotonic() - began < 5
    for name in os.listdir(staged / "iris" / "3"):
        s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/iris/3/{name}")
    wait_until(lambda: versions_seen(s3_server) == Counter({"2": 8}), 5)
    assert "3" not in s3_server.get("/ready").json()["models"]["iris"]


def test_stopping_s3_fails_no_prediction_and_shows_in_ready(
    s3_server: LiveServer, moto: MotoServer, demo_repo: Path, tmp_path: Path
) -> None:
    moto.stop()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # several polls against a dead endpoint
        resp = s3_server.fresh("POST", "/predict/iris", json=ROW)
        assert resp.status_code == 200 and resp.json()["version"] == "2"
    ready = wait_until(lambda: (r := s3_server.fresh("GET", "/ready")).json()["storage"][
        "state"] == "degraded" and r, 10)
    assert ready.status_code == 200 and ready.json()["storage"]["error"]
    # It comes back by itself: a fresh moto on the same port, filled again (a poll may see
    # it half filled and drop versions meanwhile, as it would for a folder: the listing is
    # the repository).
    again = MotoServer(tmp_path, moto.port).start()
    try:
        s3 = again.client()
        s3.create_bucket(Bucket=BUCKET)
        upload(s3, demo_repo)
        wait_until(lambda: s3_server.fresh("GET", "/ready").json()["storage"]["state"] == "ok",
                   10)
        wait_until(lambda: versions_seen(s3_server) == Counter({"2": 8}), 10)
    finally:
        again.stop()
