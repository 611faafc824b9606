"""Raw talking-face media -> Parquet tables (Ray Data). See README "Data contract" and docs/contracts.md.

The loaders are re-exported lazily so `from preprocessing import storage` stays light.
"""

from __future__ import annotations

_LOADERS = ("load_segments", "load_pairs", "load_rejects", "read_table", "read_rows")

__all__ = list(_LOADERS)


def __getattr__(name: str):
    if name in _LOADERS:
        from preprocessing import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'preprocessing' has no attribute {name!r}")
