"""``python -m server.score``: offline scoring gives the serving code's answers, CSV and
Parquet, bad rows to a rejects file, exit 2 only for unusable input, resumable by chunk, and
the same answers on a 2-worker Dask LocalCluster."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_iris

from server.jobs.score import main
from server.model.loaded import LoadedVersion
from server.model.predict import predict_matrix
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository
from tests.answers import assert_rows_close, tree_based
from tests.conftest import ROOT

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS = 450
BAD_LINES = [  # (id, raw feature values, reason start)
    ("bad-text", ["abc", "3.0", "1.4", "0.2"], "not a number for feature 'sepal_length'"),
    ("bad-empty", ["5.1", "", "1.4", "0.2"], "missing value for feature 'sepal_width'"),
    ("bad-nan", ["5.1", "3.0", "nan", "0.2"], "NaN or infinity for feature 'petal_length'"),
    ("bad-short", ["5.1", "3.0"], "expected 5 values, got 3"),  # id + 2 fields
    ("bad-long", ["5.1", "3.0", "1.4", "0.2", "9.9"], "expected 5 values, got 6"),
]


def iris_rows(count: int = ROWS) -> np.ndarray:
    rng = np.random.default_rng(3)
    data = load_iris().data
    return np.round(data[rng.integers(0, len(data), count)] + rng.normal(0, 0.2, (count, 4)), 3)


def write_csv(path: Path, X: np.ndarray, bad: bool = False) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *FEATURES])
        for i, row in enumerate(X):
            writer.writerow([f"r{i}", *(repr(float(v)) for v in row)])
            if bad and i in (10, 120):  # one bad row in two different chunks
                for ident, values, _ in BAD_LINES:
                    writer.writerow([f"{ident}-{i}", *values])
    return path


def resolve(model_dir: Path, name: str, version: str) -> LoadedVersion:
    registry = ModelRegistry(ModelRepository(model_dir))
    registry.reload()
    return registry.resolve(name, version)


def read_floats(path: Path) -> pd.DataFrame:
    """A scored CSV with its number columns parsed like Python's float() (exact)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for name in ("prediction", "confidence"):
        if name in frame:
            frame[name] = frame[name].astype(float)
    return frame


def run(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def iris_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "in.csv", iris_rows())


@pytest.mark.parametrize("version", ["1", "2", "stable", "canary"])
def test_csv_answers_equal_predict_matrix(demo_repo: Path, iris_csv: Path, tmp_path: Path,
                                          version: str) -> None:
    out = tmp_path / "out.csv"
    assert run("iris:" + version, iris_csv, out, "--model-dir", demo_repo,
               "--chunk-rows", 100) == 0
    got = pd.read_csv(out, dtype=str, keep_default_na=False)
    lv = resolve(demo_repo, "iris", version)
    expected = predict_matrix(lv, iris_rows())
    assert list(got.columns) == ["id", *FEATURES, "prediction", "label", "confidence", "error"]
    assert got["id"].tolist() == [f"r{i}" for i in range(ROWS)]
    if tree_based(lv.estimator):  # 2 and canary, the forest: the same bits in any chunking
        assert got["prediction"].astype(int).tolist() == [r["prediction"] for r in expected]
        assert got["label"].tolist() == [r["label"] for r in expected]
        # Bit for bit: the CSV holds each float's shortest round-trip repr.
        assert got["confidence"].astype(float).tolist() == [r["confidence"] for r in expected]
    else:
        # 1 and stable, LogisticRegression: chunks of 100 rows against one 450-row call, and
        # a matrix product's rounding depends on the rows in the call and the BLAS kernel.
        rows = [{"prediction": int(p), "label": label, "confidence": float(c)}
                for p, label, c in zip(got["prediction"], got["label"], got["confidence"])]
        assert_rows_close(rows, expected, fields=("prediction", "label", "confidence"))
    assert (got["error"] == "").all()


