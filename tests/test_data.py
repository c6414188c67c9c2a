"""CIFAR-10 files: fetch (mirror folder, mirror archive, URL) with md5 verification, the md5 table and its
$CIFAR10_MD5SUMS override, the checks on reading, and load_cifar10's and load_test_split's splits. Small sets in
the official format are built here; the real files are used only when $CIFAR10_MIRROR names a copy (as in CI)."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.server
import io
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5

from cifar_resnet.data import (ARCHIVE, ARCHIVE_MD5, FOLDER, MD5SUMS_ENV, MIRROR_ENV, OFFICIAL_MD5, SPLIT_SEED,
                               TEST_FILES, TRAIN_FILES, Cifar10Test, expected_md5s, load_cifar10, load_test_split,
                               read_md5sums)
from cifar_resnet.fetch import fetch
from cifar_resnet.errors import DataError, ParamsError
from conftest import REPO, stage_env, tiny_params, write_md5sums

NAMES = ("batches.meta",) + TRAIN_FILES + TEST_FILES
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_BATCH = 20
UNREACHABLE_URL = "http://127.0.0.1:1/cifar-10-python.tar.gz"  # never contacted when a mirror is given


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
    # str keys: what the official (Python 2) pickles hold once torchvision decodes them as latin1.
    return {"batch_label": "small batch", "labels": labels, "data": data,
            "filenames": [f"img_{i}.png" for i in index]}


def write_small_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    write_pickle(folder / "batches.meta", {"num_cases_per_batch": PER_BATCH, "label_names": list(CLASSES),
                                           "num_vis": 3072})
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
    md5s: dict  # the seven files' md5s only, as for another CIFAR-format copy whose archive has no md5 listed
    md5sums: Path  # the md5s in md5sum format, beside the folder (as in ../shared/cifar10), the archive's too

    @property
    def with_archive(self) -> dict:
        """md5s that also list the archive's."""
        return {**self.md5s, ARCHIVE: calculate_md5(self.archive)}


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> SmallSet:
    root = tmp_path_factory.mktemp("small_cifar")
    folder = root / "folder_mirror" / FOLDER
    write_small_folder(folder)
    archive = make_archive(folder, root / "archive_mirror" / ARCHIVE)
    md5s = {name: calculate_md5(folder / name) for name in NAMES}
    assert len(set(md5s.values())) == len(NAMES)
    return SmallSet(folder, folder.parent, archive.parent, archive, md5s, write_md5sums(folder, archive))


