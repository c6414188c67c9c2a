"""`make gpu-check`: what a person with a GPU runs once, with the torch already on that machine.

No install step, no DVC, no albumentations, no data set needed (PYTHONPATH=src and torch, torchvision, numpy,
pyyaml, tqdm, pytest). Three parts, on CUDA (else Apple's MPS):
1. the device-portability tests (tests/test_device_portability.py with CIFAR_RESNET_TEST_DEVICE set to the device);
2. a timing run of the library's own training loop at full size: params.yaml's recipe (its precision, layout,
   batch size, per-epoch evaluation on the test split, a checkpoint every `train.checkpoint_every` epochs into a
   temporary cache that is deleted afterwards), 24 epochs of 50,000 images. The images are CIFAR-10 when a verified
   copy is found ($CIFAR10_MIRROR, else data/cifar-10-batches-py; a partial copy with batches.meta, test_batch and
   some data_batch_N files will do: its images are repeated to fill the 50,000), else random uint8 images of the
   same shape with random labels (the accuracy is then null). LRMAX is fixed at 0.4: the range test's pick on the
   real data is about 0.43, and this check times the recipe, it does not tune it;
3. the bench's measurements (`python -m cifar_resnet.lab.bench`, part by part: its `reference` part needs
   albumentations and is skipped without it).
With no GPU it says so and runs the CPU part only: the portability tests on the CPU and a short timing (1 epoch of
512 images: seconds); the bench is skipped (`--bench-steps N` runs it). The last line printed is one JSON object.
Exit status: 0 when every part that ran passed, 1 otherwise (a failed portability test included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cifar_resnet.stage_door import log

REPO = Path(__file__).resolve().parents[3]  # src/cifar_resnet/lab/gpu_check.py -> the checkout (tests/ lives there)
PORTABILITY_TESTS = REPO / "tests" / "test_device_portability.py"
LR_MAX = 0.4  # the range test picks ~0.43 on the real data; a check times the recipe, it does not tune it
FULL = {"epochs": 24, "train_images": 50_000, "test_images": 10_000, "bench_steps": 20}
CPU_SHORT = {"epochs": 1, "train_images": 512, "test_images": 512, "bench_steps": 0}
QUICK = {"epochs": 1, "train_images": 64, "test_images": 32, "bench_steps": 0, "batch_size": 64}
RUN_KEY = "gpu-check"
TIMING_KEYS = ("timing", "data", "train_images", "test_images", "epochs", "batch_size", "lr_max",
               "seconds_per_epoch", "seconds_per_epoch_median", "seconds_total", "img_per_s", "accuracy")
NEEDED = ("torch", "torchvision", "numpy", "yaml", "tqdm")
def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        log(f"gpu-check: error: {sys.executable} lacks {', '.join(missing)}: install them (or run with a python "
            "that has them: make gpu-check PYTHON=/path/to/python)")
        return 1
    with tempfile.TemporaryDirectory(prefix="cifar_resnet_gpu_check_") as scratch:
        return _check(args, Path(scratch))


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m cifar_resnet.lab.gpu_check", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, help="timing run epochs (default: 24 on a GPU, 1 on the CPU)")
    parser.add_argument("--train-images", type=int,
                        help="training images per epoch (default: 50,000 on a GPU, 512 on the CPU)")
    parser.add_argument("--test-images", type=int,
                        help="test images evaluated after each epoch (default: 10,000 on a GPU, 512 on the CPU)")
    parser.add_argument("--bench-steps", type=int,
                        help="timed steps per bench measurement, 0 = no bench (default: 20 on a GPU, 0 on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny timing (1 epoch: one batch of 64 images) and no bench: for the tests")
    parser.add_argument("--no-portability-tests", action="store_true",
                        help="skip the portability tests (they are part of `make test` on the CPU anyway)")
    parser.add_argument("--params", default="params.yaml", help="the params file whose recipe is timed")
    args = parser.parse_args(argv)
    for name in ("epochs", "train_images", "test_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.bench_steps is not None and args.bench_steps < 0:
        parser.error("--bench-steps must be 0 or more")
    return args


def _check(args, scratch: Path) -> int:
    import torch

    from cifar_resnet.errors import CifarResnetError
    from cifar_resnet.runtime import accelerator_names, cpu_model

    notes = [(f"lr_max {LR_MAX}: fixed near the range test's pick on the real data (~0.43); this check times the "
              "recipe, it does not tune it")]
    try:
        params = _timing_params(args.params)
        runtime = _runtime(params)
    except CifarResnetError as exc:
        log(f"gpu-check: error: {exc}")
        return 1
    device = runtime.device.type
    gpu_found = device != "cpu"
    plan = dict(QUICK if args.quick else FULL if gpu_found else CPU_SHORT)
    for name in ("epochs", "train_images", "test_images", "bench_steps"):
        if getattr(args, name) is not None:
            plan[name] = getattr(args, name)
    names = accelerator_names(runtime.device) if gpu_found else [cpu_model()]
    if gpu_found:
        log(f"gpu-check: {device} found: {', '.join(names)}; torch {torch.__version__}")
    else:
        log("gpu-check: no GPU found (torch sees no CUDA device and no MPS): running the CPU part only: the "
            f"portability tests on the CPU and a short timing ({plan['epochs']} epoch(s) of {plan['train_images']} "
            "images; the 24-epoch full-size run needs a GPU)"
            + ("; the bench is skipped (--bench-steps N runs it)" if not plan["bench_steps"] else ""))

    failed = []
    portability = _portability_tests(device, args.no_portability_tests)
    if portability == "failed":
        failed.append("portability tests")
    timing = dict.fromkeys(TIMING_KEYS)
    try:
        timing.update(_timing_run(params, runtime, plan, scratch))
    except CifarResnetError as exc:
        log(f"gpu-check: the timing run failed: {exc}")
        timing["timing"] = f"failed: {exc}"
        failed.append("timing run")
    bench = None
    if plan["bench_steps"]:
        bench = run_bench(plan["bench_steps"], notes)
        if "error" in bench:
            failed.append("bench")
    else:
        notes.append("bench skipped" + ("" if gpu_found else " on the CPU (minutes here; --bench-steps N runs it)"))

    result = {
        "gpu_found": gpu_found, "device": device, "device_names": names,
        "device_count": torch.cuda.device_count() if device == "cuda" else int(device == "mps"),
        "torch": torch.__version__, "precision": runtime.precision, "channels_last": runtime.channels_last,
        "portability_tests": portability, **timing, "bench": bench, "failed": failed, "notes": notes,
    }
    if failed:
        log(f"gpu-check: FAILED: {', '.join(failed)}")
    print(json.dumps(result), flush=True)
    return 1 if failed else 0


def _timing_params(path: str):
    """params.yaml's recipe, with what a check must fix: LRMAX, the device left to the runtime (CUDA, then MPS,
    then the CPU), one process, the test split evaluated each epoch."""
    import yaml

    from cifar_resnet.config import parse_params, read_yaml
    from cifar_resnet.errors import ParamsError

    try:
        raw = read_yaml(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root, or pass --params)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys")
    train = {**(raw.get("train") or {}), "device": "auto", "nproc": 1, "sync_bn": False, "eval_split": "test"}
    return parse_params({**raw, "lr_max": LR_MAX, "train": train})


def _runtime(params):
    from cifar_resnet.runtime import pick_runtime

    return pick_runtime(params.train)


# ---------------------------------------------------------------------------------------------- 1. portability


def _portability_tests(device: str, skip: bool) -> str:
    if skip:
        return "skipped (--no-portability-tests)"
    if not PORTABILITY_TESTS.is_file():
        log(f"gpu-check: {PORTABILITY_TESTS} not found (run from a checkout of the repository): tests skipped")
        return "skipped (no tests/ folder)"
    if importlib.util.find_spec("pytest") is None:
        log("gpu-check: pytest is not installed: the portability tests cannot run")
        return "failed"
    log(f"\n== 1. device-portability tests on {device} ==")
    env = dict(os.environ, CIFAR_RESNET_TEST_DEVICE=device, NO_ALBUMENTATIONS_UPDATE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", str(PORTABILITY_TESTS), "-q", "-p", "no:cacheprovider"]
    return "passed" if subprocess.run(cmd, cwd=REPO, env=env).returncode == 0 else "failed"


# ---------------------------------------------------------------------------------------------- 2. timing


def _timing_run(params, runtime, plan: dict, scratch: Path) -> dict:
    from cifar_resnet import checkpoint
    from cifar_resnet import train as train_module
    from cifar_resnet.lab.timing_data import timing_data

    tp = params.train
    batch_size = plan.get("batch_size", tp.batch_size)
    epochs = plan["epochs"]
    # A short run keeps the recipe's shape where it can: the LR peaks at the same fraction of the run.
    peak = max(1, min(epochs - 1, round(tp.peak_epoch * epochs / tp.epochs))) if epochs > 1 else 1
    params = replace(params, train=replace(tp, epochs=epochs, peak_epoch=peak, batch_size=batch_size))
    data, described, real = timing_data(plan["train_images"], plan["test_images"], params.seed)
    full = plan["train_images"] == FULL["train_images"] and epochs == FULL["epochs"]
    log(f"\n== 2. timing: {epochs} epoch(s) of {len(data.train_images)} images ({described}), "
        f"{'full size' if full else 'SHORT, not the full-size run'}; {runtime.describe()} ==")
    mean, std = data.mean_std()
    lr_min = LR_MAX * params.lr_min_factor
    previous = os.environ.get("CIFAR_RESNET_CACHE")
    os.environ["CIFAR_RESNET_CACHE"] = str(scratch / "cache")  # checkpoints as the stage writes them, then gone
    started = time.perf_counter()
    try:
        result = train_module.train(params, data, mean, std, LR_MAX, lr_min, runtime, run_key=RUN_KEY,
                                    log=lambda line: log(f"  {line}"))
    finally:
        checkpoint.remove(RUN_KEY)
        if previous is None:
            os.environ.pop("CIFAR_RESNET_CACHE", None)
        else:
            os.environ["CIFAR_RESNET_CACHE"] = previous
    seconds = result.epoch_seconds
    last = result.history[-1]
    return {
        "timing": "full size" if full else "short",
        "data": described, "train_images": len(data.train_images), "test_images": len(data.test_images),
        "epochs": epochs, "batch_size": batch_size, "lr_max": LR_MAX,
        "seconds_per_epoch": seconds, "seconds_per_epoch_median": round(statistics.median(seconds), 2),
        "seconds_total": round(time.perf_counter() - started, 1),
        "img_per_s": result.images_per_second,  # as timing/train.json: whole epochs (evaluation, checkpoints)
        "accuracy": last.get("test_acc") if real else None,
    }


# ---------------------------------------------------------------------------------------------- 3. bench


def run_bench(steps: int, notes: list[str]) -> dict:
    """The bench's parts, each in its own process as `make bench` runs them; `reference` only with albumentations."""
    from cifar_resnet.lab import bench

    log(f"\n== 3. bench ({steps} timed steps per part) ==")
    parts = ["step", "floor", "reference", "matmul"]
    if not all(importlib.util.find_spec(m) for m in ("albumentations", "cv2")):
        parts.remove("reference")
        notes.append("bench reference part skipped: it needs albumentations (and OpenCV)")
    raw = {}
    for part in parts:
        log(f"  measuring {part} ...")
        try:
            raw.update(bench.run_part(part, steps, default_allocator=part == "reference"))
        except SystemExit as exc:  # the bench's own way of saying that a part failed, with its stderr
            log(str(exc))
            return {"error": f"bench part {part} failed", **raw}
    out = {**bench.summarise(raw), "steps": steps}
    log(f"  {json.dumps(out)}")
    return out


if __name__ == "__main__":
    from cifar_resnet.bootstrap import start_stage_process

    start_stage_process(fast_allocator=True)  # as the train stage starts: the same allocator, the same timings
    sys.exit(main())
