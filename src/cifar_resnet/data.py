"""The verified CIFAR-10 folder -> uint8 tensors, with torchvision hashing the files (`calculate_md5`) and
unpickling the batches (`datasets.CIFAR10`).

This module holds the md5 table (the official one, or $CIFAR10_MD5SUMS for another CIFAR-format copy) and adds what
torchvision lacks: errors that name the file at fault, the fixed subsets and validation split, and NCHW uint8
tensors. `cifar_resnet.fetch` writes the folder (the download stage's output); `load_cifar10`, `load_test_split` and
`load_split` read it back and are the one way every later stage reads data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5

from cifar_resnet.errors import DataError, ParamsError

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
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # the official archive's own md5, from the same page
META = "batches.meta"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
FILES = (META,) + TRAIN_FILES + TEST_FILES
MIRROR_ENV = "CIFAR10_MIRROR"
MD5SUMS_ENV = "CIFAR10_MD5SUMS"
SPLIT_SEED = 20_240_601  # the subsets and the validation split are fixed, whatever `seed` says


# ---------------------------------------------------------------------------------------------------- md5 table


def expected_md5s(md5s: dict[str, str] | None = None) -> dict[str, str]:
    """The md5 every CIFAR-10 file must have: `md5s` if given, else the md5sum file named by $CIFAR10_MD5SUMS,
    else the official table. Keys: FILES, in that order."""
    return expected_md5s_and_archive(md5s)[0]


def expected_md5s_and_archive(md5s: dict[str, str] | None) -> tuple[dict[str, str], str | None]:
    """expected_md5s(md5s), and the md5 the archive must have before it is unpacked: the official one under the
    official table, else the table's ARCHIVE entry, if any. Without one (another CIFAR-format copy whose archive
    is not listed) the archive is still unpacked under the same filter, and its files are checked one by one."""
    if md5s is not None:
        table, source = md5s, "md5s"
    elif os.environ.get(MD5SUMS_ENV):
        path = os.environ[MD5SUMS_ENV]
        table, source = read_md5sums(Path(path)), f"{MD5SUMS_ENV}={path}"
    else:
        table, source = {**OFFICIAL_MD5, ARCHIVE: ARCHIVE_MD5}, "the official table"
    return _every_file(table, source), table.get(ARCHIVE)


def _every_file(table: dict[str, str], source: str) -> dict[str, str]:
    missing = [name for name in FILES if name not in table]
    if missing:
        raise DataError(f"{source}: no md5 for {', '.join(missing)}")
    return {name: table[name] for name in FILES}  # other names (a readme, say) play no part


def read_md5sums(path: Path) -> dict[str, str]:
    """An `md5sum` output file ("<md5>  <path>" lines) -> {file name: md5}; folders in the paths are ignored."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{MD5SUMS_ENV}={path}: unreadable ({exc})") from None
    table = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        md5, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")  # md5sum marks files it read in binary mode with '*'
        if len(md5) != 32 or not all(c in "0123456789abcdefABCDEF" for c in md5) or not name:
            raise DataError(f"{MD5SUMS_ENV}={path}: line {number} is not '<md5>  <file>': {line!r}")
        table[Path(name).name] = md5.lower()
    return table


def verify(folder: Path, name: str, expected: str, source: str, hint: str = "") -> None:
    """Raise a DataError naming `name` unless `folder / name` is a file whose md5 is `expected`."""
    path = folder / name
    if not path.is_file():
        raise DataError(f"{name}: missing from {source}{hint}")
    actual = calculate_md5(path)
    if actual != expected:
        raise DataError(f"{name}: md5 mismatch in {source}: expected {expected}, got {actual} (the file is "
                        f"truncated, altered or not CIFAR-10; another CIFAR-format copy needs ${MD5SUMS_ENV})")


# ---------------------------------------------------------------------------------------------------- reading


class _VerifiedBatch(CIFAR10):
    """torchvision's CIFAR-10 reader for one batch file of `folder`, verified against an injected md5 table.

    One file at a time so that an unreadable file can be named: torchvision reads a whole split in one go.
    """

    def __init__(self, folder: Path, name: str, md5s: dict[str, str]):
        # Instance attributes shadow the class's official table and folder name: that is where md5s go in.
        self.base_folder = folder.name
        self.train_list, self.test_list = [[name, md5s[name]]], []
        self.meta = {**CIFAR10.meta, "md5": md5s[META]}
        super().__init__(str(folder.parent), train=True)

    def _check_integrity(self) -> bool:
        # torchvision's own check only says "Dataset not found or corrupted": name the file and the cause.
        folder = Path(self.root) / self.base_folder
        for name, md5 in [[META, self.meta["md5"]], *self.train_list]:
            verify(folder, name, md5, str(folder), " (run the download stage)")
        return True

    def _load_meta(self) -> None:
        try:
            super()._load_meta()
        except Exception as exc:  # as in _read_batch
            path = Path(self.root) / self.base_folder / META
            raise DataError(f"{path}: not a CIFAR-10 meta pickle ({type(exc).__name__}: {exc})") from None


