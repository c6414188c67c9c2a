"""Official CIFAR-10 archive -> md5-verified batches -> uint8 tensors.

`fetch` writes the verified `cifar-10-batches-py` folder (the download stage's output); `load_cifar10` reads it back as
one uint8 tensor per split in a second or two, and is the one way every later stage reads data.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar_resnet.errors import DataError

# md5 of every member of the official archive (https://www.cs.toronto.edu/~kriz/cifar.html).
OFFICIAL_MD5 = {
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
MIRROR_ENV = "CIFAR10_MIRROR"
SPLIT_SEED = 20_240_601  # the subsets and the validation split are fixed, whatever `seed` says


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(dest: str | Path, url: str, mirror: str | None = None, md5s: dict[str, str] = OFFICIAL_MD5,
          progress: bool = True) -> str:
    """Write the verified CIFAR-10 folder to `dest` and return a description of where it came from.

    `mirror` (default: $CIFAR10_MIRROR) is a local folder holding `cifar-10-batches-py/` or the archive; without it the
    archive is downloaded from `url`. Every member's md5 is checked against `md5s`; on any failure `dest` is left as
    it was and no staging folder remains.
    """
    dest = Path(dest)
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        source = _gather(staging, url, mirror, md5s, progress)
        for name, expected in md5s.items():
            path = staging / name
            if not path.is_file():
                raise DataError(f"{name}: missing from {source}")
            actual = md5_of(path)
            if actual != expected:
                raise DataError(f"{name}: md5 mismatch in {source}: expected {expected}, got {actual} "
                                "(the file is truncated, altered or not CIFAR-10)")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        return source
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gather(staging: Path, url: str, mirror: str | None, md5s: dict[str, str], progress: bool) -> str:
    """Put the members named in `md5s` into `staging`; return where they came from."""
    if mirror:
        root = Path(mirror)
        if not root.is_dir():
            raise DataError(f"{MIRROR_ENV}={mirror}: not a folder")
        for folder in (root / FOLDER, root):
            if all((folder / name).is_file() for name in md5s):
                for name in md5s:
                    shutil.copyfile(folder / name, staging / name)
                return str(folder)
        if (root / ARCHIVE).is_file():
            _extract(root / ARCHIVE, staging, md5s)
            return str(root / ARCHIVE)
        missing = [n for n in md5s if not (root / FOLDER / n).is_file()]
        raise DataError(f"{', '.join(missing)}: missing from {root / FOLDER} (and no {ARCHIVE} in {root})")
    archive = staging / ARCHIVE
    _download(url, archive, progress)
    _extract(archive, staging, md5s)
    archive.unlink()
    return url


def _download(url: str, target: Path, progress: bool) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise DataError(f"{url}: download failed ({exc}); offline, point {MIRROR_ENV} at a local copy") from None


def _extract(archive: Path, staging: Path, md5s: dict[str, str]) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in md5s:
                try:
                    member = tar.getmember(f"{FOLDER}/{name}")
                except KeyError:
                    raise DataError(f"{name}: missing from {archive}") from None
                if not member.isfile():
                    raise DataError(f"{name}: not a regular file in {archive}")
                with tar.extractfile(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: not a readable CIFAR-10 archive ({exc})") from None


# ---------------------------------------------------------------------------------------------------- loading


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> (uint8 images N x 3 x 32 x 32, int64 labels N), checked."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the download stage)") from None
    except Exception as exc:  # a pickle that is not one raises anything from UnpicklingError to ValueError
        raise DataError(f"{path}: not a CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict with 'data' and 'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} integers, got shape {labels.shape} ({labels.dtype})")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0-9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_class_names(folder: Path) -> tuple[str, ...]:
    path = folder / "batches.meta"
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = tuple(n.decode() for n in meta[b"label_names"])
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run the download stage)") from None
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR-10 meta pickle ({type(exc).__name__}: {exc})") from None
    if len(names) != 10:
        raise DataError(f"{path}: expected 10 class names, got {len(names)}")
    return names


@dataclass
class Cifar10:
    """The splits as uint8 image tensors (N, 3, 32, 32) and int64 label tensors."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training split, on the 0-255 scale."""
        means, stds = [], []
        for c in range(3):  # one channel at a time: float64 of all 50,000 images at once would be 1.2 GB
            x = self.train_images[:, c].to(torch.float64)
            means.append(x.mean().item())
            stds.append(x.std().item())
        return tuple(means), tuple(stds)


def _read_split(folder: Path, files) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(folder / name) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_cifar10(folder: str | Path, train_limit: int | None = None, test_limit: int | None = None,
                 val_size: int = 0) -> Cifar10:
    """Load the verified folder. The validation split and the subsets are fixed permutations (SPLIT_SEED)."""
    folder = Path(folder)
    classes = read_class_names(folder)
    train_x, train_y = _read_split(folder, TRAIN_FILES)
    test_x, test_y = _read_split(folder, TEST_FILES)
    if val_size >= len(train_x):
        raise DataError(f"data.val_size ({val_size}) must be below the {len(train_x)} training images")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    test_idx = torch.arange(len(test_x))
    if test_limit is not None:
        test_idx = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(SPLIT_SEED))[:test_limit]
    # Sorted indices keep the subsets in file order (cheaper gathers, same content).
    train_idx, val_idx, test_idx = train_idx.sort().values, val_idx.sort().values, test_idx.sort().values
    return Cifar10(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                   test_x[test_idx], test_y[test_idx], classes)
