"""``python -m server.profile MODEL[:VERSION] DATA.csv|DATA.parquet``: write the drift reference
(``profile.json``) of an existing version from the data it was trained on.

The data needs a column per feature of the version (its ``feature_names``; extra columns such
as ``target`` are ignored) or, for a model without names, exactly its feature count of
columns besides ``target``. An empty cell, ``nan`` or a null counts as missing. The version's
own predictions on the complete rows give the prediction reference. The file is written
aside and renamed into place; a running server picks it up at its next repository scan (the
version is reloaded with it; counts against an older profile are not mixed in).

Exit codes: 0 written, 2 unusable arguments or data (unknown model or version, missing
columns, a value that is not a number, no rows).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from server.config import Settings
from server.errors import ApiError
from server.model.loaded import LoadedVersion, build_version
from server.model.predict import parse_number, predict_columns
from server.model.profile import BINS, ProfileError, reference, write_profile
from server.model.repository import ModelRepository
from server.protocols.csvrows import feature_positions

TARGET = "target"
EXIT_UNUSABLE = 2


class Unusable(Exception):
    """What is wrong with the arguments or the data, for the person who ran the command."""


def load_version(root: Path, target: str) -> LoadedVersion:
    """``MODEL`` or ``MODEL:VERSION`` (a number, a label or ``latest``) from the repository."""
    name, _, wanted = target.partition(":")
    repo = ModelRepository(root)
    model = repo.scan().get(name)
    if model is None:
        raise Unusable(f"unknown model '{name}' in {repo.root}")
    wanted = model.labels.get(wanted, wanted) or "latest"
    if wanted == "latest" and model.versions:
        wanted = max(model.versions, key=int)
    found = model.versions.get(wanted)
    if found is None:
        raise Unusable(f"model '{name}' has no version or label '{target.partition(':')[2]}'")
    if found.metadata_error:
        raise Unusable(f"{name}/{found.version}: {found.metadata_error}")
    try:
        return build_version(found, *repo.read(found))
    except Exception as exc:  # noqa: BLE001 - a broken artifact is the user's to hear about
        raise Unusable(f"{name}/{found.version} does not load: {type(exc).__name__}: {exc}") \
            from None


def columns_of(lv: LoadedVersion, header: list[str], source: Path
               ) -> tuple[list[str], list[int]]:
    """The feature names and their positions in ``header``: the version's names, found as
    every CSV door finds them, or, for a model without names, every column but ``target``
    (as many as the model takes)."""
    if lv.feature_names:
        try:
            return list(lv.feature_names), feature_positions(lv, header)
        except ApiError as exc:
            raise Unusable(f"{source}: {exc.message}") from None
    names = [h for h in header if h != TARGET]
    if lv.n_features is not None and len(names) != lv.n_features:
        raise Unusable(f"{len(names)} feature columns besides '{TARGET}'; "
                       f"{lv.name}/{lv.version} takes {lv.n_features}")
    return names, [header.index(n) for n in names]


def read_csv(path: Path, lv: LoadedVersion) -> tuple[list[str], np.ndarray]:
    try:
        fh = path.open(newline="")
    except OSError as exc:
        raise Unusable(f"{path}: {exc.strerror}") from None
    with fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        names, positions = columns_of(lv, header, path)
        rows: list[list[float]] = []
        for line, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            values = []
            for i in positions:
                cell = row[i].strip() if i < len(row) else ""
                value = parse_number(cell) if cell else math.nan
                if value is None:
                    raise Unusable(f"{path}:{line}: not a number in column "
                                   f"'{header[i]}': {cell[:40]!r}")
                values.append(value if math.isfinite(value) else math.nan)
            rows.append(values)
    return names, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))


def read_parquet(path: Path, lv: LoadedVersion) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq  # the scoring extras (requirements-score.txt)

    try:
        header = list(pq.read_schema(path).names)
    except (OSError, ValueError) as exc:
        raise Unusable(f"{path}: not a readable Parquet file: {exc}") from None
    names, _ = columns_of(lv, header, path)
    table = pq.read_table(path, columns=names).to_pandas()
    try:
        X = np.array(table.to_numpy(dtype=np.float64, na_value=np.nan))
    except (TypeError, ValueError) as exc:
        raise Unusable(f"{path}: a column that is not numbers: {exc}") from None
    X[~np.isfinite(X)] = np.nan
    return names, X


def build(lv: LoadedVersion, X: np.ndarray, bins: int, source: str) -> dict[str, object]:
    if len(X) == 0:
        raise Unusable("the data has no rows")
    complete = X[~np.isnan(X).any(axis=1)]
    try:
        predictions = predict_columns(lv, complete).predictions if len(complete) else None
    except (ValueError, TypeError) as exc:
        raise Unusable(f"{lv.name}/{lv.version} refused the data: {exc}") from None
    names = list(lv.feature_names) if lv.feature_names else \
        [f"f{i}" for i in range(X.shape[1])]
    try:
        return reference(X, predictions, names, lv.classes, bins, source)
    except ProfileError as exc:
        raise Unusable(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.profile", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="MODEL[:VERSION]",
                        help="the version (a number or a label; latest when left out)")
    parser.add_argument("data", type=Path, help="its training data: .csv or .parquet")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the model repository (default: MODEL_DIR)")
    parser.add_argument("--bins", type=int, default=BINS, help=f"bins per feature ({BINS})")
    args = parser.parse_args(argv)
    root = args.model_dir or Settings().model_path
    try:
        if not 2 <= args.bins <= 100:
            raise Unusable("--bins: from 2 to 100")
        lv = load_version(root, args.target)
        suffix = args.data.suffix.lower()
        if suffix == ".parquet":
            _, X = read_parquet(args.data, lv)
        elif suffix == ".csv":
            _, X = read_csv(args.data, lv)
        else:
            raise Unusable(f"{args.data}: .csv or .parquet expected")
        doc = build(lv, X, args.bins, f"python -m server.profile: {args.data.name}")
    except Unusable as exc:
        print(f"python -m server.profile: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    path = write_profile(Path(root) / lv.name / lv.version, doc)
    print(f"{lv.name}/{lv.version}: {path} written from {len(X)} rows; a running server "
          "takes it at its next repository scan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
