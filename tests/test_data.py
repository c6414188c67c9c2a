"""CIFAR-10 files: fetch (mirror folder, mirror archive, URL) with md5 verification, read_batch's checks, and
load_cifar10's splits. Small archives in the official format are built here; the real files are used only when
$CIFAR10_MIRROR names a copy (as in CI)."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_resnet.data import (ARCHIVE, FOLDER, MIRROR_ENV, OFFICIAL_MD5, TEST_FILES, TRAIN_FILES, fetch,
                               load_cifar10, md5_of, read_batch, read_class_names)
from cifar_resnet.errors import DataError

NAMES = ("batches.meta",) + TRAIN_FILES + TEST_FILES
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_BATCH = 20
UNREACHABLE_URL = "http://cifar.invalid/cifar-10-python.tar.gz"  # never contacted when a mirror is given


# ------------------------------------------------------------------------------------------- a small CIFAR-10


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_batch(first_index: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    index = np.arange(first_index, first_index + n)
    data[:, 0], data[:, 1] = index // 256, index % 256  # every image in the set is distinct
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"small batch", b"labels": labels, b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in index]}


def write_small_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    write_pickle(folder / "batches.meta", {b"num_cases_per_batch": PER_BATCH,
                                           b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072})
    for i, name in enumerate(TRAIN_FILES + TEST_FILES):
        write_pickle(folder / name, make_batch(i * PER_BATCH, PER_BATCH, seed=i))
    (folder / "readme.html").write_text("<p>not a batch</p>")  # the official archive has one too


def make_archive(folder: Path, archive: Path, skip: tuple[str, ...] = ()) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=FOLDER, recursive=False)
        for path in sorted(folder.iterdir()):
            if path.name not in skip:
                tar.add(path, arcname=f"{FOLDER}/{path.name}")
    return archive


@dataclass(frozen=True)
class SmallSet:
    folder: Path  # .../folder_mirror/cifar-10-batches-py
    folder_mirror: Path
    archive_mirror: Path  # holds only cifar-10-python.tar.gz
    archive: Path
    md5s: dict


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> SmallSet:
    root = tmp_path_factory.mktemp("small_cifar")
    folder = root / "folder_mirror" / FOLDER
    write_small_folder(folder)
    archive = make_archive(folder, root / "archive_mirror" / ARCHIVE)
    md5s = {name: md5_of(folder / name) for name in NAMES}
    assert len(set(md5s.values())) == len(NAMES)
    return SmallSet(folder, folder.parent, archive.parent, archive, md5s)


def assert_same_files(dest: Path, folder: Path) -> None:
    assert sorted(p.name for p in dest.iterdir()) == sorted(NAMES)  # the 7 members, nothing else
    for name in NAMES:
        assert (dest / name).read_bytes() == (folder / name).read_bytes(), name


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no staging folder either


def staging_leftovers(dest: Path) -> list[str]:
    return [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.tmp")]


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


# ------------------------------------------------------------------------------------------- fetch: good sources


@pytest.mark.parametrize(("mirror", "source"), [("folder_mirror", "folder"), ("folder", "folder"),
                                                ("archive_mirror", "archive")])
def test_fetch_from_a_local_mirror(small, tmp_path, mirror, source):
    """A folder holding cifar-10-batches-py/, that folder itself, or a folder holding only the archive."""
    dest = tmp_path / "data" / FOLDER
    got = fetch(dest, UNREACHABLE_URL, mirror=str(getattr(small, mirror)), md5s=small.md5s, progress=False)
    assert got == str(getattr(small, source))
    assert_same_files(dest, small.folder)
    assert staging_leftovers(dest) == []


def test_archive_mirror_holds_only_the_archive(small):
    assert [p.name for p in small.archive_mirror.iterdir()] == [ARCHIVE]


def test_fetch_from_url(small, tmp_path):
    url = small.archive.as_uri()
    assert url.startswith("file://")
    dest = tmp_path / "data" / FOLDER
    source = fetch(dest, url, mirror="", md5s=small.md5s, progress=False)
    assert source == url
    assert_same_files(dest, small.folder)  # the downloaded archive itself is not left in dest
    assert staging_leftovers(dest) == []


def test_fetch_takes_the_mirror_from_the_environment(small, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(small.folder_mirror))
    dest = tmp_path / "data" / FOLDER
    assert fetch(dest, UNREACHABLE_URL, md5s=small.md5s, progress=False) == str(small.folder)
    assert_same_files(dest, small.folder)


def test_fetch_with_empty_mirror_env_downloads(small, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "")
    dest = tmp_path / "data" / FOLDER
    url = small.archive.as_uri()
    assert fetch(dest, url, md5s=small.md5s, progress=False) == url
    assert_same_files(dest, small.folder)


def test_fetch_replaces_an_existing_folder(small, tmp_path):
    dest = tmp_path / "data" / FOLDER
    dest.mkdir(parents=True)
    (dest / "stale_file").write_text("from an older run")
    (dest / "data_batch_1").write_bytes(b"old")
    fetch(dest, UNREACHABLE_URL, mirror=str(small.folder_mirror), md5s=small.md5s, progress=False)
    assert_same_files(dest, small.folder)
    assert staging_leftovers(dest) == []


# ------------------------------------------------------------------------------------------- fetch: bad sources


def corrupt_source(small: SmallSet, tmp_path: Path, kind: str, fault: str) -> dict:
    """A copy of the small set with data_batch_3 damaged, served as `kind`; returns fetch's url/mirror kwargs."""
    folder = tmp_path / "src" / "mirror" / FOLDER
    shutil.copytree(small.folder, folder)
    target = folder / "data_batch_3"
    {"flip": flip_byte, "truncate": truncate, "missing": Path.unlink}[fault](target)
    if kind == "folder":
        return {"url": UNREACHABLE_URL, "mirror": str(folder.parent)}
    archive = make_archive(folder, tmp_path / "src" / "archive_mirror" / ARCHIVE)
    if kind == "archive":
        return {"url": UNREACHABLE_URL, "mirror": str(archive.parent)}
    return {"url": archive.as_uri(), "mirror": ""}


