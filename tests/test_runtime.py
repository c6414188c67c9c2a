"""Device and precision choice against mocked device capabilities, the process checks, and resume agreement
across DDP ranks (rank 0's checkpoint, broadcast)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from dataclasses import replace

import pytest
import torch

import cifar_resnet.runtime as runtime_module
from cifar_resnet.config import parse_params
from cifar_resnet.errors import ParamsError
from cifar_resnet.runtime import pick_runtime
from conftest import tiny_params


def train_params(**kw):
    return replace(parse_params(tiny_params()).train, **{"device": "auto", "precision": "auto", "threads": 1, **kw})


@pytest.fixture
def fake_cuda(monkeypatch):
    """A host with `count` CUDA GPUs whose bf16 is native, emulated or absent; records the order of calls."""
    calls = []

    def install(count=1, bf16="native"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))

        def is_bf16_supported(including_emulation=True):
            calls.append(("bf16_probe", including_emulation))
            return bf16 == "native" or (bf16 == "emulated" and including_emulation)

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
        return calls

    return install


@pytest.mark.parametrize("bf16,expected", [("native", "bf16"), ("emulated", "fp16"), ("none", "fp16")])
def test_auto_precision_on_cuda_takes_bf16_only_where_native(fake_cuda, bf16, expected):
    calls = fake_cuda(count=2, bf16=bf16)
    rt = pick_runtime(train_params(), local_rank=1, nproc=2)
    assert rt.device == torch.device("cuda", 1) and rt.precision == expected and rt.channels_last
    assert calls[0] == ("set_device", "cuda:1")  # the probe talks to this rank's own GPU, after set_device
    assert ("bf16_probe", False) in calls


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(runtime_module, "cpu_has_bf16", lambda: native)
    rt = pick_runtime(train_params())
    assert rt.device.type == "cpu" and rt.precision == expected and rt.channels_last == (expected == "bf16")


def test_auto_precision_on_mps_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    rt = pick_runtime(train_params())
    assert rt.device.type == "mps" and rt.precision == "fp32" and not rt.channels_last


def test_nproc_is_checked_against_the_visible_gpus(fake_cuda):
    fake_cuda(count=1)
    with pytest.raises(ParamsError, match=r"train.nproc: 2 processes on this node need 2 GPUs, but 1 are visible"):
        pick_runtime(train_params(nproc=2), nproc=2)


def test_two_nodes_of_eight_gpus_are_checked_and_share_by_the_processes_of_one_node(fake_cuda, monkeypatch):
    """`torchrun --nnodes=2 --nproc_per_node=8` on nodes of 8 GPUs: 16 processes in the job, 8 on this node. The
    GPUs and cores to share are this node's, among its own processes."""
    from cifar_resnet.distributed import Dist

    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    dist = Dist.from_env()
    assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (11, 16, 3, 8)
    fake_cuda(count=8)
    assert pick_runtime(train_params(device="cuda"), dist.local_rank, dist.local_world_size).device == \
        torch.device("cuda", 3)
    fake_cuda(count=4)
    with pytest.raises(ParamsError, match=r"train.nproc: 8 processes on this node need 8 GPUs, but 4 are visible"):
        pick_runtime(train_params(device="cuda"), dist.local_rank, dist.local_world_size)
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    assert pick_runtime(train_params(device="cpu", threads=0), dist.local_rank, dist.local_world_size).threads == 8


def test_several_cpu_processes_stay_allowed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_runtime(train_params(device="cpu", nproc=2), nproc=2).threads == 1


def test_sync_bn_with_auto_on_a_host_without_cuda_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="train.sync_bn: SyncBatchNorm runs on CUDA GPUs only, and this run is on cpu"):
        pick_runtime(train_params(sync_bn=True))


# ------------------------------------------------------------------------------------------- resume agreement

EPOCHS = 3


def _params():
    return parse_params(tiny_params(train={"epochs": EPOCHS, "batch_size": 64, "device": "cpu", "threads": 1}))


def _data():
    from helpers import tiny_data

    return tiny_data()


class _StopAfterFirstEpoch(Exception):
    pass


def _rank(rank: int, cache: str, port: int, out) -> None:
    """One of two gloo ranks: its own cache folder (as on another node), the same run key."""
    os.environ.update(CIFAR_RESNET_CACHE=cache, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import cifar_resnet.train as train_module
    from cifar_resnet.distributed import Dist

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params, data = _params(), _data()
        mean, std = data.mean_std()
        runtime = pick_runtime(params.train, nproc=2)
        result = train_module.train(params, data, mean, std, 0.05, 0.0005, runtime, Dist(rank, 2, rank),
                                    run_key="agree", log=lambda *_: None)
        # Parameters, not buffers: each rank's last forward updates its own BatchNorm statistics.
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters()))
        out.put((rank, result.resumed_from, digest.hexdigest()))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path, monkeypatch):
    import cifar_resnet.train as train_module

    # A checkpoint after epoch 1, in rank 0's cache only.
    monkeypatch.setenv("CIFAR_RESNET_CACHE", str(tmp_path / "node0"))
    params, data = _params(), _data()
    mean, std = data.mean_std()

    def stop(_history):
        raise _StopAfterFirstEpoch

    with pytest.raises(_StopAfterFirstEpoch):
        train_module.train(params, data, mean, std, 0.05, 0.0005, pick_runtime(params.train), run_key="agree",
                           log=lambda *_: None, on_epoch=stop)
    assert (tmp_path / "node0/checkpoints/agree/checkpoint.pt").is_file()

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / f"node{r}"), port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = sorted(out.get(timeout=10) for _ in procs)
    assert [r[1] for r in results] == [2, 2], "both ranks resume at epoch 2, rank 1 from rank 0's checkpoint"
    assert results[0][2] == results[1][2], "both ranks end with the same parameters"
    assert not (tmp_path / "node1/checkpoints/agree/checkpoint.pt").exists()
