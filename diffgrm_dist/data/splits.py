"""Reading the prepare stage's split files (``train``/``valid``/``test``/``sequences``
Parquet, written one row group per block of users) by row range, decoding only the row
groups that hold the rows: what ranking and evaluation read, at any catalogue size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def row_group_starts(meta: pq.FileMetaData) -> np.ndarray:
    """First row of each row group of a Parquet file, then its row count."""
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def read_rows(path: Path, start: int, end: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, end)`` (not empty) of a Parquet file, decoding only the row groups
    that hold them."""
    file = pq.ParquetFile(path)
    starts = row_group_starts(file.metadata)
    groups = np.nonzero((starts[:-1] < end) & (starts[1:] > start))[0]
    table = file.read_row_groups(groups.tolist(), columns=columns)
    return table.slice(start - int(starts[groups[0]]), end - start)
