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
import yaml

from conftest import make_workspace, run_stage, stage_env


EPOCHS = 6
PER_BATCH = 192  # 960 training images, 15 steps an epoch
OUTPUTS = ["models/model.pt", "metrics/train.json", "plots/history.tsv", "timing/train.json",
           "models/summary.txt"]


def _train(ws: Path, cache: Path, **kw) -> subprocess.CompletedProcess:
    result = run_stage("train", ws, stage_env(cache, PYTHONUNBUFFERED="1"), **kw)
    return result


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


@pytest.mark.slow
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
    saved = torch.load(ws / "models/model.pt", weights_only=True)
    assert list(saved["model"]["channels"]) == [8, 16, 32, 64] and len(saved["mean"]) == 3 and len(saved["classes"]) == 10


@pytest.mark.slow
def test_checkpoint_removed_after_success(baseline):
    cache = baseline[0].parent / "cache" / "checkpoints"
    assert not cache.exists() or not any(p.joinpath("checkpoint.pt").exists() for p in cache.iterdir())


@pytest.mark.slow
def test_same_seed_gives_byte_identical_metrics(baseline, tmp_path):
    ws = make_workspace(tmp_path / "again", PER_BATCH, train={"epochs": EPOCHS})
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert _metrics(ws) == _metrics(baseline[0])


@pytest.mark.slow
def test_another_seed_differs(baseline, tmp_path):
    ws = make_workspace(tmp_path / "seed1", PER_BATCH, seed=1, train={"epochs": EPOCHS})
    assert _train(ws, tmp_path / "cache").returncode == 0
    assert _metrics(ws)["metrics/train.json"] != _metrics(baseline[0])["metrics/train.json"]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_to_identical_metrics(baseline, tmp_path, held):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    run = held(ws, cache, epoch=EPOCHS - 1)  # late: most of the run's wall time is spent before the kill
    run.wait_held(EPOCHS)
    run.kill()  # the whole process group, held after epoch 5 of 6
    assert not (ws / "metrics/train.json").exists() and not (ws / "models/model.pt").exists()
    assert list((cache / "checkpoints").glob("*/checkpoint.pt")), "the epoch checkpoint survives the kill"
    result = _train(ws, cache)
    assert result.returncode == 0, result.stderr
    assert f"Resuming from epoch {EPOCHS}\n" in result.stdout  # held, then stopped, after epoch 5
    assert _metrics(ws) == _metrics(baseline[0])
    assert not list((cache / "checkpoints").glob("*/checkpoint.pt"))
    # The wall time counts the epochs trained before the kill too (rounding: 0.1 s for the total, 0.01 s an epoch).
    timing = json.loads((ws / "timing/train.json").read_text())
    assert timing["resumed_from_epoch"] == EPOCHS and len(timing["seconds_per_epoch"]) == EPOCHS
    assert timing["seconds_total"] >= sum(timing["seconds_per_epoch"]) - 0.05 - 0.005 * EPOCHS, timing


@pytest.mark.slow
def test_sigint_stops_cleanly_and_resumes(baseline, tmp_path, held):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    run = held(ws, cache)
    run.wait_held(EPOCHS)
    run.proc.send_signal(signal.SIGINT)  # lands inside the train loop, after epoch 1 of 6
    out = run.output()
    assert run.proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out
    assert f"epoch  2/{EPOCHS}" not in out, "interrupted while held after epoch 1"
    assert not (ws / "metrics/train.json").exists()
    assert not list(ws.rglob("*.tmp")), "no half-written file is left behind"
    result = _train(ws, cache)
    assert "Resuming from epoch 2\n" in result.stdout  # held, then stopped, after epoch 1
    assert _metrics(ws) == _metrics(baseline[0])


@pytest.mark.slow
def test_checkpoint_of_other_params_is_not_resumed(tmp_path, held):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS}), tmp_path / "cache"
    run = held(ws, cache)
    run.wait_held(EPOCHS)
    run.kill()
    assert list((cache / "checkpoints").glob("*/checkpoint.pt")), "there is a checkpoint not to resume"
    make_workspace(ws, train={"epochs": EPOCHS, "weight_decay": 0.001})  # same folder, other params
    result = _train(ws, cache)
    assert result.returncode == 0, result.stderr
    assert "Resuming" not in result.stdout
    assert "Starting afresh" in result.stdout and "train.weight_decay" in result.stdout


@pytest.mark.slow
def test_a_second_live_run_of_the_same_config_fails_clearly_and_the_first_finishes(baseline, tmp_path, held):
    """Two workspaces, one config, one cache: the checkpoint folder belongs to the run that holds it."""
    cache = tmp_path / "cache"
    first = held(make_workspace(tmp_path / "first", PER_BATCH, train={"epochs": EPOCHS}), cache)
    first.wait_held(EPOCHS)
    (folder,) = (cache / "checkpoints").iterdir()
    second = make_workspace(tmp_path / "second", PER_BATCH, train={"epochs": EPOCHS})
    result = _train(second, cache)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert (f"error: another live run of the same config holds {folder} (pid {first.pid})"
            in result.stderr), result.stderr
    assert "Resuming" not in result.stdout and not (second / "metrics/train.json").exists()
    assert (folder / "checkpoint.pt").is_file(), "the first run's checkpoint is left alone"
    os.write(first.fd, b"go\n")  # release the first run: it finishes as if alone
    out = first.output()
    assert first.proc.returncode == 0, out
    assert "Resuming" not in out and _metrics(tmp_path / "first") == _metrics(baseline[0])
    assert not folder.exists()


