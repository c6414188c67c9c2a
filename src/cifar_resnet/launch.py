"""Multi-process training through torchrun (torch.distributed.run), and tidy ends for its process tree.

The stage process relaunches itself under torchrun when `train.nproc` > 1. torchrun starts its workers in sessions
of their own, so a plain kill of torchrun would leave them running: every process of the tree therefore asks the
kernel to kill it when its parent dies (PR_SET_PDEATHSIG), and the launcher forwards SIGINT/SIGTERM to torchrun.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send `sig` to this process when its parent exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass


def relaunch_under_torchrun(nproc: int, script: str, extra_args: list[str] | None = None) -> int:
    """Run `script` under torchrun with `nproc` processes on this node; return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--redirects=0", script, *(extra_args or [])]
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
