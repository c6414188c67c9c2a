"""`make bench`: the pipeline's training step against a plain PyTorch baseline and against the convolution floor.

Each measurement runs in its own process, because the allocator setting is per process:
- step: `step.train_step`, the function the train stage runs (LR update, forward under autocast, loss, divergence
  watch, gradient scaler, SGD step), fed by the train stage's `TrainLoader` (batched augmentation and
  normalisation), default precision and layout, started the way the stages start (fast allocator).
- reference: a plain PyTorch baseline: fp32, NCHW, per-image albumentations through a DataLoader with
  num_workers=0, the default allocator, same thread count.
- floor: the same network with BatchNorm and ReLU replaced by identity, forward + backward, no optimizer step, in
  the step's precision, layout, batch, threads and allocator.
- matmul: best of 5 timed 4096x4096 matmuls in the step's precision (the machine's practical peak).
img/s is the median over `--steps` steps after 3 warm-up steps. The last line printed is one JSON object.
`--profile` prints instead where the pipeline's step spends its time (torch.profiler, by operator).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLOP_PER_TRAINED_IMAGE = 2.27e9  # forward 0.76 GFLOP, backward about twice that
WARMUP = 3


def _timed(step, steps: int, batch: int, sync) -> float:
    times = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        step()
        sync()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def _setup(precision_override: str | None = None):
    from cifar_resnet.config import load_params
    from cifar_resnet.runtime import pick_runtime, synchronize

    params = load_params()
    train_params = params.train
    if precision_override:
        from dataclasses import replace

        train_params = replace(train_params, precision=precision_override, channels_last=False)
    runtime = pick_runtime(train_params)
    return params, runtime, lambda: synchronize(runtime.device)


def _pipeline_step(steps: int):
    """The train stage's own step on random data (timing does not depend on the pixels)."""
    from types import SimpleNamespace

    import torch

    from cifar_resnet.step import DivergenceWatch, setup_run, train_step

    params, runtime, sync = _setup()
    n = params.train.batch_size * (WARMUP + steps)
    data = SimpleNamespace(train_images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8),
                           train_labels=torch.randint(0, 10, (n,)))
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    run = setup_run(params, data, mean, std, runtime)  # the train stage's own set-up
    run.model.train()
    watch = DivergenceWatch(runtime.device, max_loss=params.train.max_loss, lr_of=lambda _step: 0.1,
                            steps_per_epoch=len(run.loader))
    batches = enumerate(run.loader.epoch(1))

    def step():
        i, (x, y) = next(batches)
        train_step(run.model, run.optimizer, run.scaler, runtime, x, y, lr=0.1, watch=watch, step=i)

    return step, params, runtime, sync


def measure_step(steps: int) -> dict:
    step, params, runtime, sync = _pipeline_step(steps)
    return {"img_per_s": _timed(step, steps, params.train.batch_size, sync), "precision": runtime.precision,
            "channels_last": runtime.channels_last, "threads": runtime.threads, "device": runtime.device.type}


