"""Fetching CIFAR-10: a local mirror ($CIFAR10_MIRROR) or the official archive -> the verified folder.

torchvision downloads the archive (`download_url`); tarfile unpacks it, once its md5 is checked, under a filter that
keeps every member inside the folder. Everything happens in a hidden sibling of the folder that is renamed into place
once every file's md5 is right, so a failure (a bad archive, a hostile member, a full disk) leaves no partial output.
`fetch` is the download stage's work; the other stages read the folder with `cifar_resnet.data`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import zlib
from pathlib import Path

from torchvision.datasets.utils import download_url

from cifar_resnet.data import (ARCHIVE, FILES, FOLDER, MD5SUMS_ENV, MIRROR_ENV, expected_md5s_and_archive,
                               verify)
from cifar_resnet.errors import NO_ROOM, DataError


def fetch(dest: str | Path, url: str, mirror: str | None = None, md5s: dict[str, str] | None = None,
          progress: bool = True) -> str:
    """Write the verified CIFAR-10 folder to `dest` and return a description of where it came from.

    `mirror` (default: $CIFAR10_MIRROR) is a local folder holding `cifar-10-batches-py/`, the archive, or the files
    themselves; without it the archive is downloaded from `url`. An archive's md5 is checked before it is unpacked
    (see `data.expected_md5s_and_archive`), and no member may land outside the folder it is unpacked in. Every file's
    md5 is checked against `data.expected_md5s(md5s)`; on any failure, running out of disk space included, `dest` is
    left as it was and nothing else remains beside it.
    """
    dest, (md5s, archive_md5) = Path(dest), expected_md5s_and_archive(md5s)
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    with _room_for(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Everything (download, unpacking, verification) happens in a hidden sibling that is renamed into place.
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
        try:
            found, source = _gather(staging, url, mirror, archive_md5, progress)
            verified = staging / "verified"
            verified.mkdir()
            for name, expected in md5s.items():
                verify(found, name, expected, source)
                os.replace(found / name, verified / name)  # only the seven files: the archive also holds a readme
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(verified, dest)
            return source
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _room_for(dest: Path):
    """Turn running out of room while fetching into one line naming `dest` and the cause."""
    try:
        yield
    except OSError as exc:
        if not _no_room(exc):
            raise
        cause = os.strerror(exc.errno)
        raise DataError(f"{dest}: {cause[0].lower()}{cause[1:]} while writing it (fetching CIFAR-10 takes up to "
                        f"about 360 MB in {dest.parent}); {dest} was left as it was") from None


def _no_room(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_ROOM  # not the source's fault


def _gather(staging: Path, url: str, mirror: str | None, archive_md5: str | None,
            progress: bool) -> tuple[Path, str]:
    """Put the files into a folder under `staging`; return that folder and where the files came from."""
    if not mirror:
        archive = staging / ARCHIVE
        _download(url, archive, progress)
        return _unpack(archive, staging, url, archive_md5), url
    root = Path(mirror)
    if not root.is_dir():
        raise DataError(f"{MIRROR_ENV}={mirror}: not a folder")
    for folder in (root / FOLDER, root):
        if all((folder / name).is_file() for name in FILES):
            # A copy, verified below: the mirror's files could change between the check and the copy.
            copy = staging / FOLDER
            copy.mkdir()
            for name in FILES:
                shutil.copyfile(folder / name, copy / name)
            return copy, str(folder)
    if (root / ARCHIVE).is_file():
        return _unpack(root / ARCHIVE, staging, str(root / ARCHIVE), archive_md5), str(root / ARCHIVE)
    missing = [name for name in FILES if not (root / FOLDER / name).is_file()]
    raise DataError(f"{', '.join(missing)}: missing from {root / FOLDER} (and no {ARCHIVE} in {root})")


def _download(url: str, archive: Path, progress: bool) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):  # torchvision's downloader needs an HTTP reply
        raise DataError(f"{url}: download failed (not an http or https URL); for a local copy of the archive or "
                        f"the files, point {MIRROR_ENV} at its folder")
    # torchvision's download bar cannot be switched off: without a terminal to draw on it goes to /dev/null.
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sys.stderr if progress else sink):
            download_url(url, str(archive.parent), archive.name)
    except (OSError, ValueError, RuntimeError, http.client.HTTPException) as exc:
        if _no_room(exc):
            raise  # _room_for says so: the download itself went well
        raise DataError(f"{url}: download failed ({exc}); offline, point {MIRROR_ENV} at a local copy") from None


def _unpack(archive: Path, staging: Path, source: str, md5: str | None) -> Path:
    """Extract `archive` under `staging`, after checking its md5 if there is one to check; return the folder its
    CIFAR-10 files should be in. Hash and extraction read the same open file: a swap in between changes nothing."""
    if not hasattr(tarfile, "data_filter"):  # Python before 3.10.12 / 3.11.4
        raise DataError(f"{source}: unpacking an archive safely needs Python 3.10.12, 3.11.4 or later; unpack it "
                        f"yourself and point {MIRROR_ENV} at the folder")
    target = staging / "unpacked"
    try:
        with open(archive, "rb") as file:
            if md5 is not None:
                _check_archive_md5(file, md5, source)
                file.seek(0)
            with tarfile.open(fileobj=file) as tar:
                tar.extractall(target, filter=_cifar_member)
    except tarfile.FilterError as exc:
        raise DataError(f"{source}: unsafe member {exc} (a CIFAR-10 archive holds only folders and files); "
                        f"nothing was kept") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if _no_room(exc):
            raise  # _room_for says so: the archive is fine
        raise DataError(f"{source}: not a readable CIFAR-10 archive ({exc})") from None
    return target / FOLDER


def _check_archive_md5(file, expected: str, source: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    while chunk := file.read(1 << 20):
        digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(f"{source}: md5 mismatch: expected {expected}, got {digest.hexdigest()}; nothing was "
                        f"unpacked (the archive is truncated, altered or not the official {ARCHIVE}; another "
                        f"CIFAR-format copy needs its md5 in ${MD5SUMS_ENV})")


class _Unsafe(tarfile.FilterError):
    def __init__(self, member: tarfile.TarInfo, why: str):
        super().__init__(f"{member.name!r} {why}")
        self.tarinfo = member


def _cifar_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (nothing outside `dest`, no device, no link pointing out), stricter still: links
    are refused too (no member can then be written through one), and so are absolute names, which "data" would
    quietly make relative. The official archive holds folders and regular files only."""
    if member.issym() or member.islnk():
        raise _Unsafe(member, "is a symbolic link" if member.issym() else "is a hard link")
    if not (member.isreg() or member.isdir()):
        raise _Unsafe(member, "is a device or a FIFO")
    if member.name.startswith("/"):
        raise _Unsafe(member, "has an absolute path")
    return tarfile.data_filter(member, dest)