def _age(folder: Path, days: float) -> None:
    then = time.time() - days * 86400
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))


@pytest.mark.slow
def test_a_train_stage_prunes_untouched_checkpoints_but_not_a_live_runs(tmp_path, held):
    cache = tmp_path / "cache"
    live = held(make_workspace(tmp_path / "live", PER_BATCH, train={"epochs": EPOCHS}), cache)
    live.wait_held(EPOCHS)
    (live_folder,) = (cache / "checkpoints").iterdir()
    stale = cache / "checkpoints" / "stale"
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes(b"left by a run killed long ago")
    _age(stale, 8)
    _age(live_folder, 8)  # as old, but a live run holds it
    result = _train(make_workspace(tmp_path / "other", train={"epochs": 2}), cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Removed the checkpoint folder {stale}: not touched for 7 days" in result.stdout
    assert not stale.exists() and (live_folder / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_divergence_fails_with_epoch_step_and_lr(tmp_path):
    ws = make_workspace(tmp_path / "ws", lr_max=1000.0)
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 1
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "epoch " in message and "step " in message and "LR " in message, message
    assert not (ws / "metrics/train.json").exists() and not (ws / "models/model.pt").exists()


@pytest.mark.slow
def test_lr_max_auto_reads_the_range_test_pick(tmp_path):
    ws = make_workspace(tmp_path / "ws", lr_max="auto", train={"epochs": 2})
    (ws / "metrics").mkdir()
    (ws / "metrics/lr_range_test.json").write_text(json.dumps({"lr_max": 0.123, "lr_min": 0.00123}))
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((ws / "metrics/train.json").read_text())
    assert metrics["lr_source"] == "lr_range_test" and metrics["lr_max"] == 0.123
    assert metrics["lr_min"] == pytest.approx(0.00123)


@pytest.mark.slow
def test_lr_max_auto_without_range_test_fails_clearly(tmp_path):
    ws = make_workspace(tmp_path / "ws", lr_max="auto")
    result = _train(ws, tmp_path / "cache")
    assert result.returncode == 1 and "lr_range_test" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_range_test_without_a_pick_writes_its_curve_and_only_auto_fails(tmp_path):
    """A range test without a pick (here: the loss climbs at once) is not a failed stage: its curve, PNG and a
    JSON that says why come out; train fails on it only with lr_max: auto, and trains with a number."""
    ws = make_workspace(tmp_path / "ws", lr_max="auto", lr_range_test={"start_lr": 1e4, "end_lr": 1e6},
                        train={"epochs": 2})
    ranged = run_stage("lr_range_test", ws, stage_env(tmp_path / "cache"))
    assert ranged.returncode == 0, ranged.stderr
    assert "NO LRMAX PICKED" in ranged.stdout + ranged.stderr
    result = json.loads((ws / "metrics/lr_range_test.json").read_text())
    assert result["lr_max"] is None and "in the first tenth of the sweep" in result["no_pick"]
    assert (ws / "plots/lr_range_test.png").stat().st_size > 0 and (ws / "plots/lr_range_test.tsv").is_file()
    failed = _train(ws, tmp_path / "cache")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "lr_max: 'auto' has no LRMAX to take" in failed.stderr and "first tenth" in failed.stderr
    assert not (ws / "metrics/train.json").exists()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump({**params, "lr_max": 0.2}, sort_keys=False))
    trained = _train(ws, tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr
    assert json.loads((ws / "metrics/train.json").read_text())["lr_source"] == "params.yaml"


# ---------------------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_train_with_the_same_steps_and_resume(baseline, tmp_path, held):
    ws, cache = make_workspace(tmp_path / "ws", PER_BATCH, train={"epochs": EPOCHS, "nproc": 2}), tmp_path / "cache"
    run = held(ws, cache)
    run.wait_held(EPOCHS)  # rank 0 held after epoch 1, rank 1 waiting for it at the epoch's barrier
    run.kill()
    assert list((cache / "checkpoints").glob("*/checkpoint.pt")), "the epoch checkpoint survives the kill"
    result = _train(ws, cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from epoch 2\n" in result.stdout and "2 process(es)" in result.stdout
    two = json.loads((ws / "metrics/train.json").read_text())
    one = json.loads((baseline[0] / "metrics/train.json").read_text())
    assert two["steps_per_epoch"] == one["steps_per_epoch"]
    assert len((ws / "plots/history.tsv").read_text().splitlines()) == EPOCHS + 1
    assert two["train_acc"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_the_launcher(tmp_path, sig, held):
    ws = make_workspace(tmp_path / "ws", train={"epochs": 40, "nproc": 2})
    run = held(ws, tmp_path / "cache")
    run.wait_held(40)  # the workers are up and mid-run: rank 0 held after epoch 1, rank 1 at the barrier
    proc, tree = run.proc, run.tree()
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
