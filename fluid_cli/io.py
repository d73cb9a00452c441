"""Atomic writes: an output is either absent or complete, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    existing `path` is moved aside first and deleted only after the new folder is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(path)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=f"{STAGING_PREFIX}{os.getpid()}."))
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
    for stale in folder.glob(f"{STAGING_PREFIX}*"):
        pid = stale.name[len(STAGING_PREFIX):].split(".")[0]
        if stale.name != READY_NAME and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


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