def _read_batch(folder: Path, name: str, md5s: dict[str, str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """One batch file -> (uint8 images N x 3 x 32 x 32, int64 labels N, class names), each checked."""
    path = folder / name
    try:
        batch = _VerifiedBatch(folder, name, md5s)
    except DataError:
        raise
    except Exception as exc:  # a file that is no batch pickle raises anything from UnpicklingError to KeyError
        raise DataError(f"{path}: not a CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from None
    images = batch.data.transpose(0, 3, 1, 2)  # torchvision's NHWC back to the files' (and the loader's) NCHW
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8, got {images.dtype}")
    labels = np.asarray(batch.targets)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be {len(images)} integers, got shape {labels.shape} ({labels.dtype})")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0-9, found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64), _class_names(folder / META, batch.classes)


def _class_names(path: Path, names) -> tuple[str, ...]:
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
        got = f"{len(names)}: {names[:10]!r}" if isinstance(names, list) else type(names).__name__
        raise DataError(f"{path}: expected 10 class names (strings), got {got}")
    return tuple(names)


def read_files(folder: Path, files, md5s: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The named batch files of `folder`, each checked, as (uint8 images, int64 labels, class names)."""
    parts = [_read_batch(folder, name, md5s) for name in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels), parts[0][2]


def fixed_order(n: int) -> torch.Tensor:
    """The permutation of n images that the subsets and the validation split take, whatever `seed` says."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))


def _within(key: str, limit: int | None, available: int, what: str) -> None:
    """A subset limit above what the data holds is a mistake, not a quiet cap."""
    if limit is not None and limit > available:
        raise ParamsError(f"{key}: expected at most the {available} {what}, got {limit}")


@dataclass
class Cifar10Test:
    """The test split alone: uint8 images (N, 3, 32, 32), int64 labels, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


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


def load_test_split(folder: str | Path, test_limit: int | None = None,
                    md5s: dict[str, str] | None = None) -> Cifar10Test:
    """Only the test batch (and the class names) of the verified folder: the same test subset as load_cifar10's."""
    images, labels, classes = read_files(Path(folder), TEST_FILES, expected_md5s(md5s))
    _within("data.test_limit", test_limit, len(images), "test images")
    idx = torch.arange(len(images)) if test_limit is None else fixed_order(len(images))[:test_limit]
    idx = idx.sort().values  # sorted indices keep a subset in file order (cheaper gathers, same content)
    return Cifar10Test(images[idx], labels[idx], classes)


def load_cifar10(folder: str | Path, train_limit: int | None = None, test_limit: int | None = None,
                 val_size: int = 0, md5s: dict[str, str] | None = None) -> Cifar10:
    """Load the verified folder. The validation split and the subsets are fixed permutations (SPLIT_SEED)."""
    folder, md5s = Path(folder), expected_md5s(md5s)
    train_x, train_y, classes = read_files(folder, TRAIN_FILES, md5s)
    if val_size >= len(train_x):
        raise DataError(f"data.val_size ({val_size}) must be below the {len(train_x)} training images")
    order = fixed_order(len(train_x))
    val_idx, train_idx = order[:val_size], order[val_size:]
    _within("data.train_limit", train_limit, len(train_idx), f"training images left after data.val_size ({val_size})")
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
    test = load_test_split(folder, test_limit, md5s)
    return Cifar10(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                   test.images, test.labels, classes)


def load_configured(folder: str | Path, data_params) -> Cifar10:
    """Every split, with the subsets and the validation split that `data_params` (params.yaml's `data`) set."""
    return load_cifar10(folder, data_params.train_limit, data_params.test_limit, data_params.val_size)


def load_split(folder: str | Path, split: str, data_params) -> Cifar10Test:
    """The images, labels and class names of one evaluation split ("val" or "test") as `data_params` define it."""
    if split == "test":
        return load_test_split(folder, data_params.test_limit)
    whole = load_configured(folder, data_params)
    return Cifar10Test(whole.val_images, whole.val_labels, whole.classes)