@pytest.fixture(autouse=True)
def no_injected_md5s(monkeypatch):
    """md5s=None means the official table here, whatever the calling shell exports."""
    monkeypatch.delenv(MD5SUMS_ENV, raising=False)


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """An HTTP server for everything under pytest's temporary folders: path -> its URL."""
    root = tmp_path_factory.getbasetemp()
    handler = functools.partial(QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield lambda path: f"http://127.0.0.1:{server.server_port}/{Path(path).relative_to(root).as_posix()}"
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


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


@pytest.mark.parametrize("table", ["md5s", "with_archive"])
def test_fetch_from_url(small, tmp_path, serve, table):
    url = serve(small.archive)
    dest = tmp_path / "data" / FOLDER
    source = fetch(dest, url, mirror="", md5s=getattr(small, table), progress=False)
    assert source == url
    assert_same_files(dest, small.folder)  # the downloaded archive itself is not left in dest
    assert list(dest.parent.iterdir()) == [dest]  # nor beside it, nor a staging folder


@pytest.mark.parametrize("progress", [True, False])
def test_fetch_progress_bar_only_when_asked(small, tmp_path, serve, capfd, progress):
    fetch(tmp_path / FOLDER, serve(small.archive), mirror="", md5s=small.md5s, progress=progress)
    err = capfd.readouterr().err
    assert ("100%" in err) == progress, err


def test_fetch_takes_the_mirror_from_the_environment(small, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(small.folder_mirror))
    dest = tmp_path / "data" / FOLDER
    assert fetch(dest, UNREACHABLE_URL, md5s=small.md5s, progress=False) == str(small.folder)
    assert_same_files(dest, small.folder)


def test_fetch_with_empty_mirror_env_downloads(small, tmp_path, serve, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "")
    dest = tmp_path / "data" / FOLDER
    url = serve(small.archive)
    assert fetch(dest, url, md5s=small.md5s, progress=False) == url
    assert_same_files(dest, small.folder)


@pytest.mark.parametrize("mirror", ["folder_mirror", "archive_mirror"])
def test_fetch_takes_the_md5s_from_the_environment(small, tmp_path, monkeypatch, mirror):
    monkeypatch.setenv(MD5SUMS_ENV, str(small.md5sums))
    dest = tmp_path / "data" / FOLDER
    fetch(dest, UNREACHABLE_URL, mirror=str(getattr(small, mirror)), progress=False)
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


def corrupt_source(small: SmallSet, tmp_path: Path, serve, kind: str, fault: str) -> dict:
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
    return {"url": serve(archive), "mirror": ""}


SOURCES = ["folder", "archive", "url"]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_fetch_rejects_a_damaged_file(small, tmp_path, serve, kind, fault):
    source = corrupt_source(small, tmp_path, serve, kind, fault)
    damaged = tmp_path / "src" / "mirror" / FOLDER / "data_batch_3"
    actual = calculate_md5(damaged)
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
def test_fetch_rejects_a_missing_file(small, tmp_path, serve, kind):
    source = corrupt_source(small, tmp_path, serve, kind, "missing")
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


@pytest.mark.parametrize("where", ["not_found", "refused", "file_url"])
def test_fetch_download_failure(small, tmp_path, serve, where):
    url = {"not_found": serve(tmp_path / "no_such.tar.gz"), "refused": "http://127.0.0.1:1/cifar-10-python.tar.gz",
           "file_url": small.archive.as_uri()}[where]  # torchvision downloads over http(s) only
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
def test_failed_fetch_keeps_a_previous_good_folder(small, tmp_path, serve, kind):
    # Verification happens in a staging folder before dest is touched, so a failing fetch leaves the folder of an
    # earlier good run exactly as it was (DVC removes the stage's out before it reruns anyway).
    dest = tmp_path / "out" / "data" / FOLDER
    fetch(dest, UNREACHABLE_URL, mirror=str(small.folder_mirror), md5s=small.md5s, progress=False)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    source = corrupt_source(small, tmp_path, serve, kind, "flip")
    with pytest.raises(DataError, match="^data_batch_3: md5 mismatch"):
        fetch(dest, progress=False, md5s=small.md5s, **source)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert staging_leftovers(dest) == []
    assert [p.name for p in dest.parent.iterdir()] == [FOLDER]


# ------------------------------------------------------------------------------------------- fetch: the archive


def archive_source(small: SmallSet, archive: Path, serve, kind: str) -> dict:
    """fetch's url/mirror kwargs that take `archive` (named ARCHIVE, alone in its folder) from a mirror or a URL."""
    if kind == "archive":
        return {"url": UNREACHABLE_URL, "mirror": str(archive.parent)}
    return {"url": serve(archive), "mirror": ""}


def where(kind: str, source: dict) -> str:
    """How fetch names the archive of `source`: the mirror's file, or the URL."""
    return str(Path(source["mirror"]) / ARCHIVE) if kind == "archive" else source["url"]


@pytest.fixture
def no_unpacking(monkeypatch):
    """Fail the test if anything opens a tar archive."""
    def refuse(*args, **kwargs):
        raise AssertionError("an archive was opened")
    monkeypatch.setattr(tarfile, "open", refuse)


def test_official_archive_md5_is_torchvisions():
    assert ARCHIVE == CIFAR10.filename and ARCHIVE_MD5 == CIFAR10.tgz_md5


@pytest.mark.parametrize("kind", ["archive", "url"])
def test_an_archive_with_the_wrong_md5_is_never_unpacked(small, tmp_path, serve, no_unpacking, kind):
    source = archive_source(small, small.archive, serve, kind)
    wrong = "0123456789abcdef" * 2
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, progress=False, md5s={**small.md5s, ARCHIVE: wrong}, **source)
    message = str(info.value)
    assert message.startswith(f"{where(kind, source)}: md5 mismatch: expected {wrong}, "
                              f"got {calculate_md5(small.archive)}"), message
    assert "\n" not in message
    assert_nothing_left(dest)


def test_the_official_table_takes_only_the_official_archive(small, tmp_path, no_unpacking):
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(small.archive_mirror), progress=False)
    assert str(info.value).startswith(f"{small.archive}: md5 mismatch: expected {ARCHIVE_MD5}, "), str(info.value)
    assert MD5SUMS_ENV in str(info.value)  # how to take another copy
    assert_nothing_left(dest)


