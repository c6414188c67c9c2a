"""Wall time of a stage's parts, from the start of its process to its end (timing/<stage>.json).

`process_start` is the time from the process's start to the stage's main() (interpreter start-up and imports); then
each `with timer.part(name):` block adds its seconds (data, range_test, training, evaluation, figures, outputs...).
`total` runs from the process's start to the moment the record is taken, so the parts sum to at most the total; what
is left is the stage's glue. On an accelerator, `sync` waits for the device's queued work before each clock reading,
so that a part is charged for the work it queued, not the next one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from cifar_resnet.atomic import write_json
from cifar_resnet.bootstrap import seconds_since_start

# Every part a stage may time, in the order a stage's work goes (tables list them so; a JSON file sorts its keys).
PARTS = ("process_start", "data", "range_test", "training", "evaluation", "figures", "outputs")


class PartTimer:
    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync  # set once the device is known: e.g. functools.partial(runtime.synchronize, device)
        self._started = time.perf_counter() - seconds_since_start()
        self.parts = {"process_start": time.perf_counter() - self._started}
        self._open: str | None = None

    @contextmanager
    def part(self, name: str):
        """Time the block as part `name` (one of PARTS); a name used again adds up. Parts do not nest."""
        if name not in PARTS:
            raise ValueError(f"timing part {name!r} is not one of {PARTS}")
        if self._open is not None:
            raise RuntimeError(f"timing part {name!r} started inside part {self._open!r}: parts do not nest")
        self._open = name
        begun = self._now()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + self._now() - begun
            self._open = None

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def record(self) -> dict:
        """{"parts": {name: seconds} in the order first timed, "total": seconds}. Parts are rounded down to the
        millisecond and the total up, so that the parts written sum to at most the total written."""
        total = self._now() - self._started
        return {"parts": {k: math.floor(v * 1000) / 1000 for k, v in self.parts.items()},
                "total": math.ceil(total * 1000) / 1000}

    def write(self, path: str | Path) -> None:
        """The record, atomically, with the parts again as records (`per_part`: what dvc.yaml draws as a chart)."""
        record = self.record()
        write_json(path, {**record, "per_part": [{"part": k, "seconds": v} for k, v in record["parts"].items()]})
