"""The images a timing run trains on: a verified CIFAR-10 copy, whole or partial, else random images of its shape."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_resnet.stage_door import log


def timing_data(n_train: int, n_test: int, seed: int):
    """(Cifar10, what it is, whether it is real): CIFAR-10 if a verified copy is found, else random images."""
    folder = data_folder()
    if folder is None:
        return synthetic(n_train, n_test, seed), "synthetic", False
    return real(folder, n_train, n_test)


def data_folder() -> Path | None:
    """$CIFAR10_MIRROR (a folder holding cifar-10-batches-py/, or the files), else ./data/cifar-10-batches-py: the
    first that holds batches.meta, test_batch and at least one data_batch_N."""
    from cifar_resnet.data import FOLDER, META, MIRROR_ENV, TEST_FILES, TRAIN_FILES

    candidates = []
    if os.environ.get(MIRROR_ENV):
        mirror = Path(os.environ[MIRROR_ENV])
        candidates += [mirror / FOLDER, mirror]
    candidates.append(Path("data") / FOLDER)
    for folder in candidates:
        if all((folder / name).is_file() for name in (META, *TEST_FILES)) and \
                any((folder / name).is_file() for name in TRAIN_FILES):
            return folder
    if os.environ.get(MIRROR_ENV):
        log(f"gpu-check: {MIRROR_ENV}={os.environ[MIRROR_ENV]} holds no CIFAR-10 batches (batches.meta, test_batch "
            "and a data_batch_N): synthetic images are used")
    return None


def real(folder: Path, n_train: int, n_test: int):
    """The training batches present in `folder` (each md5-checked as the pipeline checks them), repeated to fill
    `n_train` when there are fewer; the same fixed test subset the pipeline takes."""
    import torch

    from cifar_resnet import data as cifar
    from cifar_resnet.data import Cifar10

    md5s = cifar.expected_md5s()
    present = [name for name in cifar.TRAIN_FILES if (folder / name).is_file()]
    images, labels, classes = cifar.read_files(folder, present, md5s)
    distinct = len(images)
    order = cifar.fixed_order(distinct)  # the subset load_cifar10 would take of a complete folder
    idx = order[:n_train] if n_train <= distinct else order.repeat(-(-n_train // distinct))[:n_train]
    test = cifar.load_test_split(folder, n_test if n_test < 10_000 else None, md5s)
    none = torch.zeros(0, dtype=torch.long)
    data = Cifar10(images[idx], labels[idx], images[:0], none, test.images, test.labels, classes)
    used = min(n_train, distinct)
    described = f"real subset {used}" if used < 50_000 else f"real {used}"
    if n_train > distinct:
        described += f" (of {folder}, repeated to {n_train})"
    return data, described, True


def synthetic(n_train: int, n_test: int, seed: int):
    """Random uint8 images of CIFAR-10's shape and random labels: the timing does not depend on the pixels."""
    import torch

    from cifar_resnet.data import Cifar10

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=g)
    none = torch.zeros(0, dtype=torch.long)
    return Cifar10(images[:n_train], labels[:n_train], images[:0], none, images[n_train:], labels[n_train:],
                   tuple(f"class {i}" for i in range(10)))
