"""The checkpoint folder: one live holder, atomic and durable files, identity, pruning."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_params
from helpers import tiny_data

from cifar_resnet import checkpoint
from cifar_resnet.config import parse_params
from cifar_resnet.errors import CifarResnetError
from cifar_resnet.runtime import Runtime, pick_runtime
from cifar_resnet.train import train


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path))
    return tmp_path


def test_a_held_folder_is_refused_and_freed_when_its_holder_removes_it(cache):
    with checkpoint.claimed("k", {"config": {}}, log=print):
        with pytest.raises(CifarResnetError, match=f"holds {cache / 'checkpoints' / 'k'} \\(pid {os.getpid()}\\)"):
            with checkpoint.claimed("k", {"config": {}}, log=print):
                pass
        checkpoint.remove("k")  # while held, as the stage does: the lock goes with the folder
        with checkpoint.claimed("k", {"config": {}}, log=print):  # a new folder, a new lock
            assert (cache / "checkpoints" / "k" / "identity.json").is_file()
    with checkpoint.claimed("k", {"config": {}}, log=print):  # released on exit
        pass


def _identity(device: str = "cpu", precision: str = "bf16", processes: int = 1) -> tuple[str, dict]:
    runtime = Runtime(torch.device(device), precision, channels_last=False, threads=1)  # as pick_runtime resolves
    return checkpoint.run_identity(parse_params(tiny_params()), 0.2, 0.002, runtime, processes, {})


def test_a_checkpoint_of_another_device_precision_or_process_count_is_not_resumed_and_the_stage_says_why(
        tmp_path, monkeypatch):
    """A CPU bf16 checkpoint has no grad-scaler state: resumed where fp16 runs, loading it would fail; resumed on
    another device or process count, the run would quietly continue another run's numbers."""
    monkeypatch.chdir(tmp_path)
    key, identity = _identity()
    with checkpoint.claimed(key, identity, log=print):
        checkpoint.save(key, {"epoch": 1})
    for other, changed in ((_identity("cuda", "fp16"), "runtime.device, runtime.precision"),
                           (_identity("mps", "bf16"), "runtime.device"),
                           (_identity("cpu", "fp32"), "runtime.precision"),
                           (_identity(processes=2), "runtime.processes")):
        assert other[0] != key and not checkpoint.exists(other[0])
        said = []
        with checkpoint.claimed(*other, log=said.append):
            checkpoint.remove(other[0])
        assert said == [f"Starting afresh: the checkpoint left here was made under other {changed}"]
    assert _identity()[0] == key and checkpoint.exists(key)


def test_a_checkpoint_reaches_the_disk_before_its_name_and_its_name_after(cache, monkeypatch):
    """fsync of the file before the rename, of the folder after: a power cut leaves the old checkpoint or the new
    one, never an empty file under the final name."""
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.fstat(fd).st_ino))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    checkpoint.save("k", {"epoch": 1})
    inode = (cache / "checkpoints" / "k" / checkpoint.FILE).stat().st_ino
    assert events == [("fsync", inode), ("replace", inode), ("fsync", "folder")]


def _folder_aged(cache, key: str, days: float) -> Path:
    """A checkpoint folder whose files were last touched `days` ago."""
    folder = cache / "checkpoints" / key
    folder.mkdir(parents=True)
    (folder / checkpoint.FILE).write_bytes(b"x")
    then = time.time() - days * 86400
    for path in (folder / checkpoint.FILE, folder):
        os.utime(path, (then, then))
    return folder


def test_folders_untouched_for_a_week_are_pruned_unless_a_live_run_holds_them(cache, monkeypatch):
    monkeypatch.delenv(checkpoint.DAYS_VARIABLE, raising=False)
    old, recent, held = _folder_aged(cache, "old", 8), _folder_aged(cache, "recent", 6), _folder_aged(cache, "held", 8)
    said = []
    with checkpoint.claimed("held", {"config": {}}, log=print):
        os.utime(held, (time.time() - 8 * 86400,) * 2)  # as old as the others, but held
        checkpoint.prune(log=said.append)
        assert held.is_dir()
    assert not old.exists() and recent.is_dir()
    assert said == [f"Removed the checkpoint folder {old}: not touched for 7 days"]
    monkeypatch.setenv(checkpoint.DAYS_VARIABLE, "5.5")
    checkpoint.prune(log=said.append)
    assert not recent.exists()


@pytest.mark.parametrize("value", ["week", "0", "-1", "nan"])
def test_a_bad_age_for_pruning_fails_naming_the_variable(cache, monkeypatch, value):
    monkeypatch.setenv(checkpoint.DAYS_VARIABLE, value)
    with pytest.raises(CifarResnetError, match=f"CIFAR_RESNET_CHECKPOINT_DAYS: {value!r} is not"):
        checkpoint.prune(log=print)


class _Stop(Exception):
    pass


def _stop_after_first(history):
    if len(history) == 1:
        raise _Stop


def test_a_resumed_run_counts_the_wall_time_of_the_process_before_the_kill(cache):
    """The checkpoint carries the wall time spent so far; the resumed run starts its count from there, so the run's
    total covers every epoch it trained (the study and the ablation record it as train_seconds)."""
    params = parse_params(tiny_params(train={"epochs": 3, "batch_size": 32}))
    data = tiny_data(96, 20)
    mean, std = data.mean_std()

    def run(**kw):
        return train(params, data, mean, std, 0.05, 0.0005, pick_runtime(params.train), run_key="k",
                     log=lambda *_: None, **kw)

    with pytest.raises(_Stop):
        run(on_epoch=_stop_after_first)
    first = checkpoint.load("k")
    assert first["seconds"] >= first["epoch_seconds"][0] - 0.005  # epoch seconds are rounded to 0.01 s
    resumed = run()
    assert resumed.resumed_from == 2 and resumed.seconds_before == first["seconds"]
    assert len(resumed.epoch_seconds) == 3 and resumed.epoch_seconds[0] == first["epoch_seconds"][0]