SOURCES = ["folder", "archive", "url"]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_fetch_rejects_a_damaged_file(small, tmp_path, kind, fault):
    source = corrupt_source(small, tmp_path, kind, fault)
    damaged = tmp_path / "src" / "mirror" / FOLDER / "data_batch_3"
    actual = md5_of(damaged)
    assert actual != small.md5s["data_batch_3"]
    dest = tmp_path / "out" / "data" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, progress=False, md5s=small.md5s, **source)
    message = str(info.value)
    assert message.startswith("data_batch_3: md5 mismatch"), message
    assert f"expected {small.md5s['data_batch_3']}" in message
    assert f"got {actual}" in message
    assert_nothing_left(dest)


@pytest.mark.parametrize("kind", SOURCES)
def test_fetch_rejects_a_missing_file(small, tmp_path, kind):
    source = corrupt_source(small, tmp_path, kind, "missing")
    dest = tmp_path / "out" / "data" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, progress=False, md5s=small.md5s, **source)
    message = str(info.value)
    assert message.startswith("data_batch_3: missing from "), message
    assert_nothing_left(dest)


def test_fetch_missing_from_an_empty_mirror_names_every_file(small, tmp_path):
    mirror = tmp_path / "empty_mirror"
    mirror.mkdir()
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(mirror), md5s=small.md5s, progress=False)
    for name in NAMES:
        assert name in str(info.value)
    assert ARCHIVE in str(info.value)
    assert_nothing_left(dest)


def test_fetch_mirror_that_is_not_a_folder(small, tmp_path):
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError, match=rf"^{MIRROR_ENV}=.*not a folder"):
        fetch(dest, UNREACHABLE_URL, mirror=str(tmp_path / "nowhere"), md5s=small.md5s, progress=False)
    assert_nothing_left(dest)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_fetch_unreadable_archive(small, tmp_path, damage):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    raw = small.archive.read_bytes()
    (mirror / ARCHIVE).write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not a gzip file" * 100)
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(mirror), md5s=small.md5s, progress=False)
    assert str(info.value).startswith(f"{mirror / ARCHIVE}: not a readable CIFAR-10 archive")
    assert_nothing_left(dest)


def test_fetch_download_failure(small, tmp_path):
    url = (tmp_path / "no_such.tar.gz").as_uri()
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, url, mirror="", md5s=small.md5s, progress=False)
    assert str(info.value).startswith(f"{url}: download failed")
    assert MIRROR_ENV in str(info.value)
    assert_nothing_left(dest)


