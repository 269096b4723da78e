"""The commands read the server's settings (MODEL_DIR), and say in one line what to install
when an optional package is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Runs the commands in subprocesses: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

# Runs a module as ``python -m`` would, with the named top-level packages made unimportable.
WITHOUT = """
import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocked())
sys.argv = [{module!r}, *{argv!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120)


def test_model_dir_alone_is_enough_for_score_and_demo(tmp_path: Path) -> None:
    repo = tmp_path / "srv-models"
    made = run(["-m", "server.demo"], tmp_path, MODEL_DIR=str(repo))
    assert made.returncode == 0, made.stderr
    assert (repo / "iris" / "2" / "model.joblib").exists()
    (tmp_path / "in.csv").write_text("sepal_length,sepal_width,petal_length,petal_width\n"
                                     "5.1,3.5,1.4,0.2\n")
    # The two commands side by side (each is mostly its interpreter starting).
    with ThreadPoolExecutor(2) as pool:
        scoring = pool.submit(run, ["-m", "server.score", "iris:2", "in.csv", "out.csv"],
                              tmp_path, MODEL_DIR=str(repo))
        # the flag still wins over the environment
        flagging = pool.submit(run, ["-m", "server.score", "iris:2", "in.csv", "out2.csv",
                                     "--model-dir", str(tmp_path / "elsewhere")], tmp_path,
                               MODEL_DIR=str(repo))
        scored, flagged = scoring.result(), flagging.result()
    assert scored.returncode == 0, scored.stderr
    assert (tmp_path / "out.csv").read_text().splitlines()[1].startswith("5.1,3.5,1.4,0.2,0,")
    assert flagged.returncode == 2 and "elsewhere" in flagged.stderr


def test_score_without_its_extras_prints_the_install_line(tmp_path: Path) -> None:
    for argv in (["--help"], ["iris", "in.csv", "out.csv"]):
        code = WITHOUT.format(names={"pandas", "pyarrow"}, module="server.score", argv=argv)
        done = run(["-c", code], tmp_path)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install -r requirements-score.txt" in lines[0]


def test_dask_without_distributed_prints_the_install_line(tmp_path: Path) -> None:
    code = WITHOUT.format(names={"distributed"}, module="server.score",
                          argv=["iris", "in.csv", "out.csv", "--dask", "local"])
    done = run(["-c", code], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "requirements-score.txt" in done.stderr


def test_profile_writes_the_drift_reference_and_says_what_is_missing(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    assert run(["-m", "server.demo", str(repo)], tmp_path).returncode == 0
    (repo / "iris" / "1" / "profile.json").unlink()
    made = run(["-m", "server.profile", "iris:stable", str(repo / "iris" / "data" / "train.csv")],
               tmp_path, MODEL_DIR=str(repo))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("iris/1: ") and "written from 150 rows" in made.stdout
    assert '"rows": 150' in (repo / "iris" / "1" / "profile.json").read_text()
    (tmp_path / "short.csv").write_text("sepal_length,petal_length,petal_width\n5.1,1.4,0.2\n")
    code = WITHOUT.format(names={"pandas", "pyarrow"}, module="server.profile",
                          argv=["iris:1", "train.parquet", "--model-dir", str(repo)])
    # Three refusals that write nothing, side by side (each is mostly its interpreter starting).
    with ThreadPoolExecutor(3) as pool:
        refusals = [pool.submit(run, argv, tmp_path, MODEL_DIR=str(repo)) for argv in (
            ["-m", "server.profile", "nope", "train.csv"],
            ["-m", "server.profile", "iris:1", "short.csv"])]
        without = pool.submit(run, ["-c", code], tmp_path)
        (unknown, short), done = [f.result() for f in refusals], without.result()
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert short.returncode == 2  # the CSV doors' own words for a missing feature column
    assert short.stderr.strip().endswith("short.csv: CSV header lacks feature 'sepal_width'")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -r requirements-score.txt" in lines[0]
