"""The train stage as a user runs it: outputs, determinism, resume after a kill, divergence, multi-process."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, make_workspace, run_stage, stage_env

EPOCHS = 6
PER_BATCH = 192  # 960 training images, 15 steps an epoch: long enough to signal a run mid-way
OUTPUTS = ["models/model.pt", "metrics/train.json", "plots/history.tsv", "timing/train.json",
           "models/summary.txt"]


def _train(ws: Path, cache: Path, **kw) -> subprocess.CompletedProcess:
    result = run_stage("train", ws, stage_env(cache, PYTHONUNBUFFERED="1"), **kw)
    return result


def _start(ws: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "stages" / "train.py")], cwd=ws,
                            env=stage_env(cache, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"never saw {text!r}; output so far:\n{seen}")


def _metrics(ws: Path) -> dict[str, bytes]:
    return {p: (ws / p).read_bytes() for p in ("metrics/train.json", "plots/history.tsv", "models/summary.txt")}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run of the tiny configuration: the reference every other run is compared with."""
    root = tmp_path_factory.mktemp("baseline")
    ws = make_workspace(root / "ws", PER_BATCH, train={"epochs": EPOCHS})
    result = _train(ws, root / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    return ws, result


def test_train_writes_every_output_and_learns(baseline):
    ws, result = baseline
    for path in OUTPUTS:
        assert (ws / path).is_file(), path
    metrics = json.loads((ws / "metrics/train.json").read_text())
    assert metrics["lr_max"] == 0.2 and metrics["lr_min"] == pytest.approx(0.2 * 0.01)
    assert metrics["lr_source"] == "params.yaml" and metrics["epochs"] == EPOCHS
    assert metrics["steps_per_epoch"] == (5 * PER_BATCH) // 64
    history = (ws / "plots/history.tsv").read_text().splitlines()
    assert history[0].split("\t") == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
    assert len(history) == EPOCHS + 1
    assert metrics["train_acc"] > 0.5  # the synthetic classes are easy: the loop really trains
    assert "Total params:" in (ws / "models/summary.txt").read_text()
    # One plain line per epoch when the output is not a terminal.
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == EPOCHS
    timing = json.loads((ws / "timing/train.json").read_text())
    assert timing["device"] == "cpu" and len(timing["seconds_per_epoch"]) == EPOCHS
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":  # the stage sets the allocator itself
        assert "glibc.malloc.mmap_threshold=4294967296" in timing["glibc_tunables"]
    saved = torch.load(ws / "models/model.pt", weights_only=False)
    assert list(saved["model"]["channels"]) == [8, 16, 32, 64] and len(saved["mean"]) == 3 and len(saved["classes"]) == 10


def test_checkpoint_removed_after_success(baseline):
    cache = baseline[0].parent / "cache" / "checkpoints"
    assert not cache.exists() or not any(p.joinpath("checkpoint.pt").exists() for p in cache.iterdir())


def test_same_seed_gives_byte_identical_metrics(baseline, tmp_path):
    ws = make_workspace(tmp_path / "again", PER_BATCH, train={"epochs": EPOCHS})
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert _metrics(ws) == _metrics(baseline[0])


def test_another_seed_differs(baseline, tmp_path):
    ws = make_workspace(tmp_path / "seed1", PER_BATCH, seed=1, train={"epochs": EPOCHS})
    assert _train(ws, tmp_path / "cache").returncode == 0
    assert _metrics(ws)["metrics/train.json"] != _metrics(baseline[0])["metrics/train.json"]


def test_sigkill_then_rerun_resumes_to_identical_metrics(baseline, tmp_path):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    proc = _start(ws, cache)
    _wait_for(proc, f"epoch  1/{EPOCHS}")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, mid-run
    proc.wait()
    assert not (ws / "metrics/train.json").exists() and not (ws / "models/model.pt").exists()
    assert list((cache / "checkpoints").glob("*/checkpoint.pt")), "the epoch checkpoint survives the kill"
    result = _train(ws, cache)
    assert result.returncode == 0, result.stderr
    assert "Resuming from epoch " in result.stdout
    assert _metrics(ws) == _metrics(baseline[0])
    assert not list((cache / "checkpoints").glob("*/checkpoint.pt"))


def test_sigint_stops_cleanly_and_resumes(baseline, tmp_path):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    proc = _start(ws, cache)
    _wait_for(proc, f"epoch  1/{EPOCHS}")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    assert not (ws / "metrics/train.json").exists()
    assert not list(ws.rglob("*.tmp")), "no half-written file is left behind"
    result = _train(ws, cache)
    assert "Resuming from epoch " in result.stdout
    assert _metrics(ws) == _metrics(baseline[0])


def test_checkpoint_of_other_params_is_not_resumed(tmp_path):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    proc = _start(ws, cache)
    _wait_for(proc, f"epoch  1/{EPOCHS}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    make_workspace(ws, train={"epochs": EPOCHS, "weight_decay": 0.001})  # same folder, other params
    result = _train(ws, cache)
    assert result.returncode == 0, result.stderr
    assert "Resuming" not in result.stdout
    assert "Starting afresh" in result.stdout and "train.weight_decay" in result.stdout


def test_divergence_fails_with_epoch_step_and_lr(tmp_path):
    ws = make_workspace(tmp_path / "ws", lr_max=1000.0)
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 1
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "epoch " in message and "step " in message and "LR " in message, message
    assert not (ws / "metrics/train.json").exists() and not (ws / "models/model.pt").exists()


def test_lr_max_auto_reads_the_range_test_pick(tmp_path):
    ws = make_workspace(tmp_path / "ws", lr_max="auto", train={"epochs": 2})
    (ws / "metrics").mkdir()
    (ws / "metrics/lr_range_test.json").write_text(json.dumps({"lr_max": 0.123, "lr_min": 0.00123}))
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((ws / "metrics/train.json").read_text())
    assert metrics["lr_source"] == "lr_range_test" and metrics["lr_max"] == 0.123
    assert metrics["lr_min"] == pytest.approx(0.00123)


def test_lr_max_auto_without_range_test_fails_clearly(tmp_path):
    ws = make_workspace(tmp_path / "ws", lr_max="auto")
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 1 and "lr_range_test" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- two processes


def test_two_processes_train_with_the_same_steps_and_resume(baseline, tmp_path):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS, "nproc": 2}), tmp_path / "cache"
    proc = _start(ws, cache)
    _wait_for(proc, f"epoch  1/{EPOCHS}", timeout=180)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = _train(ws, cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from epoch " in result.stdout and "2 process(es)" in result.stdout
    two = json.loads((ws / "metrics/train.json").read_text())
    one = json.loads((baseline[0] / "metrics/train.json").read_text())
    assert two["steps_per_epoch"] == one["steps_per_epoch"]
    assert len((ws / "plots/history.tsv").read_text().splitlines()) == EPOCHS + 1
    assert two["train_acc"] > 0.5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_the_launcher(tmp_path, sig):
    ws = make_workspace(tmp_path / "ws", train={"epochs": 40, "nproc": 2})
    proc = _start(ws, tmp_path / "cache")
    _wait_for(proc, "epoch  1/40", timeout=180)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len([p for p in tree if "train.py" in " ".join(p.cmdline())]) >= 2, "torchrun started its workers"
    os.kill(proc.pid, sig)  # the launcher alone, not its group
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


def test_sync_batchnorm_conversion_on_cpu():
    from cifar_resnet.model import ResNet9

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ResNet9((8, 16, 32, 64)))
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("SyncBatchNorm") == 8 and "BatchNorm2d" not in kinds
