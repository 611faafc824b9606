"""Videos already finished in an output folder, seen again by a re-run: a renamed or moved file gets its current
path written into its rows; new labels from the manifest are reported, not applied.

A video's identity is its content hash, so a re-run skips it whatever its name. Its rows still name the path it had
when it was processed; when no current input has that path any more, the `source` column of its segments/rejects
file is rewritten (atomically) to the current path. Labels are part of what was processed (they choose the split a
segment trains in), so a changed label is never applied silently: the run warns and lists it in `_stats.json`
(`label_changes`); to relabel, delete the video's files (`segments/<hash>.parquet` and `pairs/<hash>.parquet`) and
run again, which processes that video alone.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import storage
from preprocessing.sources import Source

log = logging.getLogger(__name__)

LABELS = ("speaker", "emotion", "split")


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_input(path) as fh:
        return pq.read_table(fh, columns=columns)


def _rewrite_source(path: str, new_uri: str) -> None:
    table = _read(path)
    column = pa.array([new_uri] * table.num_rows, pa.string())
    table = table.set_column(table.schema.get_field_index("source"), "source", column)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(path, buf.getvalue())


def reconcile(
    output: str, sources: list[Source], done: set[str], threads: int = 16
) -> tuple[list[dict], list[dict]]:
    """-> (renamed, label_changes) for the finished ones among `sources` (every input, duplicates included).
    One small column read per finished video (a thread pool: on object storage these are round trips)."""
    current: dict[str, set[str]] = {}
    first: dict[str, Source] = {}
    for src in sources:
        current.setdefault(src.hash, set()).add(src.uri)
        first.setdefault(src.hash, src)
    finished = sorted(done & set(first))
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda h: _one(output, first[h], current[h]), finished))
    renamed = [r for r, _ in results if r]
    changes = [c for _, c in results if c]
    return renamed, changes


def _one(output: str, src: Source, current: set[str]) -> tuple[dict | None, dict | None]:
    h = src.hash
    seg = storage.join(output, "segments", f"{h}.parquet")
    path = seg if storage.exists(seg) else storage.join(output, "rejects", f"{h}.parquet")
    rows = _read(path, ["source"] + (list(LABELS) if path == seg else [])).slice(0, 1).to_pylist()
    if not rows:
        return None, None
    row, renamed, change = rows[0], None, None
    if row["source"] not in current:
        _rewrite_source(path, src.uri)
        renamed = {"source": src.uri, "was": row["source"]}
        log.info("%s was processed as %s: its rows now name the new path", src.uri, row["source"])
    given = {k: getattr(src, k) for k in LABELS if getattr(src, k)}
    differ = {k: (row[k], v) for k, v in given.items() if k in row and row[k] != v}
    if differ:
        change = {
            "source": src.uri,
            "hash": h,
            **{k: {"recorded": a, "manifest": b} for k, (a, b) in differ.items()},
        }
        log.warning(
            "%s is already processed with %s; the new manifest labels are NOT applied. To relabel it, delete "
            "%s and %s and run again",
            src.uri,
            ", ".join(f"{k}={a!r} (manifest: {b!r})" for k, (a, b) in differ.items()),
            seg,
            storage.join(output, "pairs", f"{h}.parquet"),
        )
    return renamed, change
