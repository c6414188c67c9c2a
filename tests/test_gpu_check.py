"""`make gpu-check` on a machine without a GPU: it says so, runs the CPU part, exits 0 and ends with its JSON line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, md5sums_path, write_cifar_folder

KEYS = {"gpu_found", "device", "device_names", "device_count", "precision", "channels_last", "epochs",
        "seconds_per_epoch", "img_per_s", "accuracy", "data", "portability_tests", "bench"}

pytestmark = pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS cannot be hidden from the check")


def run_check(cwd, *args, **env) -> subprocess.CompletedProcess:
    """The check as `make gpu-check` starts it, with CUDA hidden, in `cwd` (which holds a params.yaml)."""
    base = {k: v for k, v in os.environ.items() if k not in ("CIFAR10_MIRROR", "CIFAR10_MD5SUMS")}
    base.update(PYTHONPATH=str(REPO / "src"), NO_ALBUMENTATIONS_UPDATE="1", CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run([sys.executable, "-m", "cifar_resnet.lab.gpu_check", *args], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=600)


def last_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.mark.slow
def test_without_a_gpu_it_says_so_runs_the_cpu_part_and_exits_0(workdir, tmp_path):
    cache = tmp_path / "cache"
    out = run_check(workdir, "--quick", CIFAR_RESNET_CACHE=str(cache))
    result = last_json(out)
    assert "no GPU found" in out.stdout
    assert KEYS <= set(result)
    assert result["gpu_found"] is False and result["device"] == "cpu" and result["device_count"] == 0
    assert result["portability_tests"] == "passed"
    assert result["data"] == "synthetic" and result["accuracy"] is None and result["bench"] is None
    assert result["timing"] == "short" and result["epochs"] == 1 and result["train_images"] == 64
    assert result["lr_max"] == 0.4 and len(result["seconds_per_epoch"]) == 1 and result["img_per_s"] > 0
    assert result["failed"] == []
    assert not cache.exists() or not any(cache.rglob("*.pt")), "no checkpoint is left behind"


@pytest.mark.slow
def test_a_partial_real_copy_is_used_and_repeated_to_the_size_asked(workdir):
    folder = write_cifar_folder(workdir / "data" / "cifar-10-batches-py", per_batch=32)
    for i in range(2, 6):
        (folder / f"data_batch_{i}").unlink()  # a copy small enough to carry: meta, test batch, one train batch
    out = run_check(workdir, "--quick", "--no-portability-tests", CIFAR10_MD5SUMS=str(md5sums_path(folder)))
    result = last_json(out)
    assert result["data"].startswith("real subset 32 ") and "repeated to 64" in result["data"]
    assert result["train_images"] == 64 and result["test_images"] == 32
    assert 0 <= result["accuracy"] <= 1
    assert result["portability_tests"] == "skipped (--no-portability-tests)"


@pytest.mark.slow
def test_a_damaged_copy_fails_with_a_message(workdir):
    folder = write_cifar_folder(workdir / "data" / "cifar-10-batches-py", per_batch=8)
    out = run_check(workdir, "--quick", "--no-portability-tests")  # the official md5s: these files fail them
    assert out.returncode == 1
    assert "md5 mismatch" in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["failed"] == ["timing run"]
    assert folder.is_dir()


def test_help_says_what_it_does(workdir):
    out = run_check(workdir, "--help")
    assert out.returncode == 0 and "GPU" in out.stdout and "--epochs" in out.stdout


@pytest.mark.slow
def test_the_make_target_runs_the_module_without_installing():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "gpu-check", "GPU_CHECK_ARGS=--quick"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "-m cifar_resnet.lab.gpu_check --quick" in out.stdout
    assert "pip" not in out.stdout and "venv" not in out.stdout


def test_the_bench_parts_are_summed_up_and_reference_needs_albumentations(monkeypatch):
    import importlib.util

    from cifar_resnet.lab import bench, gpu_check

    fake = {"step": {"img_per_s": 1000.0, "precision": "bf16"}, "floor": {"floor_img_per_s": 2000.0},
            "reference": {"reference_img_per_s": 100.0}, "matmul": {"matmul_flop_per_s": 1e13}}
    ran = []
    monkeypatch.setattr(bench, "run_part", lambda part, steps, default_allocator: ran.append(part) or fake[part])
    real_find_spec = importlib.util.find_spec
    for albumentations, expected in ((False, None), (True, 100.0)):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, present=albumentations: (
            None if name in ("albumentations", "cv2") and not present else real_find_spec(name, *a)))
        ran.clear()
        notes = []
        out = gpu_check.run_bench(5, notes)
        assert ran == ["step", "floor", "reference", "matmul"] if albumentations else ["step", "floor", "matmul"]
        assert out["reference_img_per_s"] == expected and bool(notes) != albumentations
        assert out["img_per_s"] == 1000.0 and out["conv_fraction"] == 0.5 and out["steps"] == 5
        assert out["peak_fraction"] == round(bench.FLOP_PER_TRAINED_IMAGE * 1000 / 1e13, 3)

    def failing(part, steps, default_allocator):
        if part == "floor":
            raise SystemExit("bench part floor failed:\nCUDA error")
        return fake[part]

    monkeypatch.setattr(bench, "run_part", failing)
    assert gpu_check.run_bench(5, [])["error"] == "bench part floor failed"