def test_fetch_verifies_against_the_official_table_by_default(small, tmp_path):
    # The small set is not CIFAR-10: without an injected table it must be refused.
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(small.folder_mirror), progress=False)
    assert str(info.value).startswith("batches.meta: md5 mismatch")
    assert f"expected {OFFICIAL_MD5['batches.meta']}" in str(info.value)
    assert_nothing_left(dest)


@pytest.mark.parametrize("kind", SOURCES)
def test_failed_fetch_keeps_a_previous_good_folder(small, tmp_path, kind):
    # Verification happens in a staging folder before dest is touched, so a failing fetch leaves the folder of an
    # earlier good run exactly as it was (DVC removes the stage's out before it reruns anyway).
    dest = tmp_path / "out" / "data" / FOLDER
    fetch(dest, UNREACHABLE_URL, mirror=str(small.folder_mirror), md5s=small.md5s, progress=False)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    source = corrupt_source(small, tmp_path, kind, "flip")
    with pytest.raises(DataError, match="^data_batch_3: md5 mismatch"):
        fetch(dest, progress=False, md5s=small.md5s, **source)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert staging_leftovers(dest) == []
    assert [p.name for p in dest.parent.iterdir()] == [FOLDER]


# ------------------------------------------------------------------------------------------- read_batch


def test_read_batch_good(small):
    images, labels = read_batch(small.folder / "data_batch_2")
    with open(small.folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert images.shape == (PER_BATCH, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (PER_BATCH,) and labels.dtype == np.int64
    assert labels.tolist() == raw[b"labels"]
    # Row layout of the official files: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert np.array_equal(images[3, 0].ravel(), raw[b"data"][3, :1024])
    assert np.array_equal(images[3, 2, 31], raw[b"data"][3, 3072 - 32:])


def good_dict(n: int = 4) -> dict:
    return {b"data": np.zeros((n, 3072), np.uint8), b"labels": list(range(n))}


BAD_BATCHES = {
    "shape_n_100": ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, "shape (4, 100)"),
    "shape_1d": ({b"data": np.zeros(3072, np.uint8), b"labels": [0]}, "shape (3072,)"),
    "dtype_float32": ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0, 1, 2, 3]}, "float32"),
    "dtype_int64": ({b"data": np.zeros((4, 3072), np.int64), b"labels": [0, 1, 2, 3]}, "int64"),
    "data_list": ({b"data": [[0] * 3072] * 4, b"labels": [0, 1, 2, 3]}, "got list"),
    "label_10": ({**good_dict(), b"labels": [0, 1, 2, 10]}, "labels must lie in 0-9, found 0..10"),
    "label_negative": ({**good_dict(), b"labels": [-1, 1, 2, 3]}, "labels must lie in 0-9, found -1..3"),
    "label_count": ({**good_dict(), b"labels": [0, 1, 2]}, "'labels' must be 4 integers"),
    "label_floats": ({**good_dict(), b"labels": [0.0, 1.0, 2.0, 3.0]}, "'labels' must be 4 integers"),
    "no_labels": ({b"data": np.zeros((4, 3072), np.uint8)}, "expected a dict with 'data' and 'labels'"),
    "str_keys": ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}, "expected a dict"),
    "a_list": ([np.zeros((4, 3072), np.uint8), [0, 1, 2, 3]], "not a CIFAR-10 batch (expected a dict"),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_read_batch_rejects_a_bad_pickle(tmp_path, case):
    obj, fragment = BAD_BATCHES[case]
    path = tmp_path / "data_batch_1"
    write_pickle(path, obj)
    with pytest.raises(DataError) as info:
        read_batch(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("content", [
    pytest.param(b"GIF89a" + np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8).tobytes(), id="random"),
    pytest.param(b"", id="empty"),
    pytest.param(pickle.dumps(good_dict())[:50], id="truncated_pickle"),
    pytest.param(b"<html>404 Not Found</html>", id="html"),
])
def test_read_batch_rejects_a_file_that_is_not_a_pickle(tmp_path, content):
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_batch(path)
    assert str(info.value).startswith(f"{path}: not a CIFAR-10 batch pickle")


def test_read_batch_missing_file(tmp_path):
    path = tmp_path / "data_batch_9"
    with pytest.raises(DataError, match="missing") as info:
        read_batch(path)
    assert str(info.value).startswith(str(path))


