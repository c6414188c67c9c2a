"""Atomic writes: a final output appears whole under its name or not at all (temp file + os.replace).

A write that fails for want of room (a full disk, a quota, a file-size limit) raises OutputError, one line naming
the path; the file under that name, if any, is left as it was.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cifar_resnet.errors import NO_ROOM, OutputError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    with no_room_is_an_output_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a final output gets the usual permissions
    try:
        with no_room_is_an_output_error(path):
            yield Path(tmp)
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def no_room_is_an_output_error(path: str | Path):
    """Turn a failure to write `path` for want of room into one line that names it; other errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_ROOM:
            raise
        raise OutputError(f"{path}: cannot be written ({os.strerror(exc.errno)}); nothing was written under "
                          "that name: free some space and run again") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tsv(path: str | Path, rows: list[dict]) -> None:
    """Rows as a tab-separated table (DVC plots read it); a key missing from a row is an empty cell."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["\t".join(columns)] + ["\t".join(_cell(r.get(c, "")) for c in columns) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def _cell(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def write_npz(path: str | Path, **arrays) -> None:
    """Like np.savez_compressed, without the wall-clock time numpy stamps on every member: same arrays, same bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def write_torch(path: str | Path, obj, durable: bool = False) -> None:
    """torch.save, atomically; `durable`: the file flushed to disk before the rename and its folder after.

    Serialised in memory first: torch.save reports a failed write as a bare RuntimeError ("unexpected pos"), which
    would hide a full disk; a plain file write says ENOSPC. To a file object, not a path: the records inside are not
    named after the temporary file, so the same object gives the same bytes."""
    import torch  # here: the stages that write no tensors never import torch for this module

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        folder = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
