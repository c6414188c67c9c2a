"""Helpers shared by test modules (fixtures live in conftest.py): tiny in-memory data sets, the augmentation tests'
constants and images, and a train stage held still at a known epoch."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import torch

from cifar_resnet.config import AugmentParams
from cifar_resnet.data import Cifar10
from conftest import REPO, stage_env

HARNESS = Path(__file__).with_name("held_stage.py")
MALLOC_TUNABLE = "glibc.malloc.mmap_threshold=4294967296"

PAD, CROP, HOLE = 4, 32, 8
SPAN = 32 + 2 * PAD - CROP + 1  # 9 crop offsets per axis
HOLE_SPAN = CROP - HOLE + 1  # 25 hole offsets per axis
MEAN0, STD1 = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # the output is the raw pixel values
# CIFAR-10-like statistics, deliberately non-integer: no normalised pixel of an integer image is exactly 0.
CIFAR_MEAN, CIFAR_STD = (125.307, 122.950, 113.865), (62.993, 62.089, 66.705)


def aug_params(**kw) -> AugmentParams:
    return AugmentParams(**{"pad": PAD, "pad_mode": "reflect", "crop": CROP, "flip_p": 0.5, "cutout": HOLE,
                            "backend": "batched", **kw})


def random_images(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 32, 32) with values 1..255: no zero pixel, so zeros in a raw output are hole or fill."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def ramp_image() -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1 (distinct columns), channel 2 = 200."""
    r = torch.arange(32).view(32, 1).expand(32, 32)
    c = torch.arange(32).view(1, 32).expand(32, 32)
    return torch.stack([r + 1, c + 1, torch.full((32, 32), 200)]).to(torch.uint8)


def tiny_data(n_train: int = 256, n_test: int = 100) -> Cifar10:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=g)
    none = torch.zeros(0, dtype=torch.long)
    return Cifar10(images[:n_train], labels[:n_train], images[:0], none, images[n_train:], labels[n_train:],
                   tuple("abcdefghij"))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Held:
    """The train stage started under tests/held_stage.py: it stops after logging epoch `epoch` (its checkpoint is
    saved by then) and stays there until killed or signalled. Nothing here depends on how fast the CPU is; the
    timeouts only turn a hang into a failure."""

    def __init__(self, ws: Path, cache: Path, epoch: int = 1):
        self.epoch = epoch
        self.fifo = ws.with_name(ws.name + ".hold")  # beside the workspace, not in it
        os.mkfifo(self.fifo)
        # Held open by the test (read-write: never blocks): the stage blocks reading it; closing it releases.
        self.fd = os.open(self.fifo, os.O_RDWR)
        env = stage_env(cache, PYTHONUNBUFFERED="1", HOLD_AFTER_EPOCH=str(epoch), HOLD_FIFO=str(self.fifo),
                        GLIBC_TUNABLES=MALLOC_TUNABLE)  # as the stage would set it: no re-exec
        # Started with SIGINT ignored, as a shell starts a background job (`pytest &`, DVC's queue worker): the
        # stage must stop on SIGINT all the same, and this test must not depend on how it was launched.
        self.proc = subprocess.Popen([sys.executable, str(HARNESS), str(REPO / "stages" / "train.py")], cwd=ws,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=_ignore_sigint)
        self.pid = self.proc.pid
        self.seen = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output for {timeout:.0f} s (hung?); output so far:\n{self.seen}") from None

    def wait_for(self, text: str, timeout: float = 300) -> str:
        """Read the output up to the line holding `text`."""
        while (line := self._next(timeout)) is not None:
            self.seen += line
            if text in line:
                return self.seen
        raise AssertionError(f"never saw {text!r}; output so far:\n{self.seen}")

    def wait_held(self, epochs: int, timeout: float = 300) -> str:
        """Read the output up to the line of the held epoch: from then on the stage waits, its checkpoint saved."""
        return self.wait_for(f"epoch {self.epoch:>2}/{epochs} ", timeout)

    def output(self, timeout: float = 120) -> str:
        """All the output, once every process holding the pipe has ended."""
        while (line := self._next(timeout)) is not None:
            self.seen += line
        self.proc.wait(timeout=timeout)
        return self.seen

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the process group, mid-run, and wait until every process of the tree is gone (torchrun's
        workers, in sessions of their own, die with their parent)."""
        tree = self.tree()
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"

    def close(self) -> None:
        if self.proc.poll() is None:
            tree = self.tree()
            for p in [self.proc, *tree]:
                try:
                    p.kill()
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
            self.proc.wait(timeout=60)
            psutil.wait_procs(tree, timeout=60)
        os.close(self.fd)
        self._reader.join(timeout=60)  # ends at EOF, once no process of the tree holds the pipe
        if not self._reader.is_alive():
            self.proc.stdout.close()