def test_read_class_names(small, tmp_path):
    assert read_class_names(small.folder) == CLASSES
    with pytest.raises(DataError, match="batches.meta: missing"):
        read_class_names(tmp_path)
    write_pickle(tmp_path / "batches.meta", {b"label_names": [c.encode() for c in CLASSES[:9]]})
    with pytest.raises(DataError, match="expected 10 class names, got 9"):
        read_class_names(tmp_path)
    (tmp_path / "batches.meta").write_bytes(b"junk")
    with pytest.raises(DataError, match="batches.meta: not a CIFAR-10 meta pickle"):
        read_class_names(tmp_path)


# ------------------------------------------------------------------------------------------- load_cifar10


def rows(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


def file_order(folder: Path, files) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_batch(folder / name) for name in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_load_cifar10_full(small):
    data = load_cifar10(small.folder)
    n_train, n_test = PER_BATCH * len(TRAIN_FILES), PER_BATCH * len(TEST_FILES)
    assert data.train_images.shape == (n_train, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (n_test, 3, 32, 32) and data.test_images.dtype == torch.uint8
    assert data.train_labels.shape == (n_train,) and data.train_labels.dtype == torch.int64
    assert data.test_labels.shape == (n_test,) and data.test_labels.dtype == torch.int64
    assert data.val_images.shape == (0, 3, 32, 32) and data.val_labels.shape == (0,)
    assert data.classes == CLASSES
    # Without subsets the splits are the files in order.
    x, y = file_order(small.folder, TRAIN_FILES)
    assert np.array_equal(data.train_images.numpy(), x) and np.array_equal(data.train_labels.numpy(), y)
    x, y = file_order(small.folder, TEST_FILES)
    assert np.array_equal(data.test_images.numpy(), x) and np.array_equal(data.test_labels.numpy(), y)


def test_load_cifar10_subsets_are_fixed(small):
    a = load_cifar10(small.folder, train_limit=30, test_limit=7)
    b = load_cifar10(small.folder, train_limit=30, test_limit=7)
    assert len(a.train_images) == 30 and len(a.train_labels) == 30
    assert len(a.test_images) == 7 and len(a.test_labels) == 7
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    full = load_cifar10(small.folder)
    all_train, all_test = rows(full.train_images), rows(full.test_images)
    # A subset is a subset (image with its own label), kept in file order, not just the first images.
    positions = [all_train.index(r) for r in rows(a.train_images)]
    assert positions == sorted(positions) and positions != list(range(30))
    assert torch.equal(full.train_labels[positions], a.train_labels)
    test_positions = [all_test.index(r) for r in rows(a.test_images)]
    assert test_positions == sorted(test_positions)
    assert torch.equal(full.test_labels[test_positions], a.test_labels)
    # A smaller limit is a prefix of the same fixed permutation: its images are among the larger subset's.
    smaller = load_cifar10(small.folder, train_limit=10, test_limit=3)
    assert set(rows(smaller.train_images)) <= set(rows(a.train_images))
    assert set(rows(smaller.test_images)) <= set(rows(a.test_images))


def test_load_cifar10_limit_above_the_split_size_takes_everything(small):
    data = load_cifar10(small.folder, train_limit=10_000, test_limit=10_000)
    assert len(data.train_images) == PER_BATCH * len(TRAIN_FILES)
    assert len(data.test_images) == PER_BATCH * len(TEST_FILES)


@pytest.mark.parametrize("train_limit", [None, 10])
def test_load_cifar10_validation_is_held_out(small, train_limit):
    n_train = PER_BATCH * len(TRAIN_FILES)
    data = load_cifar10(small.folder, val_size=25, train_limit=train_limit)
    assert len(data.val_images) == 25 and len(data.val_labels) == 25
    assert data.val_images.dtype == torch.uint8 and data.val_labels.dtype == torch.int64
    assert len(data.train_images) == (n_train - 25 if train_limit is None else train_limit)
    train, val = set(rows(data.train_images)), set(rows(data.val_images))
    assert len(val) == 25 and not train & val  # disjoint by content
    full = load_cifar10(small.folder)
    all_train = rows(full.train_images)
    if train_limit is None:
        assert train | val == set(all_train)
    positions = [all_train.index(r) for r in rows(data.val_images)]
    assert torch.equal(full.train_labels[positions], data.val_labels)  # labels travel with their images
    # The held-out images are the same on every call and do not depend on the limits.
    again = load_cifar10(small.folder, val_size=25, train_limit=5, test_limit=3)
    assert torch.equal(again.val_images, data.val_images)
    # The test split is untouched by val_size.
    assert torch.equal(data.test_images, full.test_images)


@pytest.mark.parametrize("val_size", [PER_BATCH * len(TRAIN_FILES), PER_BATCH * len(TRAIN_FILES) + 1, 10**6])
def test_load_cifar10_val_size_too_large(small, val_size):
    with pytest.raises(DataError) as info:
        load_cifar10(small.folder, val_size=val_size)
    assert str(info.value).startswith(f"data.val_size ({val_size})")
    assert str(PER_BATCH * len(TRAIN_FILES)) in str(info.value)


def test_load_cifar10_largest_val_size_leaves_one_training_image(small):
    n_train = PER_BATCH * len(TRAIN_FILES)
    data = load_cifar10(small.folder, val_size=n_train - 1)
    assert len(data.train_images) == 1 and len(data.val_images) == n_train - 1


def test_load_cifar10_names_a_bad_or_missing_batch(small, tmp_path):
    folder = tmp_path / FOLDER
    shutil.copytree(small.folder, folder)
    write_pickle(folder / "data_batch_4", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(DataError, match="data_batch_4: 'data' must be a uint8 array"):
        load_cifar10(folder)
    (folder / "test_batch").unlink()
    shutil.copyfile(small.folder / "data_batch_4", folder / "data_batch_4")
    with pytest.raises(DataError, match="test_batch: missing"):
        load_cifar10(folder)


def test_mean_std(small):
    data = load_cifar10(small.folder)
    mean, std = data.mean_std()
    assert len(mean) == 3 and len(std) == 3
    assert all(isinstance(v, float) for v in mean + std)
    x = data.train_images.numpy().astype(np.float64)
    assert mean == pytest.approx(tuple(x.mean(axis=(0, 2, 3))))
    assert std == pytest.approx(tuple(x.std(axis=(0, 2, 3), ddof=1)))
    assert all(100 < m < 155 for m in mean) and all(60 < s < 90 for s in std)  # uniform bytes: 127.5 and 73.9
    # Statistics of the training split only.
    held_out = load_cifar10(small.folder, val_size=50).mean_std()
    assert held_out != (mean, std)


# ------------------------------------------------------------------------------------------- the real files

REAL_MIRROR = os.environ.get(MIRROR_ENV)


@pytest.fixture
def real_mirror() -> Path:
    if not REAL_MIRROR:
        pytest.skip(f"${MIRROR_ENV} is not set (CI points it at the real CIFAR-10 files)")
    return Path(REAL_MIRROR)


def test_real_fetch_and_load(real_mirror, tmp_path):
    dest = tmp_path / "data" / FOLDER
    source = fetch(dest, UNREACHABLE_URL, mirror=str(real_mirror), md5s=OFFICIAL_MD5, progress=False)
    assert source.startswith(str(real_mirror))
    assert {p.name for p in dest.iterdir()} == set(OFFICIAL_MD5)
    data = load_cifar10(dest)
    assert data.train_images.shape == (50_000, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10_000, 3, 32, 32) and data.test_labels.dtype == torch.int64
    assert len(data.val_images) == 0
    assert data.classes[0] == "airplane"
    assert data.classes == CLASSES
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [1000] * 10


def test_real_mirror_with_a_flipped_byte(real_mirror, tmp_path):
    real_folder = real_mirror / FOLDER if (real_mirror / FOLDER).is_dir() else real_mirror
    if not all((real_folder / name).is_file() for name in OFFICIAL_MD5):
        pytest.skip(f"{real_mirror} holds no unpacked {FOLDER}")
    # The copy: data_batch_3 is a real copy with one byte flipped; the other six link to the real files.
    folder = tmp_path / "mirror" / FOLDER
    folder.mkdir(parents=True)
    for name in OFFICIAL_MD5:
        if name == "data_batch_3":
            shutil.copyfile(real_folder / name, folder / name)
            flip_byte(folder / name)
        else:
            (folder / name).symlink_to((real_folder / name).resolve())
    actual = hashlib.md5((folder / "data_batch_3").read_bytes()).hexdigest()
    assert actual != OFFICIAL_MD5["data_batch_3"]
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(folder.parent), md5s=OFFICIAL_MD5, progress=False)
    message = str(info.value)
    assert "data_batch_3" in message
    assert OFFICIAL_MD5["data_batch_3"] in message and actual in message
    assert_nothing_left(dest)