def test_an_md5sums_file_can_list_the_archive(small, tmp_path, monkeypatch, no_unpacking):
    sums = tmp_path / "MD5SUMS"
    sums.write_text(small.md5sums.read_text().replace(calculate_md5(small.archive), "f" * 32))
    monkeypatch.setenv(MD5SUMS_ENV, str(sums))
    assert expected_md5s() == small.md5s  # the seven files alone
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError, match=rf"^{small.archive}: md5 mismatch: expected {'f' * 32}, "):
        fetch(dest, UNREACHABLE_URL, mirror=str(small.archive_mirror), progress=False)


def hostile_members(out: Path) -> dict[str, list[tarfile.TarInfo]]:
    """Members aimed at `out`, a folder outside the one the archive is unpacked in, holding "victim" (a file) and
    "room" (an empty folder). Relative paths climb to / first, wherever the archive is unpacked."""
    def member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, 0
        return info
    climb = "../" * 40 + out.as_posix().lstrip("/")
    return {
        "traversal": [member(f"{FOLDER}/{climb}/escaped")],
        "absolute": [member(f"{out}/escaped")],
        "symlink_absolute": [member(f"{FOLDER}/link", tarfile.SYMTYPE, f"{out}/room"),
                             member(f"{FOLDER}/link/escaped")],
        "symlink_relative": [member(f"{FOLDER}/link", tarfile.SYMTYPE, f"{climb}/room"),
                             member(f"{FOLDER}/link/escaped")],
        "hardlink": [member(f"{FOLDER}/hard", tarfile.LNKTYPE, str(out / "victim")), member(f"{FOLDER}/hard")],
        "device": [member(f"{FOLDER}/null", tarfile.CHRTYPE)],
        "fifo": [member(f"{FOLDER}/pipe", tarfile.FIFOTYPE)],
    }


HOSTILE = ["traversal", "absolute", "symlink_absolute", "symlink_relative", "hardlink", "device", "fifo"]


def hostile_archive(small: SmallSet, archive: Path, out: Path, kind: str) -> Path:
    """The small set's archive with the `kind` members appended; `out` gets its victim file and empty room."""
    out.mkdir(parents=True)
    (out / "victim").write_text("untouched")
    (out / "room").mkdir()
    archive.parent.mkdir(parents=True)
    with tarfile.open(small.archive) as good, tarfile.open(archive, "w:gz") as tar:
        for info in good.getmembers():
            tar.addfile(info, good.extractfile(info))
        for info in hostile_members(out)[kind]:
            tar.addfile(info, io.BytesIO(b"") if info.isreg() else None)
    return archive


def everything_under(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in sorted(root.rglob("*"))}


def assert_out_untouched(out: Path) -> None:
    assert everything_under(out) == {"victim": b"untouched", "room": None}


@pytest.mark.parametrize("listed", [False, True], ids=["md5_unlisted", "md5_listed"])
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_archive_writes_nothing_outside_and_is_named(small, tmp_path, kind, listed):
    # Listed or not, the archive's md5 is no defence against a hostile table: unpacking itself must be safe.
    out = tmp_path / "outside"
    archive = hostile_archive(small, tmp_path / "mirror" / ARCHIVE, out, kind)
    md5s = {**small.md5s, ARCHIVE: calculate_md5(archive)} if listed else small.md5s
    dest = tmp_path / "out" / FOLDER
    dest.parent.mkdir()
    before = everything_under(tmp_path)
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(archive.parent), md5s=md5s, progress=False)
    message = str(info.value)
    assert message.startswith(f"{archive}: unsafe member ") and "\n" not in message, message
    assert repr(hostile_members(out)[kind][0].name) in message
    assert_out_untouched(out)
    assert everything_under(tmp_path) == before  # nothing new anywhere
    assert_nothing_left(dest)


@pytest.mark.slow
def test_the_download_stage_refuses_a_hostile_archive_in_one_line(small, tmp_path):
    out = tmp_path / "outside"
    archive = hostile_archive(small, tmp_path / "mirror" / ARCHIVE, out, "symlink_absolute")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    sums = tmp_path / "MD5SUMS"  # the table lists this very archive: its md5 is no defence
    sums.write_text(small.md5sums.read_text().replace(calculate_md5(small.archive), calculate_md5(archive)))
    env = stage_env(CIFAR10_MIRROR=str(archive.parent), CIFAR10_MD5SUMS=str(sums))
    result = subprocess.run([sys.executable, str(REPO / "stages" / "download.py")], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"error: {archive}: unsafe member '{FOLDER}/link' is a symbolic link "
                                          f"(a CIFAR-10 archive holds only folders and files); nothing was kept"]
    assert_out_untouched(out)
    assert sorted(p.name for p in ws.iterdir()) == ["data", "params.yaml"] and not any((ws / "data").iterdir())


