"""Multi-process training through torchrun (torch.distributed.run), and tidy ends for its process tree.

The stage process relaunches itself under torchrun when `train.nproc` > 1. torchrun starts its workers in sessions
of their own, so a plain kill of torchrun would leave them running: every process of the tree therefore asks the
kernel to kill it when its parent dies (PR_SET_PDEATHSIG), and the launcher forwards SIGINT/SIGTERM to torchrun.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1  # processes in the job, on every node
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node: they share its GPUs and CPU cores

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """torchrun's variables; a launcher without LOCAL_WORLD_SIZE runs every process on one node."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        return cls(int(os.environ.get("RANK", 0)), world_size, int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def process_group(dist: Dist, device: str):
    """The torch.distributed group of a multi-process job (NCCL for CUDA, else gloo); nothing for one process."""
    if dist.world_size == 1:
        yield
        return
    die_with_parent()
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: have the kernel send `sig` to this process when its parent exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run the script command line `argv` (script, then its arguments) under torchrun with `nproc` processes on
    this node; return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--redirects=0", *argv]
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