def test_regression_model_scores_by_feature_name(demo_repo: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    lv = resolve(demo_repo, "diabetes", "1")
    assert lv.feature_names is not None
    frame = pd.DataFrame(data.data[:300], columns=list(lv.feature_names))
    frame = frame[list(reversed(frame.columns))]  # columns found by name, not position
    frame.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "d-out.csv"
    assert run("diabetes", tmp_path / "d.csv", out, "--model-dir", demo_repo) == 0
    got = read_floats(out)
    expected = predict_matrix(lv, np.asarray(data.data[:300], dtype="<f8"))
    # Exact for Ridge too: 300 rows are one chunk (--chunk-rows 50000), the same call.
    assert got["prediction"].tolist() == [r["prediction"] for r in expected]


def test_parquet_in_and_out(demo_repo: Path, tmp_path: Path) -> None:
    X = iris_rows()
    source = tmp_path / "in.parquet"
    pd.DataFrame(X, columns=FEATURES).assign(id=np.arange(ROWS)).to_parquet(
        source, row_group_size=128)
    out = tmp_path / "out.parquet"
    assert run("iris:2", source, out, "--model-dir", demo_repo, "--chunk-rows", 100) == 0
    got = pd.read_parquet(out)
    expected = predict_matrix(resolve(demo_repo, "iris", "2"), X)
    assert got["id"].tolist() == list(range(ROWS))  # passthrough keeps its type
    assert got["prediction"].tolist() == [r["prediction"] for r in expected]
    assert got["confidence"].tolist() == [r["confidence"] for r in expected]
    assert str(got["prediction"].dtype) == "int64"


def test_csv_in_parquet_out_matches_csv_out(demo_repo: Path, iris_csv: Path,
                                            tmp_path: Path) -> None:
    assert run("iris", iris_csv, tmp_path / "o.parquet", "--model-dir", demo_repo) == 0
    assert run("iris", iris_csv, tmp_path / "o.csv", "--model-dir", demo_repo) == 0
    pq = pd.read_parquet(tmp_path / "o.parquet")
    text = read_floats(tmp_path / "o.csv")
    assert pq["confidence"].tolist() == text["confidence"].tolist()


def test_bad_rows_go_to_rejects_and_run_exits_0(demo_repo: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "in.csv", iris_rows(), bad=True)
    out = tmp_path / "out.csv"
    assert run("iris:1", source, out, "--model-dir", demo_repo, "--chunk-rows", 100) == 0
    got = pd.read_csv(out, dtype=str, keep_default_na=False)
    rejects = pd.read_csv(f"{out}.rejects.csv", dtype={"row": int, "reason": str})
    assert len(got) == ROWS + 2 * len(BAD_LINES)  # bad rows keep their place in OUTPUT
    bad = got[got["error"] != ""]
    assert bad["id"].tolist() == [f"{b[0]}-{i}" for i in (10, 120) for b in BAD_LINES]
    assert (bad["prediction"] == "").all()
    # ``row`` counts data rows from 1: the row after r10 is data row 12.
    n = len(BAD_LINES)
    assert rejects["row"].tolist() == [*range(12, 12 + n), *range(122 + n, 122 + 2 * n)]
    assert rejects["reason"].tolist() == bad["error"].tolist()
    for reason, (_, _, start) in zip(rejects["reason"], BAD_LINES * 2):
        assert reason.startswith(start)
    good = got[got["error"] == ""]
    expected = predict_matrix(resolve(demo_repo, "iris", "1"), iris_rows())
    # LogisticRegression in chunks of 100 rows (fewer where bad rows were taken out) against
    # one call on all rows: the product may round differently; the numbers agree to rounding.
    assert_rows_close([{"confidence": c} for c in good["confidence"].astype(float)], expected,
                      fields=("confidence",))
    assert f"({2 * n} rejected)" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "cannot read"),
    ("empty.csv", b"", "cannot read"),
    ("garbage.parquet", b"\x00not parquet at all\x01" * 10, "cannot read"),
    ("nofeature.csv", b"a,b\n1,2\n", "lacks feature 'sepal_length'"),
    ("data.txt", b"x\n", "unknown format"),
])
def test_unreadable_input_exits_2(demo_repo: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], name: str,
                                  content: bytes | None, message: str) -> None:
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    assert run("iris", source, tmp_path / "out.csv", "--model-dir", demo_repo) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


