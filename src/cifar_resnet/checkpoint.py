"""Per-epoch checkpoints that survive a kill without being DVC outputs.

They live under the user's cache directory ($CIFAR_RESNET_CACHE, else $XDG_CACHE_HOME/cifar_resnet, else
~/.cache/cifar_resnet), in a folder named by a hash of everything that shapes the run (the params train reads, the
resolved device kind, precision and process count, the source of every cifar_resnet module loaded and of the stage
script, the data's md5s). A queued experiment, which runs in a temporary copy of the repo, therefore finds its own
checkpoint after a restart, and a checkpoint made under other params, runtime or code is never resumed from. The
folder is removed when the stage succeeds.

A run holds an exclusive lock on its folder for its whole life (`claimed`); the system drops it when the process
ends, however it ends. A folder no live process holds is free to resume from, whichever workspace or queued copy
made it; while one is held, a second run of the same config fails at once rather than resume from the other's
half-finished state and have its folder removed under it. Folders not touched for $CIFAR_RESNET_CHECKPOINT_DAYS days
(default 7), the leftovers of runs killed and never rerun, are removed when a train stage starts (`prune`), unless a
live run holds them. An environment variable, not a param: a train.* param would be part of every run's identity.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from cifar_resnet.atomic import atomic_path, write_torch
from cifar_resnet.errors import CifarResnetError

FILE = "checkpoint.pt"
LOCK = "lock"  # holds the pid of the run that holds the folder
DAYS_VARIABLE = "CIFAR_RESNET_CHECKPOINT_DAYS"
DAYS_DEFAULT = 7.0


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


def run_identity(params, lr_max: float, lr_min: float, runtime, world_size: int,
                 data_md5: dict[str, str]) -> tuple[str, dict]:
    """(key, identity): what a checkpoint must agree on to be resumed: the params train reads, the resolved LRs,
    the resolved device kind and precision and the process count (an fp16 run's optimizer state includes a grad
    scaler's, which a bf16 or fp32 checkpoint lacks; on another device or process count the run would quietly
    continue other numbers), the code and the data; the key is a hash of it."""
    config = {"seed": params.seed, "lr_max": lr_max, "lr_min": lr_min, "data": asdict(params.data),
              "model": asdict(params.model), "augment": asdict(params.augment), "train": asdict(params.train),
              "evaluate": {"batch_size": params.evaluate.batch_size}}
    resolved = {"device": runtime.device.type, "precision": runtime.precision, "processes": world_size}
    identity = {"config": config, "runtime": resolved, "code": code_fingerprint(), "data": data_md5}
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], identity


def exists(key: str) -> bool:
    return (_folder(key) / FILE).is_file()


def _folder(key: str) -> Path:
    return cache_root() / "checkpoints" / key


def save(key: str, state: dict) -> None:
    """Write the checkpoint atomically and durably: its bytes reach the disk before the rename, and the rename
    after it (two fsyncs an epoch), so that after a power cut the name holds the old checkpoint or the new one."""
    write_torch(_folder(key) / FILE, state, durable=True)


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


@contextmanager
def claimed(key: str, identity: dict, log=print):
    """Hold the folder of `key` while the run lives; on entry say why an earlier checkpoint of this workspace is not
    resumed, and label this one. Raises CifarResnetError if another live process holds it."""
    folder = _folder(key)
    fd = _hold(folder)
    try:
        if not exists(key):
            why = explain_fresh_start(key, identity)
            if why:
                log(why)
        write_identity(key, identity)
        yield
    finally:
        os.close(fd)


def _hold(folder: Path) -> int:
    """A descriptor of `folder`'s lock file, locked by this process, the folder made if need be."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = _try_lock(folder)
        except FileNotFoundError:  # its last holder removed the folder meanwhile: make it again
            continue
        if fd is None:
            raise CifarResnetError(f"another live run of the same config holds {folder} (pid {_holder(folder)}); "
                                   "wait for it to end, or stop it and run again to resume from its checkpoint")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _try_lock(folder: Path) -> int | None:
    """`folder`'s lock file, open and locked; None if a live process holds it. FileNotFoundError if the folder was
    removed: a holder removes its folder while it holds the lock, and a lock taken on the removed file, or on one
    removed between opening and locking, would guard nothing."""
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        opened, named = os.fstat(fd), os.stat(path)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            raise FileNotFoundError(path)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(folder: Path) -> str:
    try:
        return (folder / LOCK).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


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


def prune(log=print) -> None:
    """Remove every checkpoint folder not touched for the days $CIFAR_RESNET_CHECKPOINT_DAYS says (default 7)
    that no live run holds."""
    days = _days()
    root = cache_root() / "checkpoints"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            if not folder.is_dir() or time.time() - _touched(folder) < days * 86400:
                continue
            fd = _try_lock(folder)
        except FileNotFoundError:  # removed meanwhile
            continue
        if fd is None:  # a live run holds it
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        log(f"Removed the checkpoint folder {folder}: not touched for {days:g} days")


def _days() -> float:
    value = os.environ.get(DAYS_VARIABLE) or str(DAYS_DEFAULT)
    try:
        days = float(value)
    except ValueError:
        days = math.nan
    if not days > 0:
        raise CifarResnetError(f"{DAYS_VARIABLE}: {value!r} is not a number of days above 0 (how long an untouched "
                               f"checkpoint folder is kept; default {DAYS_DEFAULT:g}, 'inf' keeps them all)")
    return days


def _touched(folder: Path) -> float:
    """When the folder or any file in it last changed (FileNotFoundError if the folder is gone)."""
    latest = folder.stat().st_mtime
    for path in folder.iterdir():
        try:
            latest = max(latest, path.stat().st_mtime)
        except FileNotFoundError:  # removed meanwhile
            pass
    return latest


def remove(key: str) -> None:
    """Remove the folder of `key`; a stage calls it while it holds the folder (`claimed`)."""
    shutil.rmtree(_folder(key), ignore_errors=True)
