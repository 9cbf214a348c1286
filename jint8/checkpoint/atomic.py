"""Atomic publication of a directory (a jint8 checkpoint, a bitsandbytes export): written into a
hidden staging sibling, then renamed (or swapped) onto the destination.

Staging directories are named `.NAME.jint8-staging-<host>-<pid>-<random>`, so the next writer to
the same parent can tell a dead writer's leftovers (same host, pid no longer running: removed)
from a live one's (kept).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pathlib
import shutil
import socket
import sys
import uuid
import zlib
from typing import Callable, Iterator

from jint8.checkpoint.metadata import _PREVIOUS_MARK, _STAGING_MARK
from jint8.errors import CheckpointError, CheckpointExistsError, Jint8Error

logger = logging.getLogger(__name__)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths in one step with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _host_tag() -> str:
    # a short stable tag: pids are only meaningful on the host that wrote them
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _staging_name(target: pathlib.Path) -> str:
    return f".{target.name}{_STAGING_MARK}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def clean_stale_staging(parent: pathlib.Path) -> list[pathlib.Path]:
    """Remove staging directories in parent left by dead writers of this host; report the others
    that cannot be attributed (other hosts, older names). Returns the removed paths."""
    removed, unknown = [], []
    if not parent.is_dir():
        return removed
    host = _host_tag()
    for entry in parent.iterdir():
        if not entry.name.startswith(".") or _STAGING_MARK not in entry.name or not entry.is_dir():
            continue
        fields = entry.name.rsplit(_STAGING_MARK, 1)[1].split("-")
        if len(fields) == 3 and fields[0] == host and fields[1].isdigit():
            if not _pid_alive(int(fields[1])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        elif not (len(fields) == 3 and fields[1].isdigit()):
            unknown.append(entry)
    if removed:
        logger.warning("removed %d staging directories of interrupted saves: %s", len(removed),
                       ", ".join(p.name for p in removed))
    if unknown:
        logger.warning("%s holds %d staging directories of interrupted saves whose writer is unknown "
                       "(remove them if no save is running): %s", parent, len(unknown),
                       ", ".join(p.name for p in unknown))
    return removed


def check_writable(parent: pathlib.Path, what: str) -> None:
    """Create parent and prove it writable by making (and removing) a directory in it, so a
    read-only target is refused before any long loading."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jint8-probe"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise CheckpointError(f"{what}: cannot write to {parent}: {e.strerror or e}") from None


def _carry_over(old: pathlib.Path, new: pathlib.Path, owned: Callable[[str], bool]) -> list[str]:
    """Copy entries of the directory being replaced that the new one lacks and that are not the
    writer's own (owned(name)), so that replacing never silently deletes a user's files."""
    kept = []
    for entry in old.iterdir():
        if owned(entry.name) or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)
        kept.append(entry.name)
    return kept


def _publish(staged: pathlib.Path, target: pathlib.Path) -> None:
    """Move a finished directory onto target; an old one stays in place until the last step."""
    if not target.exists():
        os.rename(staged, target)
    elif not _exchange(staged, target):
        # Two renames: a crash between them leaves the old directory at the "previous" sibling.
        previous = target.with_name(f".{target.name}{_PREVIOUS_MARK}{uuid.uuid4().hex[:8]}")
        os.rename(target, previous)
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(previous, target)  # put the old directory back before reporting the failure
            raise
        shutil.rmtree(previous)
    # After an exchange the old directory sits at `staged`; the caller removes the staging dir.


@contextlib.contextmanager
def staged_directory(target: pathlib.Path, what: str, owned: Callable[[str], bool]) -> Iterator[pathlib.Path]:
    """Yield a path (not yet created) to write the new directory at; on success it replaces target atomically (entries
    of an old target that owned() does not claim are carried over). On any failure the staging
    directory is removed and an OSError becomes one CheckpointError naming target."""
    parent = target.parent
    check_writable(parent, what)
    clean_stale_staging(parent)
    staging = parent / _staging_name(target)
    staging.mkdir()
    try:
        content = staging / "content"  # created by the writer (Orbax wants to create its own)
        yield content
        if target.is_dir() and not target.is_symlink():
            kept = _carry_over(target, content, owned)
            if kept:
                logger.info("%s: kept %s from the directory it replaces", target, kept)
        _publish(content, target)
    except Jint8Error:
        raise
    except OSError as e:
        raise CheckpointError(f"{what}: writing {target} failed: {_os_message(e)}") from None
    finally:
        # Partial data of a failed write, or the replaced directory after a swap. Best effort: a
        # failure to clean up must not hide the exception that is propagating.
        shutil.rmtree(staging, ignore_errors=True)


def _os_message(error: OSError) -> str:
    if error.errno is not None and error.strerror:
        name = f" ({error.filename})" if error.filename else ""
        return f"[{errno.errorcode.get(error.errno, error.errno)}] {error.strerror}{name}"
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__


def refuse_foreign_directory(target: pathlib.Path, overwrite: bool, is_ours: Callable[[pathlib.Path], bool],
                             what: str) -> None:
    """Raise CheckpointExistsError if target exists and may not be replaced."""
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise CheckpointExistsError(f"{target} already exists; overwrite=True (CLI: --overwrite) replaces it")
    if target.is_dir() and not target.is_symlink() and (is_ours(target) or not any(target.iterdir())):
        return
    # Never delete a path that is not ours: a typo must not wipe a model directory.
    raise CheckpointExistsError(f"{target} exists and is not {what}; remove it yourself to write here")
