"""Torch-free process start-up for the stage scripts: the right interpreter and the allocator, before any import.

Nothing here imports a third-party package: it runs as the first lines of every stage, possibly on a `python`
that lacks them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

# glibc hands large freed blocks (the activation buffers, re-allocated every step) back to the kernel and then
# page-faults them in again: a quarter to a third of a CPU training step. A high mmap threshold keeps them.
# It must be set before the process starts, hence the re-exec. CIFAR_RESNET_MALLOC=default turns it off.
MALLOC_TUNABLE = "glibc.malloc.mmap_threshold=4294967296"
MALLOC_SWITCH = "CIFAR_RESNET_MALLOC"
_REEXEC_MARK = "_CIFAR_RESNET_REEXEC"
_STARTED_WITH_TUNABLES = os.environ.get("GLIBC_TUNABLES", "")
_IMPORTED_AT = time.perf_counter()


def seconds_since_start() -> float:
    """Seconds since this process started. On Linux from the kernel's record of the process (10 ms ticks): the
    interpreter's start-up counts, and so does the time before `start_stage_process` re-executed it (the same
    process). Elsewhere from the first import of this module in the current executable."""
    try:
        # Field 22 of /proc/self/stat, counted after the command name (which may hold spaces and parentheses).
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


def start_stage_process(fast_allocator: bool = True) -> None:
    """First lines of every stage, before any third-party import; re-execs this process at most once.

    - The `python` that DVC found on PATH may lack the project's packages (e.g. `.venv/bin/dvc repro` from a shell
      where .venv is not active): then the .venv of the tree the stage runs in is used, if it has one.
    - With `fast_allocator`, the glibc tunable above is set where the platform has glibc (CIFAR_RESNET_MALLOC=default
      turns it off).
    """
    python = _python_with_packages()
    if fast_allocator and _wants_malloc_tunable():
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        os.environ["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLE}" if tunables else MALLOC_TUNABLE
    if python == sys.executable and os.environ.get("GLIBC_TUNABLES", "") == _STARTED_WITH_TUNABLES:
        return
    if os.environ.get(_REEXEC_MARK):
        return  # never loop, even if glibc ignores the tunable
    os.environ[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [python, *sys.orig_argv[1:]])


def _python_with_packages() -> str:
    """This interpreter if it has torch and pyyaml, else the .venv of the current tree, else exit saying what to do."""
    python = sys.executable
    if all(importlib.util.find_spec(m) for m in ("torch", "yaml")):
        return python
    local = Path.cwd() / ".venv" / "bin" / "python"
    if not local.exists() or Path(python).absolute() == local.absolute():  # a venv python is a symlink
        sys.exit(f"error: {python} lacks the project's packages (torch, pyyaml, ...): run `make repro`, "
                 "or activate the virtual environment made by `make install`")
    return str(local)


def _wants_malloc_tunable() -> bool:
    if os.environ.get(MALLOC_SWITCH, "fast") == "default" or not sys.platform.startswith("linux"):
        return False
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return platform.libc_ver()[0] == "glibc"
