"""Saving tables: CSV always, Parquet when pyarrow (or fastparquet) is installed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def save_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` to ``path``; the extension picks the format (``.csv`` or ``.parquet``).

    Raises:
        ValueError: for another extension, or Parquet without an engine installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table.to_csv(path, index=False)
    elif suffix == ".parquet":
        try:
            table.to_parquet(path, index=False)
        except ImportError as error:
            raise ValueError(
                f"writing {path.name} needs pyarrow or fastparquet (pip install pyarrow): {error}"
            ) from error
    else:
        raise ValueError(f"path must end in .csv or .parquet, got {str(path)!r}")
    return path
