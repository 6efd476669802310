"""One writer per output folder: ``output_lock`` is held by ``save_starquant`` from its checks
to the final rename, and by ``starquant quantize`` from before loading the model, so a second
save to the same folder is refused at start, naming the process that holds it, instead of
both reporting success and the first result being silently replaced.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from starquant_plugin.integrations.output_dirs import OutputDirError, real_output_dir

try:
    import fcntl
except ImportError:  # Windows: no flock; saves run unlocked there (vLLM and the CLI are POSIX)
    fcntl = None

logger = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}
"""Lock files this process holds, with the thread holding each (the CLI takes the lock before
loading and ``save_starquant`` takes it again: the inner one is a no-op)."""
_HELD_GUARD = threading.Lock()


def _lock_path(real: Path) -> Path:
    return real.parent / f".{real.name}.lock"


def _holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    host = "" if holder.get("host") in (None, socket.gethostname()) else (
        f" on {holder['host']}")
    return (f"pid {holder.get('pid', '?')}{host}, `{holder.get('command', '?')}`, since "
            f"{since}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _acquire(lock: Path, out_dir: str | os.PathLike) -> int | None:
    """flock on ``lock``, with who holds it written inside. Hand-written rather than
    ``filelock`` (only a transitive, unpinned dependency): filelock's Unix lock truncates the
    lock file when a second process opens it (3.x), so the refusal could not name the holder,
    and it leaves the file behind next to every checkpoint. A holder that dies, even by
    SIGKILL, loses its flock to the kernel: its lock file is stale, and the next writer takes
    it over. Returns the locked descriptor, or None where the filesystem has no locks."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"Cannot create {lock.parent} ({error.strerror}), so {out_dir} "
                             "cannot be written; pass a folder you can write to.") from error
    for _ in range(100):  # retried only when a holder deleted the file as we opened it
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputDirError(f"Cannot create the lock file {lock} ({error.strerror}), so "
                                 f"{out_dir} cannot be written; pass a folder you can write "
                                 "to.") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _holder(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                logger.warning("%s cannot be locked (%s); saving without a lock, so make sure "
                               "no other save writes %s.", lock, error.strerror, out_dir)
                return None
            raise OutputDirError(
                f"{out_dir} is being written by another save ({_describe(holder)}); a second "
                "writer would replace its result, so nothing was done. Wait for it to finish, "
                "or choose another output directory."
            ) from None
        if not _same_file(fd, lock):  # its holder released and deleted it meanwhile
            os.close(fd)
            continue
        stale = _holder(fd)
        if stale:
            logger.warning("Cleared the lock on %s left by %s, which is no longer running.",
                           out_dir, _describe(stale))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd
    raise OutputDirError(f"Could not lock {lock}: it kept being replaced; retry.")


@contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of ``out_dir`` (``.<name>.lock`` beside it, removed on release);
    yields its real path. Another process, or another thread, that holds it is refused with
    its pid and command line; taking it again in the same thread is a no-op."""
    real = real_output_dir(out_dir)
    lock = _lock_path(real)
    me = threading.get_ident()
    with _HELD_GUARD:
        holder = _HELD.get(lock)
    if holder is not None and holder != me:
        raise OutputDirError(f"{out_dir} is being written by another thread of this "
                             "process; save to another directory or wait for it.")
    if holder == me:
        yield real
        return
    fd = _acquire(lock, out_dir) if fcntl is not None else None
    with _HELD_GUARD:
        _HELD[lock] = me
    try:
        yield real
    finally:
        with _HELD_GUARD:
            del _HELD[lock]
        if fd is not None:
            lock.unlink(missing_ok=True)  # while still locked: see _same_file
            os.close(fd)
