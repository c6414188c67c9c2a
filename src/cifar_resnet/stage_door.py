"""The stage scripts' common door: `--help`, user errors as one line without a traceback, interrupts."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from cifar_resnet.errors import NO_ROOM, CifarResnetError


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_stage(main, description: str) -> None:
    """Run a stage's `main()`: `--help` prints `description` and exits 0 without running anything."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every knob is read from params.yaml; run the stage through `dvc repro`.")
    parser.parse_args()
    # SIGINT (Ctrl-C, `dvc queue kill`) and a polite kill unwind alike, removing temp files, however the stage was
    # started: a shell starts a background job (`cmd &`) with SIGINT ignored, and Python keeps that unless told.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    code = run_command(main, "no final outputs were written; run the stage again to resume")
    if code:
        sys.exit(code)


def run_command(work, interrupted: str) -> int:
    """Run `work()`; a user error prints one `error:` line (exit code 1), Ctrl-C prints `interrupted: ...` (130)."""
    try:
        work()
    except CifarResnetError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:  # out of room where no atomic write caught it (a library's own files)
        if exc.errno not in NO_ROOM:
            raise
        print(f"error: {exc.filename or 'an output'}: cannot be written ({os.strerror(exc.errno)}); free some "
              "space and run again", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


def log(message: str) -> None:
    """A progress line on stdout (DVC shows it; under nohup it is the run's record)."""
    print(message, flush=True)


def silent(_message: str) -> None:
    """The logger of a process that is not rank 0: one process speaks for the job."""


def rank_log(is_main: bool):
    """The logger of this process: `log` for the one that speaks for the job (rank 0), `silent` for the others."""
    return log if is_main else silent
