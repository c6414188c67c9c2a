"""A full disk (or a quota, or a file-size limit) while a stage writes: one line naming the path, no traceback, no
half-written output, and the previous checkpoint still usable. Simulated with RLIMIT_FSIZE (the kernel's EFBIG, as a
real write meets it) and with injected ENOSPC; permissions prove nothing where tests run as root."""

from __future__ import annotations

import builtins
import errno
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_workspace, stage_env
from cifar_resnet import atomic, checkpoint
from cifar_resnet.errors import OutputError


def _no_room(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullDisk:
    """A file open for writing on a disk that has no room left."""

    def __init__(self, f):
        self.f = f

    def write(self, _data):
        _no_room()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _file_on_a_full_disk(path, mode="r", *args, **kwargs):
    return _FullDisk(builtins.open(path, mode, *args, **kwargs))


def test_a_full_disk_leaves_the_previous_output_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics" / "train.json"
    atomic.write_json(path, {"accuracy": 0.9})
    monkeypatch.setattr(Path, "write_text", _no_room)
    with pytest.raises(OutputError) as info:
        atomic.write_json(path, {"accuracy": 0.1})
    assert str(info.value).startswith(f"{path}: cannot be written (No space left on device)")
    assert json.loads(path.read_bytes()) == {"accuracy": 0.9}
    assert [p.name for p in path.parent.iterdir()] == ["train.json"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as info:
        atomic.write_text(tmp_path / "x.txt", "x")
    assert not isinstance(info.value, OutputError) and info.value.errno == errno.EIO


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path))
    checkpoint.save("k", {"epoch": 1, "w": torch.ones(3)})
    monkeypatch.setattr(atomic, "open", _file_on_a_full_disk, raising=False)  # what atomic.write_torch opens
    with pytest.raises(OutputError, match=r"checkpoint\.pt: cannot be written \(No space left on device\)"):
        checkpoint.save("k", {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path))
    state = checkpoint.load("k")
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "k").iterdir()) == ["checkpoint.pt"]


def _size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize(("params", "limit", "named"), [
    ({}, 200_000, "checkpoint.pt"),  # the first checkpoint (weights + momentum) is the first large write
    ({"checkpoint_every": 100}, 120_000, "models/model.pt"),  # no checkpoint: the weights are the first
])
def test_the_train_stage_out_of_room_fails_in_one_line_naming_the_path(tmp_path, params, limit, named):
    ws = make_workspace(tmp_path / "ws", per_batch=96, train={"epochs": 2, **params})
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=ws, env=stage_env(cache),
                            capture_output=True, text=True, timeout=300, preexec_fn=_size_limit(limit))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and named in errors[0] and "File too large" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (ws / "models" / "model.pt").exists() and not (ws / "metrics" / "train.json").exists()
    leftovers = [p for root in (ws, cache) if root.exists() for p in root.rglob("*.tmp")]
    assert leftovers == []
