"""The one way this project writes files and folders: beside the target, then renamed over it.

A reader (or a resumed run) sees the old file or folder, or the complete new one, never half
of one: a job killed mid-write leaves its temporary beside the target, under a name that says
whose it is, and the next writer on the same host removes it once its process is dead.

- `atomic_write(path, write)`: a file; `write(stream)` fills a temporary file, which is
  flushed to disk and renamed over `path` (over a folder too: moved aside first, as below).
- `atomic_link(target, path)`: `path` becomes a relative link to `target` the same way.
- `AtomicFolder(path)`: a folder; the caller fills `work`, then `commit()` renames it to
  `path`, replacing an old folder only at that moment. The old one is first moved aside
  (`NAME.tmp-HOST-PID-old`); if the process dies between the two renames, `recover()` puts
  it back, so the previous version is never lost. `recover_folder(folder)` does it for every
  name of a folder.

Standard library only: every layer of the package may use it (see the README's layer rule).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(stream)` into a temporary beside `path`, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        _replace(Path(temp), path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_link(target: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make `path` a relative symbolic link to `target` in one rename, over a file, link or folder."""
    path = Path(path)
    temp = path.with_name(f"{_own_prefix(path)}-link")
    _remove(temp)
    os.symlink(os.path.relpath(target, path.parent), temp)
    try:
        _replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


def _replace(new: Path, path: Path) -> None:
    """Rename `new` over `path`; a folder there (a sharded checkpoint of the same name) is first
    moved aside as AtomicFolder does, so that `recover()` restores it if the process dies."""
    if not path.is_dir() or path.is_symlink():
        os.replace(new, path)
        return
    AtomicFolder.recover(path)
    old = path.with_name(f"{_own_prefix(path)}-old")
    os.rename(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


class AtomicFolder:
    """A folder written under a temporary sibling name and renamed into place by `commit()`.

        with AtomicFolder(out) as folder:
            (folder.work / "a.txt").write_text("...")
            folder.commit()

    Leaving the block without `commit()` (an error, Ctrl-C) removes the work folder, and the
    parent folders that were created for it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.work: Path | None = None
        self._created: list[Path] = []
        self._committed = False

    def __enter__(self) -> AtomicFolder:
        self._created = [p for p in reversed(self.path.absolute().parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recover(self.path)
        self.work = Path(tempfile.mkdtemp(prefix=f"{_own_prefix(self.path)}-", dir=self.path.parent))
        os.chmod(self.work, 0o777 & ~umask())  # mkdtemp makes it private
        return self

    def commit(self) -> None:
        """Rename the finished work folder to `path`, replacing an old one only now."""
        _fsync_tree(self.work)
        old = None
        if self.path.exists() or self.path.is_symlink():
            if self.path.is_dir() and not self.path.is_symlink() and not any(self.path.iterdir()):
                self.path.rmdir()
            else:
                old = self.path.with_name(f"{_own_prefix(self.path)}-old")
                os.rename(self.path, old)
        try:
            os.rename(self.work, self.path)
        except OSError:
            if old is not None:
                os.rename(old, self.path)
            raise
        self._committed = True
        if old is not None:
            _remove(old)

    def __exit__(self, *exc) -> None:
        if self._committed:
            return
        shutil.rmtree(self.work, ignore_errors=True)
        for folder in reversed(self._created):  # deepest first; only the ones still empty
            try:
                folder.rmdir()
            except OSError:
                break

    @staticmethod
    def recover(path: str | os.PathLike) -> None:
        """Undo what a killed writer left: restore a moved-aside old version, drop dead work folders."""
        path = Path(path)
        prefix = f"{path.name}.tmp-"
        host = socket.gethostname()
        for leftover in sorted(path.parent.glob(glob.escape(prefix) + "*")):
            parts = leftover.name[len(prefix) :].rsplit("-", 2)  # HOST-PID-SUFFIX; a host name may hold "-"
            if len(parts) < 3 or parts[0] != host or not parts[1].isdigit() or _alive(int(parts[1])):
                continue  # another host's, or a live writer's
            if parts[-1] == "old" and not path.exists():
                with contextlib.suppress(FileNotFoundError):  # another rank of this job restored it first
                    os.rename(leftover, path)  # died between moving the old version aside and the rename
            else:
                _remove(leftover)


def recover_folder(folder: str | os.PathLike) -> None:
    """`recover()` every name in `folder` that a killed writer left something beside (a resume
    may never save that name again: a killed run's `checkpoint_step_N.ckpt` work folder)."""
    for leftover in sorted(Path(folder).glob("*.tmp-*")):
        AtomicFolder.recover(leftover.with_name(leftover.name.rsplit(".tmp-", 1)[0]))


def _own_prefix(path: Path) -> str:
    return f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _fsync_tree(folder: Path) -> None:
    """Flush every file of the folder to disk before it is renamed into place."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
