"""Device, precision, threads and the allocator: chosen in one place for every stage that trains or evaluates."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

# glibc hands large freed blocks (the activation buffers, re-allocated every step) back to the kernel and then
# page-faults them in again: a quarter to a third of a CPU training step. A high mmap threshold keeps them.
# It must be set before the process starts, hence the re-exec. CIFAR_RESNET_MALLOC=default turns it off.
MALLOC_TUNABLE = "glibc.malloc.mmap_threshold=4294967296"
MALLOC_SWITCH = "CIFAR_RESNET_MALLOC"


def start_stage_process(fast_allocator: bool = True) -> None:
    """First lines of every stage, before any third-party import; re-execs this process at most once.

    - The `python` that DVC found on PATH may lack the project's packages (e.g. `.venv/bin/dvc repro` from a shell
      where .venv is not active): then the .venv of the tree the stage runs in is used, if it has one.
    - With `fast_allocator`, the glibc tunable above is set where the platform has glibc (CIFAR_RESNET_MALLOC=default
      turns it off).
    """
    python = sys.executable
    if not all(importlib.util.find_spec(m) for m in ("torch", "yaml")):
        local = Path.cwd() / ".venv" / "bin" / "python"
        if not local.exists() or Path(python).absolute() == local.absolute():  # a venv python is a symlink
            sys.exit(f"error: {python} lacks the project's packages (torch, pyyaml, ...): run `make repro`, "
                     "or activate the virtual environment made by `make install`")
        python = str(local)
    if fast_allocator and _wants_malloc_tunable():
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        os.environ["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLE}" if tunables else MALLOC_TUNABLE
    if python == sys.executable and os.environ.get("GLIBC_TUNABLES", "") == _STARTED_WITH_TUNABLES:
        return
    if os.environ.get("_CIFAR_RESNET_REEXEC"):
        return  # never loop, even if glibc ignores the tunable
    os.environ["_CIFAR_RESNET_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [python, *sys.orig_argv[1:]])


_STARTED_WITH_TUNABLES = os.environ.get("GLIBC_TUNABLES", "")


def _wants_malloc_tunable() -> bool:
    if os.environ.get(MALLOC_SWITCH, "fast") == "default" or not sys.platform.startswith("linux"):
        return False
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return platform.libc_ver()[0] == "glibc"


def derive_seed(*keys) -> int:
    """A 63-bit seed from any tuple of keys, e.g. (seed, "augment", epoch, rank): no generator state to carry."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Runtime:
    device: "torch.device"  # noqa: F821
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    threads: int

    @property
    def amp_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def memory_format(self):
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        where = cpu_model() if self.device.type == "cpu" else str(self.device)
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device.type} ({where}), {self.precision}, {layout}, {self.threads} threads"


def pick_runtime(train_params, local_rank: int = 0, nproc: int = 1) -> Runtime:
    """Resolve the `auto` settings: device cuda > mps > cpu; precision bf16 on a bf16 CPU, AMP on CUDA, else fp32."""
    import torch

    from cifar_resnet.errors import ParamsError

    name = train_params.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' asked for, but no CUDA device is visible")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ParamsError("train.device: 'mps' asked for, but MPS is not available")
    device = torch.device(name, local_rank) if name == "cuda" else torch.device(name)

    precision = train_params.precision
    if precision == "auto":
        if name == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif name == "cpu" and cpu_has_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "fp16" and name != "cuda":
        raise ParamsError("train.precision: fp16 needs CUDA (use bf16 or fp32 here)")
    channels_last = train_params.channels_last
    if channels_last == "auto":
        channels_last = precision != "fp32" or name == "cuda"

    threads = train_params.threads or max(1, (os.cpu_count() or 1) // nproc)
    if name == "cpu":
        torch.set_num_threads(threads)
    if name == "cuda":
        # Deterministic convolution algorithms cost little here; benchmark mode would pick them by timing.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.cuda.set_device(device)
    return Runtime(device, precision, bool(channels_last), threads)
