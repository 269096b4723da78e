"""The offline scorer's output on disk: one part per chunk (rejects and manifest first, the
data part last, each by atomic rename), so a killed run leaves only whole chunks and a
re-run skips them; then the parts streamed into OUTPUT and OUTPUT.rejects.csv."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from server.model.loaded import LoadedVersion

log = logging.getLogger("server.score")

REJECT_COLUMNS = ["row", "reason"]


@dataclass(frozen=True)
class Job:
    """What the parts were made from; parts of another job are discarded, not mixed in."""

    input: str
    input_size: int
    input_mtime_ns: int
    model: str
    version: str
    sha256: str
    chunk_rows: int
    mode: str  # "single" or "dask": they cut the input differently
    out_format: str


class Parts:
    def __init__(self, output: Path, fmt: str, job: Job, prediction: Any = None) -> None:
        self.output, self.fmt, self.prediction = output, fmt, prediction
        self.dir = Path(f"{output}.parts")
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "job.json"
        wanted = asdict(job)
        if stamp.exists():
            try:
                same = json.loads(stamp.read_text()) == wanted
            except (OSError, ValueError):
                same = False
            if not same:
                log.warning("parts in %s come from another input, model or chunk size: "
                            "starting over", self.dir)
                shutil.rmtree(self.dir)
                self.dir.mkdir(parents=True)
        if not stamp.exists():
            _atomic_write(stamp, json.dumps(wanted).encode())

    def data(self, k: int) -> Path:
        return self.dir / f"part-{k:05d}.{self.fmt}"

    def manifest(self, k: int) -> Path:
        return self.dir / f"part-{k:05d}.json"

    def rejects(self, k: int) -> Path:
        return self.dir / f"rejects-{k:05d}.csv"

    def done(self, k: int) -> bool:
        return self.data(k).exists() and self.manifest(k).exists()

    def rows(self, k: int) -> int:
        return int(json.loads(self.manifest(k).read_text())["rows"])

    def write(self, k: int, scored: pd.DataFrame) -> int:
        """Write chunk ``k``; the data part is renamed into place last. Returns bad rows."""
        bad = scored["error"].to_numpy() != ""
        rejects = pd.DataFrame({"row": np.flatnonzero(bad) + 1,  # within the chunk
                                "reason": scored["error"].to_numpy()[bad]})
        tmp = self.rejects(k).with_suffix(".tmp")
        rejects.to_csv(tmp, index=False)
        os.replace(tmp, self.rejects(k))
        _atomic_write(self.manifest(k), json.dumps({"rows": len(scored),
                                                    "bad": int(bad.sum())}).encode())
        tmp = self.data(k).with_name(self.data(k).name + ".tmp")
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(to_arrow(scored, self.prediction), tmp)
        else:
            scored.to_csv(tmp, index=False)
        os.replace(tmp, self.data(k))
        return int(bad.sum())

    def concatenate(self, count: int) -> tuple[int, int]:
        """Stream parts 0..count-1 into OUTPUT and OUTPUT.rejects.csv; (rows, bad rows)."""
        rows = bad = 0
        tmp = self.output.with_name(self.output.name + ".tmp")
        rejects_path = Path(f"{self.output}.rejects.csv")
        rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
        writer = None
        with open(rejects_tmp, "w", encoding="utf-8", newline="") as rejects_out:
            rejects_out.write(",".join(REJECT_COLUMNS) + "\n")
            csv_file = open(tmp, "wb") if self.fmt == "csv" else contextlib.nullcontext(None)
            with csv_file as csv_out:
                for k in range(count):
                    part = self.data(k)
                    if csv_out is not None:
                        with part.open("rb") as fh:
                            header = fh.readline()
                            if k == 0:
                                csv_out.write(header)
                            shutil.copyfileobj(fh, csv_out, 1 << 20)
                    else:
                        import pyarrow.parquet as pq

                        pf = pq.ParquetFile(part)
                        if writer is None:
                            writer = pq.ParquetWriter(tmp, pf.schema_arrow)
                        for g in range(pf.num_row_groups):
                            writer.write_table(pf.read_row_group(g).cast(writer.schema))
                    for chunk in pd.read_csv(self.rejects(k), chunksize=100_000,
                                             dtype={"row": "int64", "reason": str},
                                             keep_default_na=False):
                        chunk["row"] += rows
                        chunk.to_csv(rejects_out, index=False, header=False)
                        bad += len(chunk)
                    rows += self.rows(k)
        if writer is not None:
            writer.close()
        elif self.fmt == "parquet":  # no chunk at all: an empty file with no columns
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), tmp)
        os.replace(tmp, self.output)
        os.replace(rejects_tmp, rejects_path)
        return rows, bad


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def to_arrow(scored: pd.DataFrame, prediction: Any) -> Any:
    """Arrow types fixed by column, so a chunk of only bad rows has its siblings' schema."""
    import pyarrow as pa

    fields = {}
    for name in scored.columns:
        values = scored[name]
        if name in ("label", "error"):
            fields[name] = pa.array(values.to_numpy(), type=pa.string(), from_pandas=True)
        elif name == "confidence":
            fields[name] = pa.array(values.to_numpy(), type=pa.float64(), from_pandas=True)
        elif name == "prediction":
            fields[name] = pa.array(values.to_numpy(), type=prediction,
                                    from_pandas=True)
        else:
            fields[name] = pa.Array.from_pandas(values)
    return pa.table(fields)


def prediction_type(lv: LoadedVersion) -> Any:
    """The Arrow type of ``prediction``: from the model, never from one chunk's values."""
    import pyarrow as pa

    classes = lv.classes if lv.task == "classification" else None
    if classes and all(isinstance(c, str) for c in classes):
        return pa.string()
    if classes and all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return pa.int64()
    if classes and all(isinstance(c, bool) for c in classes):
        return pa.bool_()
    return pa.float64()