def profile_step(steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step, _, runtime, sync = _pipeline_step(steps)
    for _ in range(WARMUP):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    # On an accelerator the device time is what counts; the host's is mostly launching kernels.
    sort_by = "self_cpu_time_total" if runtime.device.type == "cpu" else "self_device_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=20)


def measure_floor(steps: int) -> dict:
    import torch
    from torch import nn

    from cifar_resnet.model import build_model

    params, runtime, sync = _setup()
    bs = params.train.batch_size
    model = build_model(params.model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (nn.BatchNorm2d, nn.ReLU)):
                setattr(module, child_name, nn.Identity())
    model = model.to(runtime.device, memory_format=runtime.memory_format).train()
    x = torch.randn(bs, 3, 32, 32, device=runtime.device).contiguous(memory_format=runtime.memory_format)

    def step():
        with runtime.autocast():
            out = model(x)
        out.float().sum().backward()

    return {"floor_img_per_s": _timed(step, steps, bs, sync)}


def measure_reference(steps: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from cifar_resnet.augment import albumentations_pipeline
    from cifar_resnet.model import build_model
    from cifar_resnet.step import make_optimizer

    params, runtime, sync = _setup(precision_override="fp32")
    bs = params.train.batch_size
    n = bs * (WARMUP + steps)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    pipeline = albumentations_pipeline(params.augment, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7), seed=0)

    class PerImage(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.from_numpy(pipeline(image=images[i])["image"]).permute(2, 0, 1), int(labels[i])

    batches = iter(DataLoader(PerImage(), batch_size=bs, shuffle=True, num_workers=0, drop_last=True))
    model = build_model(params.model).to(runtime.device).train()
    optimizer = make_optimizer(model, params.train)

    def step():
        x, y = next(batches)
        x, y = x.to(runtime.device), y.to(runtime.device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"reference_img_per_s": _timed(step, steps, bs, sync)}


def measure_matmul(_steps: int) -> dict:
    import torch

    _, runtime, sync = _setup()
    dtype = runtime.amp_dtype or torch.float32
    a = torch.randn(4096, 4096, device=runtime.device, dtype=dtype)
    b = torch.randn(4096, 4096, device=runtime.device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return {"matmul_flop_per_s": 2 * 4096**3 / best}


PARTS = {"step": measure_step, "floor": measure_floor, "reference": measure_reference, "matmul": measure_matmul}


def run_part(part: str, steps: int, default_allocator: bool) -> dict:
    env = dict(os.environ)
    env.pop("_CIFAR_RESNET_REEXEC", None)
    if default_allocator:
        env["CIFAR_RESNET_MALLOC"] = "default"
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and "mmap_threshold" not in t]
        if tunables:
            env["GLIBC_TUNABLES"] = ":".join(tunables)
        else:
            env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-m", "cifar_resnet.lab.bench", "--part", part, "--steps", str(steps)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench part {part} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(raw: dict) -> dict:
    """The parts' raw numbers as the bench reports them: img/s, the fractions of the floor and of the machine's
    peak, and the speedup over the reference (None without a reference measurement)."""
    step = raw["img_per_s"]
    reference = raw.get("reference_img_per_s")
    return {"img_per_s": round(step, 1), "reference_img_per_s": None if reference is None else round(reference, 1),
            "floor_img_per_s": round(raw["floor_img_per_s"], 1),
            "speedup": None if reference is None else round(step / reference, 2),
            "conv_fraction": round(step / raw["floor_img_per_s"], 3),
            "peak_fraction": round(FLOP_PER_TRAINED_IMAGE * step / raw["matmul_flop_per_s"], 3),
            "matmul_tflop_per_s": round(raw["matmul_flop_per_s"] / 1e12, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="print where the step's time goes, by operator")
    args = parser.parse_args()
    if args.profile:
        from cifar_resnet.bootstrap import start_stage_process

        start_stage_process(fast_allocator=True)
        print(profile_step(args.steps))
        return
    if args.part:
        if args.part != "reference":
            from cifar_resnet.bootstrap import start_stage_process

            start_stage_process(fast_allocator=True)
        print(json.dumps(PARTS[args.part](args.steps)))
        return

    from cifar_resnet.runtime import cpu_model

    result = {}
    for part in ("step", "floor", "reference", "matmul"):
        print(f"measuring {part} ...", file=sys.stderr, flush=True)
        result.update(run_part(part, args.steps, default_allocator=part == "reference"))
        print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
    summary = {
        **summarise(result),
        "precision": result["precision"], "channels_last": result["channels_last"], "threads": result["threads"],
        "device": result["device"], "cpu": cpu_model(),
        "allocator": "default" if os.environ.get("CIFAR_RESNET_MALLOC") == "default" else "glibc mmap_threshold=4G",
        "steps": args.steps,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
