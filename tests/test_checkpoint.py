"""The checkpoint folder: one live holder, atomic and durable files, identity, pruning."""

from __future__ import annotations

import os

import pytest

from cifar_resnet import checkpoint
from cifar_resnet.errors import CifarResnetError


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