# ------------------------------------------------------------------------------------------- fetch: no room


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG in this process (Python ignores SIGXFSZ), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("kind", SOURCES)
def test_no_room_is_one_line_and_keeps_the_previous_folder(small, tmp_path, serve, kind):
    dest = tmp_path / "out" / FOLDER
    fetch(dest, UNREACHABLE_URL, mirror=str(small.folder_mirror), md5s=small.md5s, progress=False)
    before = everything_under(dest.parent)
    source = {"folder": {"url": UNREACHABLE_URL, "mirror": str(small.folder_mirror)}}.get(kind) \
        or archive_source(small, small.archive, serve, kind)
    assert os.path.getsize(small.folder / "data_batch_1") > 16_384
    with pytest.raises(DataError) as info, file_size_limit(16_384):
        fetch(dest, progress=False, md5s=small.with_archive, **source)
    assert str(info.value).startswith(f"{dest}: file too large while writing it "), str(info.value)
    assert everything_under(dest.parent) == before  # dest as it was, no staging folder


def test_a_full_disk_is_one_line(small, tmp_path, monkeypatch):
    def full(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))  # shutil names the source, not dst
    monkeypatch.setattr(shutil, "copyfile", full)
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(small.folder_mirror), md5s=small.md5s, progress=False)
    assert str(info.value).startswith(f"{dest}: no space left on device while writing it "), str(info.value)
    assert_nothing_left(dest)


# ------------------------------------------------------------------------------------------- the md5 table


def test_official_table_is_torchvisions():
    theirs = {CIFAR10.meta["filename"]: CIFAR10.meta["md5"], **dict(CIFAR10.train_list + CIFAR10.test_list)}
    assert OFFICIAL_MD5 == theirs


def test_expected_md5s_is_the_official_table_by_default():
    assert expected_md5s() == OFFICIAL_MD5
    assert list(expected_md5s()) == list(NAMES)


def test_expected_md5s_from_the_environment(small, monkeypatch):
    monkeypatch.setenv(MD5SUMS_ENV, str(small.md5sums))
    assert expected_md5s() == small.md5s  # the file also lists readme.html: names outside CIFAR-10 are left out
    assert expected_md5s(OFFICIAL_MD5) == OFFICIAL_MD5  # an explicit table wins over the environment
    monkeypatch.setenv(MD5SUMS_ENV, "")
    assert expected_md5s() == OFFICIAL_MD5


def test_md5sums_format(tmp_path):
    # md5sum writes "<md5>  <path>", or "<md5> *<path>" for files read in binary mode; the path's folders do not count.
    lines = [f"{OFFICIAL_MD5[name].upper()} *{name}" if i % 2 else f"{OFFICIAL_MD5[name]}  some/dir/{name}"
             for i, name in enumerate(NAMES)]
    path = tmp_path / "sums"
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    assert read_md5sums(path) == OFFICIAL_MD5


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "unreadable"),
    ("not an md5 line\n", "line 1 is not '<md5>  <file>'"),
    (f"{'0' * 31}  batches.meta\n", "line 1 is not"),
    (f"{'0' * 32}\n", "line 1 is not"),
    (f"{'0' * 32}  cifar-10-batches-py/batches.meta\n", "no md5 for data_batch_1, data_batch_2"),
])
def test_bad_md5sums_file(tmp_path, monkeypatch, content, fragment):
    path = tmp_path / "MD5SUMS"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(MD5SUMS_ENV, str(path))
    for call in (expected_md5s, lambda: fetch(tmp_path / "out" / FOLDER, UNREACHABLE_URL, progress=False)):
        with pytest.raises(DataError) as info:
            call()
        assert str(info.value).startswith(f"{MD5SUMS_ENV}={path}: "), str(info.value)
        assert fragment in str(info.value)
    assert not (tmp_path / "out" / FOLDER).exists()


# ------------------------------------------------------------------------------------------- reading: checks


def file_order(folder: Path, files) -> tuple[np.ndarray, np.ndarray]:
    """The batches read with plain pickle, as the format describes them: the reference for the loaders."""
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            raw = pickle.load(f, encoding="latin1")
        images.append(raw["data"].reshape(-1, 3, 32, 32))
        labels += raw["labels"]
    return np.concatenate(images), np.array(labels, dtype=np.int64)


