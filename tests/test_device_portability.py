"""Training and evaluation that run on any device, proven on the CPU (`make gpu-check` runs this file on CUDA or MPS
by setting CIFAR_RESNET_TEST_DEVICE).

A tiny training run and an evaluation run under a TorchDispatchMode that records
- every float64 tensor made (MPS has no float64),
- every host sync (`aten::_local_scalar_dense`: `.item()`, `bool(tensor)`, printing) inside the training step,
while the default device is `meta`, so that a tensor factory called without the runtime's device makes a meta
tensor and the run fails the moment it meets a real one.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import cifar_resnet.step
import cifar_resnet.train
from cifar_resnet.config import parse_params
from cifar_resnet.evaluate import evaluate
from cifar_resnet.loader import EvalLoader
from cifar_resnet.runtime import pick_runtime
from conftest import tiny_params
from helpers import tiny_data

DEVICE = os.environ.get("CIFAR_RESNET_TEST_DEVICE", "cpu")
PRECISIONS = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "bf16", "fp16"], "mps": ["fp32"]}[DEVICE]
SYNC = torch.ops.aten._local_scalar_dense.default


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.float64, self.syncs_in_step, self.in_step, self.steps = [], 0, False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is SYNC and self.in_step:
            self.syncs_in_step += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.float64.append(str(func))
        return out


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    step = cifar_resnet.train.train_step

    def watched_step(*args, **kwargs):
        rec.in_step, rec.steps = True, rec.steps + 1
        try:
            return step(*args, **kwargs)
        finally:
            rec.in_step = False

    monkeypatch.setattr(cifar_resnet.train, "train_step", watched_step)
    # As on an accelerator: the divergence watch is read at the end of each epoch, never inside a step.
    monkeypatch.setattr(cifar_resnet.step, "sync_every", lambda device: 10**9)
    return rec


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_and_evaluation_are_device_portable(recorder, precision):
    params = parse_params(tiny_params(train={"epochs": 2, "batch_size": 64, "device": DEVICE, "threads": 1,
                                             "precision": precision}))
    runtime = pick_runtime(params.train)
    data = tiny_data()
    mean, std = data.mean_std()
    torch.set_default_device("meta")
    try:
        with recorder:
            result = cifar_resnet.train.train(params, data, mean, std, 0.05, 0.0005, runtime, log=lambda *_: None)
            loader = EvalLoader(data.test_images, data.test_labels, 32, mean, std, runtime.device,
                                memory_format=runtime.memory_format)
            loss, acc, probs = evaluate(result.model, loader, runtime)
    finally:
        torch.set_default_device(None)
    assert recorder.steps == 2 * (256 // 64)
    assert recorder.float64 == [], f"float64 tensors made by: {sorted(set(recorder.float64))}"
    assert recorder.syncs_in_step == 0, f"{recorder.syncs_in_step} host syncs inside the training step"
    assert len(result.history) == 2 and all(k in result.history[-1] for k in ("train_loss", "test_acc"))
    assert probs.device.type == runtime.device.type and probs.shape == (100, 10) and 0 <= acc <= 1 and loss > 0


def test_the_recorder_catches_what_it_must():
    rec = Recorder()
    torch.set_default_device("meta")
    try:
        with rec:
            torch.zeros(2, dtype=torch.float64, device="cpu")
            rec.in_step = True
            torch.ones((), device="cpu").item()
        made = torch.zeros(2)
    finally:
        torch.set_default_device(None)
    assert rec.float64 and rec.syncs_in_step == 1 and made.device.type == "meta"
    with pytest.raises(Exception):
        made + torch.zeros(2, device="cpu")  # a factory without the device meets a real tensor: it fails


def test_precision_fp16_needs_cuda():
    from cifar_resnet.errors import ParamsError

    params = parse_params(tiny_params(train={"device": "cpu", "precision": "fp16"}))
    with pytest.raises(ParamsError, match="fp16 needs CUDA"):
        pick_runtime(replace(params.train, device="cpu"))
