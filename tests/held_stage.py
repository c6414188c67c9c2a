"""Test harness: run a stage script, held still after a chosen epoch, so that a test can signal it mid-run.

    HOLD_AFTER_EPOCH=1 HOLD_FIFO=/tmp/x/hold python tests/held_stage.py stages/train.py

A tiny epoch takes a fraction of a second: "wait for the epoch-1 line, then kill" races the end of the run. Here
`cifar_resnet.stage_door.log` (through which the stages print their lines; they import it when they run) is wrapped:
after the line `epoch  N/E ...` with N = $HOLD_AFTER_EPOCH, it blocks reading one line from the FIFO $HOLD_FIFO
until the test writes a line or closes its end, or signals or kills the process. The train loop saves epoch N's
checkpoint before it logs that line, so a held run is mid-way with a checkpoint, whatever the speed of the CPU.

A FIFO named in the environment rather than stdin: with train.nproc > 1 the stage relaunches its command line
under torchrun, and the rank-0 worker that logs the epochs is a grandchild whose stdin is not the test's. For that
relaunch `main()` sees sys.argv = [harness, stage, args...] (stage_door.run_stage is wrapped), so the workers run this
harness too; the stage's own argument parser, and `__main__.__file__` (hence the checkpoint's code fingerprint),
see a plain `python stage args...`. The other ranks log nothing and wait at the end-of-epoch barrier.
"""

from __future__ import annotations

import os
import select
import re
import runpy
import sys
from pathlib import Path

EPOCH_LINE = re.compile(r"epoch\s+(\d+)/\d+")


def wait_for_release(fifo: str) -> None:
    """Block until the FIFO has data or its writer closed it. Waiting in short select() calls, not one blocking
    read: a signal (SIGINT) that lands just before a blocking read would not interrupt it, and the child would wait
    forever; between select() calls Python runs the signal's handler. The wait ends on state, not on time."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the test holds the other end open: no wait here
    try:
        while not select.select([fd], [], [], 0.1)[0]:
            pass
    finally:
        os.close(fd)


def holding(log, epoch: int, fifo: str):
    """`log`, then, after the line of `epoch`, wait for one line (or EOF) on the FIFO."""

    def held_log(message, *args, **kwargs):
        log(message, *args, **kwargs)
        found = EPOCH_LINE.match(str(message))
        if found and int(found.group(1)) == epoch:
            sys.stdout.flush()
            sys.stderr.flush()
            wait_for_release(fifo)

    return held_log


def with_command_line(run_stage, argv: list[str]):
    """`run_stage` (which parses the stage's sys.argv), whose `main()` then runs with sys.argv = `argv`."""

    def held_run_stage(main, *args, **kwargs):
        def main_with_argv():
            sys.argv[:] = argv
            return main()

        return run_stage(main_with_argv, *args, **kwargs)

    return held_run_stage


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: held_stage.py STAGE_SCRIPT [ARGS...]  (env: HOLD_AFTER_EPOCH, HOLD_FIFO)")
    stage = str(Path(sys.argv[1]).absolute())
    harness_argv = [str(Path(__file__).absolute()), stage, *sys.argv[2:]]
    if os.environ.get("HOLD_AFTER_EPOCH"):
        import cifar_resnet.stage_door as stage_door  # what the stage imports anyway: the code fingerprint is unchanged

        stage_door.log = holding(stage_door.log, int(os.environ["HOLD_AFTER_EPOCH"]), os.environ["HOLD_FIFO"])
        stage_door.run_stage = with_command_line(stage_door.run_stage, harness_argv)
    sys.argv[:] = [stage, *sys.argv[2:]]
    sys.path[0] = str(Path(stage).parent)  # as for `python stage`: the stage's folder, not tests/
    runpy.run_path(stage, run_name="__main__")


if __name__ == "__main__":
    main()