def replaced_copy(small: SmallSet, tmp_path: Path, name: str, content: bytes | None) -> tuple[Path, dict]:
    """A copy of the small folder with `name` replaced by `content` (None: removed), and md5s that match it."""
    folder = tmp_path / "copy" / FOLDER
    shutil.copytree(small.folder, folder)
    if content is None:
        (folder / name).unlink()
        return folder, small.md5s
    (folder / name).write_bytes(content)
    return folder, {**small.md5s, name: calculate_md5(folder / name)}


def test_test_batch_layout(small):
    test = load_test_split(small.folder, md5s=small.md5s)
    with open(small.folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert test.images.shape == (PER_BATCH, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.shape == (PER_BATCH,) and test.labels.dtype == torch.int64
    assert test.images.is_contiguous()
    assert test.labels.tolist() == raw["labels"]
    # Row layout of the official files: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert np.array_equal(test.images[3, 0].numpy().ravel(), raw["data"][3, :1024])
    assert np.array_equal(test.images[3, 2, 31].numpy(), raw["data"][3, 3072 - 32:])
    assert test.classes == CLASSES


def good_dict(n: int = 4) -> dict:
    return {"data": np.zeros((n, 3072), np.uint8), "labels": list(range(n))}


# Right md5 (injected), wrong content: each must be refused with the file's path and the cause.
BAD_BATCHES = {
    "shape_n_100": ({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, "cannot reshape"),
    "dtype_float32": ({"data": np.zeros((4, 3072), np.float32), "labels": [0, 1, 2, 3]},
                      "'data' must be uint8, got float32"),
    "dtype_int64": ({"data": np.zeros((4, 3072), np.int64), "labels": [0, 1, 2, 3]}, "got int64"),
    "data_list": ({"data": [[0] * 3072] * 4, "labels": [0, 1, 2, 3]}, "'data' must be uint8"),
    "label_10": ({**good_dict(), "labels": [0, 1, 2, 10]}, "labels must lie in 0-9, found 0..10"),
    "label_negative": ({**good_dict(), "labels": [-1, 1, 2, 3]}, "labels must lie in 0-9, found -1..3"),
    "label_count": ({**good_dict(), "labels": [0, 1, 2]}, "'labels' must be 4 integers"),
    "label_floats": ({**good_dict(), "labels": [0.0, 1.0, 2.0, 3.0]}, "'labels' must be 4 integers"),
    "no_labels": ({"data": np.zeros((4, 3072), np.uint8)}, "not a CIFAR-10 batch pickle (KeyError"),
    "bytes_keys": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]},
                   "not a CIFAR-10 batch pickle (KeyError"),
    "a_list": ([np.zeros((4, 3072), np.uint8), [0, 1, 2, 3]], "not a CIFAR-10 batch pickle (TypeError"),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_a_bad_batch_with_an_injected_md5_is_refused(small, tmp_path, case):
    obj, fragment = BAD_BATCHES[case]
    folder, md5s = replaced_copy(small, tmp_path, "test_batch", pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError) as info:
        load_test_split(folder, md5s=md5s)
    assert str(info.value).startswith(f"{folder / 'test_batch'}: "), str(info.value)
    assert fragment in str(info.value)


@pytest.mark.parametrize("content", [
    pytest.param(b"GIF89a" + np.random.default_rng(7).integers(0, 256, 512, dtype=np.uint8).tobytes(), id="random"),
    pytest.param(b"", id="empty"),
    pytest.param(pickle.dumps(good_dict())[:50], id="truncated_pickle"),
    pytest.param(b"<html>404 Not Found</html>", id="html"),
])
def test_a_file_that_is_not_a_pickle_is_refused(small, tmp_path, content):
    folder, md5s = replaced_copy(small, tmp_path, "test_batch", content)
    with pytest.raises(DataError) as info:
        load_test_split(folder, md5s=md5s)
    assert str(info.value).startswith(f"{folder / 'test_batch'}: not a CIFAR-10 batch pickle")


def test_load_cifar10_names_a_bad_training_batch(small, tmp_path):
    bad = pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]})
    folder, md5s = replaced_copy(small, tmp_path, "data_batch_4", bad)
    with pytest.raises(DataError) as info:
        load_cifar10(folder, md5s=md5s)
    assert str(info.value).startswith(f"{folder / 'data_batch_4'}: not a CIFAR-10 batch pickle")


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_file_is_named(small, tmp_path, name):
    folder, md5s = replaced_copy(small, tmp_path, name, None)
    loaders = [load_cifar10] + ([load_test_split] if name in ("batches.meta",) + TEST_FILES else [])
    for load in loaders:
        with pytest.raises(DataError) as info:
            load(folder, md5s=md5s)
        assert str(info.value) == f"{name}: missing from {folder} (run the download stage)"


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_2", "test_batch"])
def test_a_file_with_the_wrong_md5_is_named(small, tmp_path, name):
    folder, _ = replaced_copy(small, tmp_path, name, (small.folder / name).read_bytes())
    flip_byte(folder / name)
    actual = calculate_md5(folder / name)
    with pytest.raises(DataError) as info:
        load_cifar10(folder, md5s=small.md5s)
    message = str(info.value)
    assert message.startswith(f"{name}: md5 mismatch in {folder}: "), message
    assert f"expected {small.md5s[name]}, got {actual}" in message


