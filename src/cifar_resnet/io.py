"""Atomic writes: a final output appears whole under its name or not at all (temp file + os.replace)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a final output gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tsv(path: str | Path, rows: list[dict]) -> None:
    """Rows of equal keys as a tab-separated table (DVC plots read it)."""
    columns = list(rows[0]) if rows else []
    lines = ["\t".join(columns)] + ["\t".join(_cell(r[c]) for c in columns) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def _cell(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)
