"""Outputs: atomic writes (an output is either absent or complete, never half-written) and the discipline every
command that writes shares.

- `check_output_dir` / `check_output_file`: before any work, fail on an output that cannot be written (a file
  where a folder is expected, a read-only location) or, without `--overwrite`, one that exists;
- `output_lock`: one writer per output folder at a time (a second one fails at once with one line);
- staging: hidden temporary files and folders are named `.<name>.<pid>.*`, removed on any error (SIGINT too) and,
  after a kill, by the next run writing the same output (`remove_stale`);
- `disk_full_is_an_error`: a write that fails on a full disk becomes one line that says so;
- `require_stdout`: a command whose output goes to stdout fails at once when stdout is closed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from fluid_cli.errors import FluidError


def read_text(path: Path, what: str) -> str:
    """A small text file as UTF-8 (a byte-order mark, which editors on Windows write, is not part of the text);
    otherwise one line naming the file, the line, and what to save it as."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FluidError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename it into place. `durable`:
    the bytes reach the disk before the rename, so that a crash of the machine cannot leave an empty file under
    the final name (what a cache that later runs trust needs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any, durable: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", durable)


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` to produce a file, then rename it to `path` (for writers that want a path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success it replaces `path` in one rename.

    On error the temporary folder is removed and `path` is left as it was. When `overwrite` is true an
    existing `path` is moved aside first (to `.<name>.old`) and deleted only after the new folder is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=staging_prefix(f".{path.name}."), suffix=".tmp"))
    try:
        os.chmod(tmp, folder_mode())  # mkdtemp makes it 0700; the output is an ordinary folder
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(path)
        old = _old_name(path)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def folder_mode() -> int:
    """The mode `mkdir` gives a new folder (0777 less the umask, 0755 as a rule): every output folder gets it, also
    one staged through `mkdtemp` (0700) and renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def recover_dir(path: str | Path) -> None:
    """Tidy what killed writers of the folder `path` left beside it: put back the previous folder when a kill came
    between `atomic_dir`'s two renames, and remove staging folders of processes that are gone."""
    path = Path(path)
    old = _old_name(path)
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    remove_stale(path.parent, f".{path.name}.")


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


@contextmanager
def staging_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A hidden scratch folder `<parent>/<prefix><pid>.*`, removed afterwards (also on an error or SIGINT); those
    that killed processes left behind are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, prefix)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=staging_prefix(prefix)))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def staging_prefix(prefix: str) -> str:
    """`<prefix><pid>.`: staging names carry the writer's process id, so that `remove_stale` knows them."""
    return f"{prefix}{os.getpid()}."


def remove_stale(folder: str | Path, prefix: str) -> None:
    """Remove the items `<prefix><pid>.*` in `folder` whose process is gone (a kill left them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for item in folder.glob(f"{prefix}*"):
        pid = item.name[len(prefix):].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- file sets

STAGING_PREFIX = ".staging."
READY_NAME = ".staging.ready"


def replace_files(folder: str | Path, write: Callable[[Path], None], last: str) -> None:
    """Replace a set of files in `folder` so that it always holds one complete set, even across a kill.

    `write(stage)` writes the new files (and folders) into a hidden staging folder inside `folder`, `last`
    among them: the file whose presence says the set is complete (a model folder's `fluid.json`). The staging
    folder is then renamed `.staging.ready` in one step; its items replace the folder's, with `last` removed
    first and moved in last. A kill before the rename leaves the old set untouched (its stale staging folder is
    removed by the next `recover_files`); a kill while moving leaves `.staging.ready`, which `recover_files`
    finishes. Readers call `recover_files` first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover_files(folder, last)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=staging_prefix(STAGING_PREFIX)))
    try:
        write(stage)
        if not (stage / last).exists():
            raise RuntimeError(f"replace_files: the writer did not produce {last}")
        os.replace(stage, folder / READY_NAME)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _move_ready(folder, last)


def recover_files(folder: str | Path, last: str) -> None:
    """Finish a replacement that a kill interrupted, and remove staging folders of processes that are gone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if (folder / READY_NAME / last).exists():
        _move_ready(folder, last)
    elif (folder / READY_NAME).exists():  # moved but not yet removed
        shutil.rmtree(folder / READY_NAME, ignore_errors=True)
    remove_stale(folder, STAGING_PREFIX)


def _move_ready(folder: Path, last: str) -> None:
    ready = folder / READY_NAME
    (folder / last).unlink(missing_ok=True)  # the folder is incomplete until `last` is back
    for item in sorted(ready.iterdir()):
        if item.name == last:
            continue
        target = folder / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    os.replace(ready / last, folder / last)
    shutil.rmtree(ready, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# --------------------------------------------------------------------------------------------- output locations

LOCK_NAME = ".fluid.lock"


def check_output_dir(path: str | Path, key: str) -> None:
    """Fail now, before any work, when `path` cannot become (or be replaced by) a folder of outputs: a file is in
    its way, or the nearest existing folder cannot be written. `key` is how the user named it (`[train]
    output_dir`, `--out`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FluidError(f"{path}: a file, where an output folder is expected; remove it or choose another {key}")
    _check_writable(path if path.is_dir() else path.parent, path, key)


def check_output_file(path: str | Path, key: str, overwrite: bool) -> None:
    """Fail now, before any work, when the file `path` cannot be written, or exists and `overwrite` is off."""
    path = Path(path)
    if path.is_dir():
        raise FluidError(f"{path}: a folder, where an output file is expected; name a file for {key}")
    if path.exists() and not overwrite:
        raise FluidError(f"{path}: exists; pass --overwrite to replace it")
    _check_writable(path.parent, path, key)


def _check_writable(folder: Path, path: Path, key: str) -> None:
    """`folder` (or, when it does not exist yet, its nearest existing parent) must take new files."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FluidError(f"{path}: {existing} is a file, so no folder can be made there; choose another {key}")
    reason = None
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "permission denied"
    else:
        try:  # a read-only mount or a full disk passes the permission check
            fd, probe = tempfile.mkstemp(dir=existing, prefix=staging_prefix(".fluid-probe."))
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            reason = e.strerror
    if reason is not None:
        raise FluidError(f"{path}: cannot write to {existing} ({reason}); choose another {key} or make it writable")


def locked_by(folder: str | Path) -> str | None:
    """The process id holding `output_lock` on `folder`, if one does (a look, without taking the lock)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # closing releases a lock it took
    return None


@contextmanager
def output_lock(folder: str | Path, key: str, beside: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the output folder `folder` (a `.fluid.lock` file in it, holding the writer's pid)
    while writing; a second writer fails at once. The lock goes with the process, however it ends; on a normal
    exit the lock file is removed, and so is the folder if the lock made it and nothing else was written.
    `beside`: for a folder replaced whole (`atomic_dir`), the lock file sits next to it, `.<name>.fluid.lock`."""
    folder = Path(folder)
    home = folder.parent if beside else folder
    created = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    path = home / (f".{folder.name}{LOCK_NAME}" if beside else LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FluidError(f"{folder}: another fluid process (pid {holder}) is writing to this folder; wait for it "
                             f"to finish, or choose another {key}") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file while we waited for it: lock the one now there
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: whoever locks next makes a new file
        os.close(fd)
        if created:
            with suppress(OSError):  # not empty: it holds outputs
                home.rmdir()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------- disk full

LOW_SPACE = 16 << 20  # free bytes under which a failed write is taken for a full disk


def is_disk_full(e: BaseException, folder: str | Path) -> bool:
    """Whether `e` is a write that failed for lack of space in `folder`: an ENOSPC anywhere in its chain, or an
    error without an errno (torch's writer says "unexpected pos ...") while the disk is (nearly) full."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return isinstance(e, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def disk_full_error(folder: str | Path, cleaned: str) -> FluidError:
    return FluidError(f"{folder}: the disk is full (no space left to write); {cleaned}; free some space and run "
                      "again")


@contextmanager
def disk_full_is_an_error(folder: str | Path, cleaned: str = "the partial output was removed") -> Iterator[None]:
    """Turn a write that fails for lack of space under `folder` into one line (the writers inside remove their
    partial files on any error, before this sees it)."""
    try:
        yield
    except FluidError:
        raise
    except (OSError, RuntimeError) as e:
        existing = Path(folder)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if is_disk_full(e, existing):
            raise disk_full_error(folder, cleaned) from None
        raise


# --------------------------------------------------------------------------------------------- stdout


def require_stdout(what: str) -> None:
    """Fail before any work when stdout is closed (`>&-`): `what` would be written nowhere."""
    if sys.stdout is None or sys.stdout.closed:
        raise FluidError(f"stdout is closed, so {what} would be lost; redirect it to a file or a pipe instead")
