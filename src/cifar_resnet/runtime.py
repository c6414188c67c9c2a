"""Device, precision, layout and threads: chosen in one place for every stage that trains or evaluates."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

from cifar_resnet.errors import ParamsError


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    threads: int

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        where = cpu_model() if self.device.type == "cpu" else str(self.device)
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device.type} ({where}), {self.precision}, {layout}, {self.threads} threads"


def pick_runtime(train_params, local_rank: int = 0, nproc: int = 1) -> Runtime:
    """Resolve the `auto` settings: device cuda > mps > cpu; precision bf16 on a bf16 CPU, AMP on CUDA, else fp32."""
    name = _pick_device(train_params.device)
    device = torch.device(name, local_rank) if name == "cuda" else torch.device(name)
    precision = _pick_precision(train_params.precision, name)
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


def _pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' asked for, but no CUDA device is visible")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ParamsError("train.device: 'mps' asked for, but MPS is not available")
    return name


def _pick_precision(precision: str, device: str) -> str:
    if precision == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ParamsError("train.precision: fp16 needs CUDA (use bf16 or fp32 here)")
    return precision