def test_reading_verifies_against_the_official_table_by_default(small):
    with pytest.raises(DataError) as info:
        load_cifar10(small.folder)
    assert str(info.value).startswith("batches.meta: md5 mismatch")
    assert f"expected {OFFICIAL_MD5['batches.meta']}" in str(info.value)
    with pytest.raises(DataError, match="^batches.meta: md5 mismatch"):
        load_test_split(small.folder)


def test_reading_takes_the_md5s_from_the_environment(small, monkeypatch):
    injected = load_cifar10(small.folder, md5s=small.md5s)
    monkeypatch.setenv(MD5SUMS_ENV, str(small.md5sums))
    data = load_cifar10(small.folder, test_limit=5)
    assert torch.equal(data.train_images, injected.train_images)
    assert torch.equal(load_test_split(small.folder).images, injected.test_images)


@pytest.mark.parametrize(("meta", "fragment"), [
    ({"label_names": list(CLASSES[:9])}, "expected 10 class names"),
    ({"label_names": [c.encode() for c in CLASSES]}, "expected 10 class names"),
    ({"names": list(CLASSES)}, "not a CIFAR-10 meta pickle (KeyError"),
    (b"junk", "not a CIFAR-10 meta pickle"),
])
def test_a_bad_meta_file_is_refused(small, tmp_path, meta, fragment):
    content = meta if isinstance(meta, bytes) else pickle.dumps(meta, protocol=2)
    folder, md5s = replaced_copy(small, tmp_path, "batches.meta", content)
    for load in (load_cifar10, load_test_split):
        with pytest.raises(DataError) as info:
            load(folder, md5s=md5s)
        assert str(info.value).startswith(f"{folder / 'batches.meta'}: "), str(info.value)
        assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------- load_cifar10


