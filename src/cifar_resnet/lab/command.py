"""What the lab's long commands share at their door: their error and one line for any failure."""

from __future__ import annotations

import traceback
from pathlib import Path

from cifar_resnet.errors import CifarResnetError


class LabError(CifarResnetError):
    """A lab command cannot go on: bad arguments, another configuration than asked, a failed or stale run."""


def one_line(work):
    """`work()`, where any exception but Ctrl-C ends as one line: a long command's user needs the cause (with
    where it was raised), not a traceback, and what finished is safe on disk either way."""
    try:
        return work()
    except CifarResnetError:
        raise
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise LabError(f"unexpected {type(exc).__name__}: {exc} (at {Path(frame.filename).name}:{frame.lineno}, "
                       f"in {frame.name})") from exc
