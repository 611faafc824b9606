"""Reading the tables written by `edtalk preprocess`: Ray Datasets for training, plain pyarrow for tests and tools."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import schema, storage


def table_files(output: str, table: str) -> list[str]:
    """The Parquet files of one table (segments | pairs | rejects) under an output folder ([] when none)."""
    if table not in schema.TABLES:
        raise ValueError(f"unknown table {table!r}; use one of {sorted(schema.TABLES)}")
    folder = storage.join(output, table)
    return storage.list_files(folder, ".parquet") if storage.exists(folder) else []


def read_table(output: str, table: str, columns: list[str] | None = None) -> pa.Table:
    """A whole table as one pyarrow Table (no Ray): for tests, tools and small data."""
    parts = []
    for f in table_files(output, table):
        with storage.open_input(f) as fh:
            parts.append(pq.read_table(fh, columns=columns, schema=schema.TABLES[table]))
    if not parts:
        empty = schema.TABLES[table].empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables(parts)


def read_rows(output: str, table: str, columns: list[str] | None = None) -> list[dict]:
    """A table as a list of row dicts (what decode_segment / decode_pair take)."""
    return read_table(output, table, columns).to_pylist()


def _ray_dataset(output: str, table: str, **kwargs):
    import ray

    files = table_files(output, table)
    if not files:
        return ray.data.from_arrow(schema.TABLES[table].empty_table())
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs, schema=schema.TABLES[table], **kwargs)


def load_segments(output: str, **kwargs):
    """The `segments` table as a Ray Dataset (kwargs go to ray.data.read_parquet, e.g. columns=[...])."""
    return _ray_dataset(output, "segments", **kwargs)


def load_pairs(output: str, **kwargs):
    """The `pairs` table as a Ray Dataset."""
    return _ray_dataset(output, "pairs", **kwargs)


def load_rejects(output: str, **kwargs):
    """The `rejects` table as a Ray Dataset."""
    return _ray_dataset(output, "rejects", **kwargs)
