"""Shared helpers: tiny CIFAR-format data sets, tiny params, and running stage scripts as a user would."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_folder(folder: Path, per_batch: int = 64, seed: int = 0) -> Path:
    """A learnable CIFAR-10 look-alike in the official python format: each class has its own colour and stripe."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 60, (per_batch, 3, 32, 32)).astype(np.int64)
        for i, label in enumerate(labels):
            images[i, label % 3] += 120
            images[i, :, :, (label * 3) % 32] += 70
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(per_batch, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}, f)
    return folder


TINY = {
    "lr_max": 0.2,
    "data": {"train_limit": None, "test_limit": None},
    "model": {"channels": [8, 16, 32, 64]},
    "lr_range_test": {"num_iter": 20},
    "train": {"epochs": 3, "peak_epoch": 1, "batch_size": 64, "device": "cpu"},
    "evaluate": {"batch_size": 128},
}


def tiny_params(**overrides) -> dict:
    """params.yaml of the repo, shrunk: narrow model, few epochs, small batches. Overrides by section."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for layer in (TINY, overrides):
        for section, values in layer.items():
            if isinstance(values, dict):
                params[section].update(values)
            else:
                params[section] = values
    return params


def make_workspace(root: Path, per_batch: int = 64, **overrides) -> Path:
    """A folder a stage can run in: params.yaml and data/cifar-10-batches-py (synthetic)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
    write_cifar_folder(root / "data" / "cifar-10-batches-py", per_batch)
    return root


def stage_env(cache: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO / "src"), NO_ALBUMENTATIONS_UPDATE="1", DVC_NO_ANALYTICS="1", **extra)
    if cache is not None:
        env["CIFAR_RESNET_CACHE"] = str(cache)
    return env


def run_stage(name: str, cwd: Path, env: dict, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path / "ws")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest. Restores the count (pick_runtime changes it globally)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mirror():
    path = os.environ.get("CIFAR10_MIRROR")
    if not path or not (Path(path) / "cifar-10-batches-py").is_dir():
        pytest.skip("CIFAR10_MIRROR is not set to a folder holding cifar-10-batches-py")
    return Path(path)