def rows(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


def test_load_cifar10_full(small):
    data = load_cifar10(small.folder, md5s=small.md5s)
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
    a = load_cifar10(small.folder, train_limit=30, test_limit=7, md5s=small.md5s)
    b = load_cifar10(small.folder, train_limit=30, test_limit=7, md5s=small.md5s)
    assert len(a.train_images) == 30 and len(a.train_labels) == 30
    assert len(a.test_images) == 7 and len(a.test_labels) == 7
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    full = load_cifar10(small.folder, md5s=small.md5s)
    all_train, all_test = rows(full.train_images), rows(full.test_images)
    # A subset is a subset (image with its own label), kept in file order, not just the first images.
    positions = [all_train.index(r) for r in rows(a.train_images)]
    assert positions == sorted(positions) and positions != list(range(30))
    assert torch.equal(full.train_labels[positions], a.train_labels)
    test_positions = [all_test.index(r) for r in rows(a.test_images)]
    assert test_positions == sorted(test_positions)
    assert torch.equal(full.test_labels[test_positions], a.test_labels)
    # A smaller limit is a prefix of the same fixed permutation: its images are among the larger subset's.
    smaller = load_cifar10(small.folder, train_limit=10, test_limit=3, md5s=small.md5s)
    assert set(rows(smaller.train_images)) <= set(rows(a.train_images))
    assert set(rows(smaller.test_images)) <= set(rows(a.test_images))


def test_load_cifar10_subsets_follow_the_split_seed(small):
    # The fixed permutation, spelled out: the first `limit` of randperm(SPLIT_SEED), in file order.
    full = load_cifar10(small.folder, md5s=small.md5s)
    data = load_cifar10(small.folder, train_limit=30, test_limit=7, val_size=11, md5s=small.md5s)
    order = torch.randperm(len(full.train_images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    assert torch.equal(data.val_images, full.train_images[order[:11].sort().values])
    assert torch.equal(data.train_images, full.train_images[order[11:41].sort().values])
    test_order = torch.randperm(len(full.test_images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    assert torch.equal(data.test_images, full.test_images[test_order[:7].sort().values])


def test_load_cifar10_limit_of_the_split_size_takes_everything_and_above_it_fails(small):
    n_train, n_test = PER_BATCH * len(TRAIN_FILES), PER_BATCH * len(TEST_FILES)
    data = load_cifar10(small.folder, train_limit=n_train, test_limit=n_test, md5s=small.md5s)
    assert (len(data.train_images), len(data.test_images)) == (n_train, n_test)
    with pytest.raises(ParamsError, match="^data.train_limit: expected at most"):
        load_cifar10(small.folder, train_limit=10_000, md5s=small.md5s)


@pytest.mark.parametrize("train_limit", [None, 10])
def test_load_cifar10_validation_is_held_out(small, train_limit):
    n_train = PER_BATCH * len(TRAIN_FILES)
    data = load_cifar10(small.folder, val_size=25, train_limit=train_limit, md5s=small.md5s)
    assert len(data.val_images) == 25 and len(data.val_labels) == 25
    assert data.val_images.dtype == torch.uint8 and data.val_labels.dtype == torch.int64
    assert len(data.train_images) == (n_train - 25 if train_limit is None else train_limit)
    train, val = set(rows(data.train_images)), set(rows(data.val_images))
    assert len(val) == 25 and not train & val  # disjoint by content
    full = load_cifar10(small.folder, md5s=small.md5s)
    all_train = rows(full.train_images)
    if train_limit is None:
        assert train | val == set(all_train)
    positions = [all_train.index(r) for r in rows(data.val_images)]
    assert torch.equal(full.train_labels[positions], data.val_labels)  # labels travel with their images
    # The held-out images are the same on every call and do not depend on the limits.
    again = load_cifar10(small.folder, val_size=25, train_limit=5, test_limit=3, md5s=small.md5s)
    assert torch.equal(again.val_images, data.val_images)
    # The test split is untouched by val_size.
    assert torch.equal(data.test_images, full.test_images)


@pytest.mark.parametrize("val_size", [PER_BATCH * len(TRAIN_FILES), PER_BATCH * len(TRAIN_FILES) + 1, 10**6])
def test_load_cifar10_val_size_too_large(small, val_size):
    with pytest.raises(DataError) as info:
        load_cifar10(small.folder, val_size=val_size, md5s=small.md5s)
    assert str(info.value).startswith(f"data.val_size ({val_size})")
    assert str(PER_BATCH * len(TRAIN_FILES)) in str(info.value)


def test_load_cifar10_largest_val_size_leaves_one_training_image(small):
    n_train = PER_BATCH * len(TRAIN_FILES)
    data = load_cifar10(small.folder, val_size=n_train - 1, md5s=small.md5s)
    assert len(data.train_images) == 1 and len(data.val_images) == n_train - 1


def test_mean_std(small):
    data = load_cifar10(small.folder, md5s=small.md5s)
    mean, std = data.mean_std()
    assert len(mean) == 3 and len(std) == 3
    assert all(isinstance(v, float) for v in mean + std)
    x = data.train_images.numpy().astype(np.float64)
    assert mean == pytest.approx(tuple(x.mean(axis=(0, 2, 3))))
    assert std == pytest.approx(tuple(x.std(axis=(0, 2, 3), ddof=1)))
    assert all(100 < m < 155 for m in mean) and all(60 < s < 90 for s in std)  # uniform bytes: 127.5 and 73.9
    # Statistics of the training split only.
    held_out = load_cifar10(small.folder, val_size=50, md5s=small.md5s).mean_std()
    assert held_out != (mean, std)


# ------------------------------------------------------------------------------------------- load_test_split


@pytest.mark.parametrize("test_limit", [None, 7, 1, PER_BATCH])
def test_load_test_split_is_load_cifar10s_test_split(small, test_limit):
    test = load_test_split(small.folder, test_limit, md5s=small.md5s)
    data = load_cifar10(small.folder, train_limit=13, test_limit=test_limit, val_size=9, md5s=small.md5s)
    assert isinstance(test, Cifar10Test)
    assert torch.equal(test.images, data.test_images) and torch.equal(test.labels, data.test_labels)
    assert test.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert test.classes == data.classes == CLASSES
    assert len(test.images) == (test_limit or PER_BATCH)


def test_load_test_split_reads_only_the_test_batch(small, tmp_path):
    folder = tmp_path / FOLDER
    folder.mkdir()
    for name in ("batches.meta",) + TEST_FILES:
        shutil.copyfile(small.folder / name, folder / name)
    test = load_test_split(folder, test_limit=5, md5s=small.md5s)
    assert torch.equal(test.images, load_test_split(small.folder, test_limit=5, md5s=small.md5s).images)
    with pytest.raises(DataError, match="^data_batch_1: missing from"):
        load_cifar10(folder, md5s=small.md5s)


# ------------------------------------------------------------------------------------------- the real files

REAL_MIRROR = os.environ.get(MIRROR_ENV)


@pytest.fixture
def real_mirror() -> Path:
    if not REAL_MIRROR:
        pytest.skip(f"${MIRROR_ENV} is not set (CI points it at the real CIFAR-10 files)")
    return Path(REAL_MIRROR)


def real_folder(mirror: Path) -> Path:
    folder = mirror / FOLDER if (mirror / FOLDER).is_dir() else mirror
    if not all((folder / name).is_file() for name in OFFICIAL_MD5):
        pytest.skip(f"{mirror} holds no unpacked {FOLDER}")
    return folder


def test_real_fetch_and_load(real_mirror, tmp_path):
    dest = tmp_path / "data" / FOLDER
    source = fetch(dest, UNREACHABLE_URL, mirror=str(real_mirror), progress=False)  # the official table
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
    x, y = file_order(dest, TEST_FILES)
    assert np.array_equal(data.test_images.numpy(), x) and np.array_equal(data.test_labels.numpy(), y)


def test_real_md5sums_file_is_the_official_table(real_mirror):
    if not (real_mirror / "MD5SUMS").is_file():
        pytest.skip(f"{real_mirror} holds no MD5SUMS")
    assert read_md5sums(real_mirror / "MD5SUMS") == OFFICIAL_MD5


# sha256 of the six tensors (train, val, test images and labels) for (train_limit, test_limit, val_size): every
# training run is compared byte for byte with earlier ones, so the cuts must never move.
REAL_SPLIT_DIGESTS = {
    (None, None, 0): "9048fcbac9c08a64d57a7c5a5a66750a974ad4eab380914df129f7e223d823df",
    (1024, 512, 0): "d3a7e54c5d57622ac0c1bd437766a0018c5f7daf6c0891926f6d056bc330b9b1",
    (3000, 777, 123): "ca45b8591a3e564db87b8a766f7080c77d575efe81dca3f909d300ad4304a4cf",
}


@pytest.mark.parametrize("limits", REAL_SPLIT_DIGESTS)
def test_real_splits_are_byte_identical(real_mirror, limits):
    folder = real_folder(real_mirror)
    train_limit, test_limit, val_size = limits
    data = load_cifar10(folder, train_limit, test_limit, val_size)
    fields = (data.train_images, data.train_labels, data.val_images, data.val_labels, data.test_images,
              data.test_labels)
    assert hashlib.sha256(b"".join(t.numpy().tobytes() for t in fields)).hexdigest() == REAL_SPLIT_DIGESTS[limits]
    test = load_test_split(folder, test_limit)
    assert torch.equal(test.images, data.test_images) and torch.equal(test.labels, data.test_labels)


def test_real_mirror_with_a_flipped_byte(real_mirror, tmp_path):
    real = real_folder(real_mirror)
    # The copy: data_batch_3 is a real copy with one byte flipped; the other six link to the real files.
    folder = tmp_path / "mirror" / FOLDER
    folder.mkdir(parents=True)
    for name in OFFICIAL_MD5:
        if name == "data_batch_3":
            shutil.copyfile(real / name, folder / name)
            flip_byte(folder / name)
        else:
            (folder / name).symlink_to((real / name).resolve())
    actual = hashlib.md5((folder / "data_batch_3").read_bytes()).hexdigest()
    assert actual != OFFICIAL_MD5["data_batch_3"]
    dest = tmp_path / "out" / FOLDER
    with pytest.raises(DataError) as info:
        fetch(dest, UNREACHABLE_URL, mirror=str(folder.parent), md5s=OFFICIAL_MD5, progress=False)
    message = str(info.value)
    assert "data_batch_3" in message
    assert OFFICIAL_MD5["data_batch_3"] in message and actual in message
    assert_nothing_left(dest)
