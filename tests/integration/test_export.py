"""``python -m server.export``: the labelled rows of a prediction log as a training table, CSV
or Parquet, labels mapped back to class values; filters by version and time; unusable
arguments and an unreachable database end in one line and a non-zero exit, no traceback."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from server.jobs.export import main
from server.serving.logstore import LogStore
from tests.conftest import ROOT, free_port

# Runs the command in subprocesses (each imports scikit-learn): not in the fast subset.
pytestmark = pytest.mark.slow

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = {"setosa": 0, "versicolor": 1, "virginica": 2}
NOW = time.time()
Done = subprocess.CompletedProcess[str]
OLD = NOW - 7 * 86400


def logged(rid: str, model: str, version: str, features: list[float] | None,
           ts: float = NOW) -> tuple[Any, ...]:
    """One row as the prediction log writes it (LogStore.COLUMNS order)."""
    return (ts, rid, 0, model, version, "native", None, None, None,
            None if features is None else orjson.dumps(features).decode(),
            "0" * 32, "{}", None, None, 0.1, 0)


# (request id, version, features, true label, time): the iris log the tests read.
IRIS = [
    ("a1", "1", [5.1, 3.5, 1.4, 0.2], "setosa", NOW),
    ("a2", "1", [7.0, 3.2, 4.7, 1.4], "versicolor", NOW),
    ("a3", "1", [6.3, 3.3, 6.0, 2.5], "virginica", NOW),
    ("a4", "2", [4.9, 3.0, 1.4, 0.2], "setosa", NOW),
    ("a5", "2", [6.4, 3.2, 4.5, 1.5], "versicolor", NOW),
    ("a6", "1", [5.8, 2.7, 5.1, 1.9], "virginica", OLD),
]
SKIPPED = [
    ("b1", "1", [5.0, 3.6, 1.4, 0.2], "daisy", NOW),  # not a class of iris
    ("b2", "1", [5.0, 3.6, 1.4], "setosa", NOW),  # another feature count
    ("b3", "1", None, "setosa", NOW),  # features hashed (PREDICTION_LOG_INPUTS=off)
    ("b4", "1", [5.0, 3.6, 1.4, 0.2], None, NOW),  # no feedback
]


@pytest.fixture
def iris_log(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    store = LogStore(url)
    store.insert([logged(rid, "iris", v, x, ts) for rid, v, x, _, ts in IRIS + SKIPPED])
    store.insert([logged("d1", "diabetes", "1", [0.01] * 10)])
    store.feedback([(rid, 0, label, None) for rid, _, _, label, _ in IRIS + SKIPPED if label])
    store.feedback([("d1", 0, None, 151.0)])
    store.close()
    return url


def export(*args: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "server.export", *args,
                           "--model-dir", str(model_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture
def export_here(capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    """The command's ``main`` in this process (a new interpreter imports scikit-learn for
    seconds): the same exit code, standard output and error."""

    def run(*args: str, model_dir: Path) -> Done:
        argv = [*args, "--model-dir", str(model_dir)]
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's refusals
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)

    return run


def expected(rows: list[tuple[Any, ...]]) -> list[list[float]]:
    return [[*x, float(CLASSES[label])] for _, _, x, label, _ in rows]


def read_back(path: Path) -> tuple[list[str], list[list[float]]]:
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        return list(frame.columns), frame.to_numpy(dtype=float).tolist()
    with path.open(newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return header, [[float(v) for v in row] for row in rows]


@pytest.mark.parametrize("name", ["feedback.csv", "feedback.parquet"])
def test_labelled_rows_are_written_with_feature_names_and_class_values(
    iris_log: str, demo_repo: Path, tmp_path: Path, name: str,
) -> None:
    out = tmp_path / name
    done = export("iris", "--log", iris_log, "--out", str(out), model_dir=demo_repo)
    assert done.returncode == 0, done.stderr
    header, rows = read_back(out)
    assert header == [*FEATURES, "target"]
    assert rows == expected(IRIS)  # oldest first, values exact, labels as class values
    # The skipped rows are counted with their reason; unlabelled and hashed ones are not rows.
    summary = done.stderr.strip()
    assert summary.startswith(f"iris: {len(IRIS)} labelled row(s) written to {out}")
    assert "2 labelled row(s) of 'iris' skipped" in summary and "'daisy'" in summary
    assert "\n" not in summary
    assert not list(tmp_path.glob(".*partial*"))


def test_parquet_target_is_an_integer_column_for_a_classifier(
    iris_log: str, demo_repo: Path, tmp_path: Path, export_here: Callable[..., Done],
) -> None:
    out = tmp_path / "f.parquet"
    assert export_here("iris", "--log", iris_log, "--out", str(out),
                  model_dir=demo_repo).returncode == 0
    dtypes = pd.read_parquet(out).dtypes
    assert str(dtypes["target"]) == "int64" and str(dtypes["sepal_length"]) == "float64"


@pytest.mark.parametrize(("args", "rows"), [
    (["--version", "2"], [r for r in IRIS if r[1] == "2"]),
    (["--version", "stable"], [r for r in IRIS if r[1] == "1"]),  # the demo's stable = 1
    (["--since", str(NOW - 3600)], [r for r in IRIS if r[4] == NOW]),
    (["--since", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 3600))],
     [r for r in IRIS if r[4] == NOW]),
    (["--version", "2", "--since", str(NOW + 60)], []),
], ids=["version", "label", "since-unix", "since-iso", "nothing-left"])
def test_version_and_since_choose_the_rows(
    iris_log: str, demo_repo: Path, args: list[str], rows: list[tuple[Any, ...]],
    export_here: Callable[..., Done],
) -> None:
    done = export_here("iris", "--log", iris_log, *args, model_dir=demo_repo)  # CSV on stdout
    assert done.returncode == 0, done.stderr
    header, *lines = list(csv.reader(io.StringIO(done.stdout)))
    assert header == [*FEATURES, "target"]
    assert [[float(v) for v in line] for line in lines] == expected(rows)


def test_a_regressor_gets_the_true_value_as_target(
    iris_log: str, demo_repo: Path, export_here: Callable[..., Done],
) -> None:
    done = export_here("diabetes", "--log", iris_log, model_dir=demo_repo)
    assert done.returncode == 0, done.stderr
    header, *lines = list(csv.reader(io.StringIO(done.stdout)))
    assert header[-1] == "target" and len(header) == 11
    assert lines == [["0.01"] * 10 + ["151.0"]]


@pytest.mark.parametrize("name", ["empty.csv", "empty.parquet"])
def test_an_empty_log_gives_the_header_only_and_says_why(
    demo_repo: Path, tmp_path: Path, name: str, export_here: Callable[..., Done],
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    LogStore(url).migrate()
    out = tmp_path / name
    done = export_here("iris", "--log", url, "--out", str(out), model_dir=demo_repo)
    assert done.returncode == 0, done.stderr
    assert read_back(out) == ([*FEATURES, "target"], [])
    assert "0 labelled row(s)" in done.stderr and "PREDICTION_LOG_INPUTS=on" in done.stderr


def one_line_error(done: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_unknown_model_exits_2_naming_it(iris_log: str, demo_repo: Path,
                                         tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    done = export("tulip", "--log", iris_log, "--out", str(out), model_dir=demo_repo)
    one_line_error(done, 2, "unknown model 'tulip'")
    assert not out.exists()


def test_unreachable_database_exits_1_in_one_line(demo_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/log"  # nothing listens there
    done = export("iris", "--log", url, "--out", str(out), model_dir=demo_repo)
    one_line_error(done, 1, "the prediction log's database is unavailable")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize(("args", "words"), [
    (["--log", "sqlite:///{tmp}/missing.db"], "no prediction log at"),
    (["--log", "mysql://localhost/log"], "PREDICTION_LOG must be"),
    (["--log", "off"], "the prediction log is off"),
    (["--out", "{tmp}/x.xlsx"], "unknown format"),
    (["--version", "canary-2"], "no version or label 'canary-2'"),
    (["--since", "yesterday"], "not a time: 'yesterday'"),
], ids=["missing-sqlite", "unknown-scheme", "off", "format", "version", "since"])
def test_unusable_arguments_exit_2_in_one_line(
    iris_log: str, demo_repo: Path, tmp_path: Path, args: list[str], words: str,
    export_here: Callable[..., Done],
) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    if "--log" not in args:
        args += ["--log", iris_log]
    done = export_here("iris", *args, model_dir=demo_repo)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert words in done.stderr.splitlines()[-1], done.stderr
    assert not (tmp_path / "missing.db").exists()  # a mistyped path makes no empty log


def test_parquet_without_pyarrow_prints_the_pip_line(
    iris_log: str, demo_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from server.export import run

    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # ``import`` then raises ModuleNotFoundError
    out = tmp_path / "f.parquet"
    monkeypatch.setattr(sys, "argv", ["server.export", "iris", "--log", iris_log, "--out",
                                      str(out), "--model-dir", str(demo_repo)])
    assert run() == 2
    assert capsys.readouterr().err.strip().endswith("pip install -r requirements-score.txt")
    assert not out.exists()
