"""The stages' common door: user errors become one clear line and exit code 1, without a traceback."""

from __future__ import annotations

import signal
import sys

from cifar_resnet.errors import CifarResnetError


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_stage(main) -> None:
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a polite kill unwinds like Ctrl-C: temp files are removed
    try:
        main()
    except CifarResnetError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no final outputs were written; run the stage again to resume", file=sys.stderr)
        sys.exit(130)


def log(message: str) -> None:
    print(message, flush=True)
