"""Per-epoch checkpoints that survive a kill without being DVC outputs.

They live under the user's cache directory ($CIFAR_RESNET_CACHE, else $XDG_CACHE_HOME/cifar_resnet, else
~/.cache/cifar_resnet), in a folder named by a hash of everything that shapes the run (the params train reads, the
source of every cifar_resnet module loaded and of the stage script, the data's md5s). A queued experiment, which
runs in a temporary copy of the repo, therefore finds its own checkpoint after a restart, and a checkpoint made
under other params or code is never resumed from. The folder is removed when the stage succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from cifar_resnet.atomic import atomic_path, write_torch

FILE = "checkpoint.pt"


def cache_root() -> Path:
    if os.environ.get("CIFAR_RESNET_CACHE"):
        return Path(os.environ["CIFAR_RESNET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar_resnet"


def code_fingerprint() -> dict[str, str]:
    """md5 of the running stage script and of every loaded cifar_resnet module's source, by file name."""
    files = {}
    for name, module in sorted(sys.modules.items()):
        if (name == "cifar_resnet" or name.startswith("cifar_resnet.")) and getattr(module, "__file__", None):
            files[f"cifar_resnet/{Path(module.__file__).name}"] = module.__file__
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        files[f"stage/{Path(main).name}"] = main
    return {k: hashlib.md5(Path(v).read_bytes()).hexdigest() for k, v in sorted(files.items())}


def run_identity(params, lr_max: float, lr_min: float, world_size: int, data_md5: dict[str, str]) -> tuple[str, dict]:
    """(key, identity): what a checkpoint must agree on to be resumed: the params train reads, the resolved LRs,
    the process count, the code and the data; the key is a hash of it."""
    config = {"seed": params.seed, "lr_max": lr_max, "lr_min": lr_min, "data": asdict(params.data),
              "model": asdict(params.model), "augment": asdict(params.augment), "train": asdict(params.train),
              "evaluate": {"batch_size": params.evaluate.batch_size}, "world_size": world_size}
    identity = {"config": config, "code": code_fingerprint(), "data": data_md5}
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], identity


def exists(key: str) -> bool:
    return (_folder(key) / FILE).is_file()


def _folder(key: str) -> Path:
    return cache_root() / "checkpoints" / key


def save(key: str, state: dict) -> None:
    write_torch(_folder(key) / FILE, state)


def write_identity(key: str, identity: dict) -> None:
    """Record what the checkpoint belongs to, so a later start with other params or code can say what changed."""
    folder = _folder(key)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "identity.json") as tmp:
        tmp.write_text(json.dumps({"workspace": os.getcwd(), **identity}, sort_keys=True, default=str))


def load(key: str, log=print) -> dict | None:
    path = _folder(key) / FILE
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint is a convenience: a damaged one costs a fresh start, not the run
            log(f"Starting afresh: the checkpoint {path} could not be read ({type(exc).__name__}: {exc})")
            return None
    return None


def claim(key: str, identity: dict, log=print) -> None:
    """Before a run starts: say why an earlier checkpoint of this workspace is not resumed, and label this one."""
    if not exists(key):
        why = explain_fresh_start(key, identity)
        if why:
            log(why)
    write_identity(key, identity)


def explain_fresh_start(key: str, identity: dict) -> str | None:
    """If this workspace left a checkpoint under another key, say which params or code differ from it."""
    found = []
    for other in (cache_root() / "checkpoints").glob("*/identity.json"):
        if other.parent.name == key or not (other.parent / FILE).is_file():
            continue
        try:
            info = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if info.get("workspace") == os.getcwd():
            found.append((other.stat().st_mtime, info))
    if not found:
        return None
    _, info = max(found, key=lambda item: item[0])
    changed = _differences(info, json.loads(json.dumps(identity, default=str)))
    return ("Starting afresh: the checkpoint left here was made under other "
            f"{'params or code' if not changed else ', '.join(changed[:6])}")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "workspace":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def remove(key: str) -> None:
    shutil.rmtree(_folder(key), ignore_errors=True)
