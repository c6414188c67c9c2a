"""The lab's tables on disk: a CSV of rows that reads back exactly what was written, and a markdown pipe table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cifar_resnet.atomic import atomic_path


def read_rows(path: Path, columns: list[str], text_columns: dict) -> pd.DataFrame:
    """The rows of `path`. Text columns stay text (a hex hash can look like 1e5) and an empty text cell stays "";
    round_trip: the floats read back are the floats written, so a summary recomputes exactly."""
    return pd.read_csv(path, dtype=text_columns, float_precision="round_trip", keep_default_na=False,
                       na_values={c: [""] for c in columns if c not in text_columns})


def write_rows(path: Path, rows: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        rows.to_csv(tmp, index=False)


def pipe_table(frame: pd.DataFrame) -> str:
    """A markdown pipe table of text cells, as written (no number parsing)."""
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)
