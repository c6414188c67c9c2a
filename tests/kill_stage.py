"""Test harness: run a stage script and SIGKILL its process tree at the Nth occurrence of a named event.

    KILL_EVENTS=/tmp/x/events KILL_AT=train:epoch-end:2 python tests/kill_stage.py train

Kill points are events of the run, never times, so a test lands on the same point whatever the speed of the CPU:

    write:before-replace   an atomic write (cifar_resnet.atomic) has its whole temporary file, not yet renamed
    write:after-replace    ... renamed into place
    fsync                  a file or folder was flushed to disk (the checkpoint's, before and after its rename)
    epoch-end              the train loop logged an epoch (its checkpoint is saved by then)
    range-test-iteration   the LR range test took a step
    eval-batch             an evaluation batch was scored (per-epoch evaluation in train, and the evaluate stage)

Every occurrence is appended to $KILL_EVENTS as a line `stage event`, written before any kill, so that a reference
run lists every point a test may draw. With $KILL_AT = `stage:event:N`, the Nth occurrence of `event` kills the
process group (the test starts the harness in a session of its own, so the stage and any children die together).
The harness is used for every run a test compares, killed or not: the modules it wraps are loaded in each, so the
checkpoint's code fingerprint (the loaded modules' sources) is the same in all of them.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"epoch\s+\d+/\d+")
ATOMIC_TEMP = re.compile(r"^\..+\.tmp$")  # atomic.atomic_path's temporary files: .<name>.<random>.tmp
WRAPPED = {"lr_range_test": ["range-test-iteration"], "train": ["eval-batch"], "evaluate": ["eval-batch"]}


class Events:
    def __init__(self, stage: str):
        self.stage, self.seen = stage, Counter()
        self.log = os.open(os.environ["KILL_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        stage_at, _, rest = os.environ.get("KILL_AT", "").partition(":")
        event, _, n = rest.rpartition(":")
        self.kill_at = (event, int(n)) if stage_at == stage else None

    def __call__(self, event: str) -> None:
        self.seen[event] += 1
        os.write(self.log, f"{self.stage} {event}\n".encode())
        if self.kill_at == (event, self.seen[event]):
            os.killpg(os.getpgrp(), signal.SIGKILL)


def after(function, emit, event: str):
    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        emit(event)
        return out
    return wrapped


def install(emit, stage: str) -> None:
    replace = os.replace

    def watched_replace(src, dst, *args, **kwargs):
        ours = bool(ATOMIC_TEMP.match(Path(src).name))
        if ours:
            emit("write:before-replace")
        replace(src, dst, *args, **kwargs)
        if ours:
            emit("write:after-replace")

    os.replace = watched_replace
    os.fsync = after(os.fsync, emit, "fsync")
    import cifar_resnet.stage_door as stage_door  # imported by every stage anyway

    log = stage_door.log

    def watched_log(message, *args, **kwargs):
        log(message, *args, **kwargs)
        if EPOCH_LINE.match(str(message)):
            emit("epoch-end")

    stage_door.log = watched_log
    if "range-test-iteration" in WRAPPED.get(stage, ()):
        import cifar_resnet.lr_finder as lr_finder

        lr_finder.train_step = after(lr_finder.train_step, emit, "range-test-iteration")
    if "eval-batch" in WRAPPED.get(stage, ()):
        import cifar_resnet.evaluate as evaluate

        evaluate.tta_logits = after(evaluate.tta_logits, emit, "eval-batch")


def main() -> None:
    stage = sys.argv[1]
    script = str(REPO / "stages" / f"{stage}.py")
    install(Events(stage), stage)
    sys.argv[:] = [script]
    sys.path[0] = str(Path(script).parent)  # as for `python stages/<stage>.py`
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