def test_unknown_model_exits_2_with_message(demo_repo: Path, iris_csv: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert run("iris:9", iris_csv, tmp_path / "o.csv", "--model-dir", demo_repo) == 2
    assert "no version '9'" in capsys.readouterr().err


def test_rerun_recomputes_only_the_missing_chunk(demo_repo: Path, iris_csv: Path,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.csv"
    args = ("iris:2", iris_csv, out, "--model-dir", demo_repo, "--chunk-rows", 100)
    assert run(*args) == 0
    first = out.read_bytes()
    parts = sorted((tmp_path / "out.csv.parts").glob("part-*.csv"))
    assert [p.name for p in parts] == [f"part-{k:05d}.csv" for k in range(5)]
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    capsys.readouterr()

    out.unlink()
    parts[2].unlink()
    assert run(*args) == 0
    log = capsys.readouterr().err
    assert out.read_bytes() == first
    assert "chunk 2: 100 rows scored" in log
    for k in (0, 1, 3, 4):
        assert f"chunk {k}: 100 rows skipped (already written)" in log \
            or f"chunk {k}: 50 rows skipped (already written)" in log
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.with_name("out.csv.parts")
                                                          .glob("part-*.csv"))}
    assert [n for n in after if after[n] != stamps[n]] == ["part-00002.csv"]


def test_parts_of_another_model_are_not_reused(demo_repo: Path, iris_csv: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert run("iris:1", iris_csv, out, "--model-dir", demo_repo) == 0
    assert run("iris:2", iris_csv, out, "--model-dir", demo_repo) == 0
    expected = predict_matrix(resolve(demo_repo, "iris", "2"), iris_rows())
    got = read_floats(out)
    assert got["confidence"].tolist() == [r["confidence"] for r in expected]


def test_killed_run_leaves_only_whole_parts(demo_repo: Path, iris_csv: Path,
                                            tmp_path: Path) -> None:
    """A part file is either absent or complete: a half-written one only ever has a .tmp
    name, which a re-run ignores and overwrites."""
    out = tmp_path / "out.csv"
    parts = Path(f"{out}.parts")
    assert run("iris", iris_csv, out, "--model-dir", demo_repo, "--chunk-rows", 100) == 0
    first = out.read_bytes()
    (parts / "part-00004.csv").unlink()
    (parts / "part-00004.csv.tmp").write_text("id,sepal_length\nr4")  # a kill mid-write
    out.unlink()
    assert run("iris", iris_csv, out, "--model-dir", demo_repo, "--chunk-rows", 100) == 0
    assert out.read_bytes() == first


def test_cli_plain_log_lines_when_not_a_terminal(demo_repo: Path, iris_csv: Path,
                                                 tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.score", "iris", str(iris_csv), str(tmp_path / "o.csv"),
         "--model-dir", str(demo_repo), "--chunk-rows", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["chunk 0", "chunk 1", "chunk 2"]
    assert "rows/s" in lines[0] and "ETA" in lines[0] and "\r" not in done.stderr


@pytest.mark.slow  # a LocalCluster of 2 worker processes takes ~5-10 s to start and stop
def test_dask_local_cluster_gives_the_single_process_answers(demo_repo: Path, tmp_path: Path
                                                             ) -> None:
    source = write_csv(tmp_path / "in.csv", iris_rows(), bad=True)
    single, dask = tmp_path / "single.csv", tmp_path / "dask.csv"
    assert run("iris:2", source, single, "--model-dir", demo_repo, "--chunk-rows", 100) == 0
    assert run("iris:2", source, dask, "--model-dir", demo_repo, "--chunk-rows", 100,
               "--dask", "local") == 0
    assert len(list(Path(f"{dask}.parts").glob("part-*.csv"))) > 1  # really partitioned
    assert dask.read_bytes() == single.read_bytes()
    assert Path(f"{dask}.rejects.csv").read_bytes() == Path(f"{single}.rejects.csv").read_bytes()
