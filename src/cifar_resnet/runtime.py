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
        where = cpu_model() if self.device.type == "cpu" else ", ".join(accelerator_names(self.device)[:1])
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device.type} ({where}), {self.precision}, {layout}, {self.threads} threads"


def pick_runtime(train_params, local_rank: int = 0, nproc: int = 1) -> Runtime:
    """Resolve the `auto` settings: device cuda > mps > cpu; precision bf16 where the device runs it natively, fp16
    with a grad scaler on other CUDA GPUs, fp32 elsewhere. `nproc`: the processes on this node (torchrun's
    LOCAL_WORLD_SIZE, `Dist.local_world_size`), which share its GPUs and cores; on several nodes it is not the
    job's WORLD_SIZE."""
    name = _pick_device(train_params.device)
    check_processes(train_params, name, nproc)
    device = torch.device(name, local_rank) if name == "cuda" else torch.device(name)
    if name == "cuda":
        torch.cuda.set_device(device)  # before any probe: under DDP each rank talks to its own GPU only
        # Deterministic convolution algorithms cost little here; benchmark mode would pick them by timing.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    precision = _pick_precision(train_params.precision, name)
    channels_last = train_params.channels_last
    if channels_last == "auto":
        channels_last = precision != "fp32" or name == "cuda"
    threads = train_params.threads or max(1, (os.cpu_count() or 1) // nproc)
    if name == "cpu":
        torch.set_num_threads(threads)
    return Runtime(device, precision, bool(channels_last), threads)


def check_processes(train_params, device: str, nproc: int) -> None:
    """What params validation cannot know before the device is resolved: one GPU per process of this node (`nproc`),
    SyncBatchNorm on GPUs only. (CPU jobs run several gloo processes on one host.)"""
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ParamsError(f"train.nproc: {nproc} processes on this node need {nproc} GPUs, but "
                          f"{torch.cuda.device_count()} are visible; lower train.nproc (or torchrun's "
                          "--nproc_per_node), or set CUDA_VISIBLE_DEVICES")
    if train_params.sync_bn and device != "cuda":
        raise ParamsError(f"train.sync_bn: SyncBatchNorm runs on CUDA GPUs only, and this run is on {device}; "
                          "set it to false")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def accelerator_names(device: torch.device) -> list[str]:
    """The model of every visible GPU (for timing records); empty on the CPU."""
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if device.type == "mps":
        return [f"Apple MPS ({platform.machine()})"]
    return []


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
        if device == "cuda":  # emulated bf16 (V100, T4, RTX 20xx) has no tensor cores: fp16 there
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return "bf16" if device == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ParamsError("train.precision: fp16 needs CUDA (use bf16 or fp32 here)")
    return precision
