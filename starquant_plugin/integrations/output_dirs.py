"""Where a checkpoint is written, and how, so that no save destroys a user's data.

``save_starquant`` (and ``starquant quantize``, before any slow step) checks the output folder
(``check_output_dir``): not a file, not the current folder or the root, not the folder the
model is read from, nor inside or above it, empty unless ``overwrite``, holding only checkpoint
files if replaced (``output_lock`` keeps a second writer out meanwhile). A symlinked folder is
written through: the checkpoint is assembled beside the link's target and renamed onto it.

A replace is two renames: the old folder aside to ``.<name>.old-<pid>-<id>``, the new one
(``.<name>.tmp-<pid>-<id>``) into place; then the old one is renamed to ``.<name>.del-...`` and
deleted. A kill between the renames leaves the old checkpoint under its ``.old`` name; every
command that touches the folder explains it (``explain_interrupted_replace``) and
``restore_interrupted_save`` puts it back.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
import uuid
from pathlib import Path

from starquant_plugin.integrations.integrity import is_checkpoint_file

logger = logging.getLogger(__name__)

_TMP, _OLD, _DEL = "tmp", "old", "del"
"""Sibling directories of an atomic save: ``.<name>.tmp-<pid>-<id>`` (being written),
``.<name>.old-<pid>-<id>`` (the previous checkpoint, while it is being replaced) and
``.<name>.del-<pid>-<id>`` (the previous checkpoint, being deleted)."""

_RESTORE = "starquant_plugin.integrations.saving.restore_interrupted_save"


class OutputDirError(ValueError):
    """An output folder that cannot be written safely: the message says why and the fix."""


class InterruptedReplaceError(FileNotFoundError):
    """The folder is missing because a save was killed while replacing it; its previous
    checkpoint sits beside it under ``.<name>.old-*`` (the message says how to restore it)."""


def real_output_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` with symlinks resolved: a symlinked output is written through (its target
    gets the checkpoint, the link stays a link), and a link and its target share one lock."""
    return Path(os.path.realpath(Path(out_dir).expanduser()))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _shown(path: Path) -> str:
    return shlex.quote(str(path))


# the checks


def _check_not_degenerate(path: Path, real: Path) -> None:
    """The current folder, one above it, the root or a mount point cannot be renamed over."""
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:
        cwd = None
    example = path / "checkpoint"
    if real.parent == real:
        raise OutputDirError(f"{path} is the filesystem root; a checkpoint is a new folder. "
                             f"Pass a folder path such as {example}.")
    if cwd is not None and (real == cwd or real in cwd.parents):
        which = "the current directory" if real == cwd else "a parent of the current directory"
        raise OutputDirError(
            f"{str(path) or '.'} is {which}; a checkpoint is written beside its folder and "
            "renamed into place, which cannot be done to the folder you are in. Pass a new "
            f"folder, e.g. {example}.")
    if os.path.ismount(real):
        raise OutputDirError(f"{path} is a mount point, which cannot be replaced by a rename; "
                             f"pass a folder inside it, e.g. {example}.")
    ancestor = _existing_ancestor(real.parent)
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{ancestor} is a file, so {path} cannot be created inside "
                                 "it; nothing was written. Pass a path under a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(f"{ancestor} is not writable by this user, so {path} cannot be "
                             "written there; nothing was written. Pass a folder you can write "
                             "to.")


def check_not_overlapping(out_dir: str | os.PathLike, source: str | os.PathLike) -> None:
    """Refuse an ``out_dir`` that is the folder ``source`` (the model being read), inside it,
    or above it: replacing it would delete the model, and a checkpoint nested in the model's
    folder would be deleted, copied or uploaded with it."""
    out, model = real_output_dir(out_dir), real_output_dir(source)
    example = model.parent / f"{model.name}-starquant"
    if out == model:
        what = "is"
    elif model in out.parents:
        what = "is inside"
    elif out in model.parents:
        what = "contains"
    else:
        return
    raise OutputDirError(f"The output folder {out_dir} {what} the folder the model is read "
                         f"from ({source}); saving there could delete or bury the model, so "
                         f"nothing was written. Save beside it, e.g. {example}.")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *,
                     reading: str | os.PathLike | None = None,
                     overwrite_option: str | None = "overwrite=True") -> Path:
    """Refuse an ``out_dir`` that ``save_starquant`` would refuse, e.g. before a long
    calibration; returns it as given. Refused: the current folder, the root or a mount point; a
    path under a file or an unwritable folder; ``reading`` (the folder the model is read from),
    a folder inside it or above it; a file; a folder missing because an overwrite of it was
    interrupted (``explain_interrupted_replace``); a folder holding files (unless
    ``overwrite``); and, with ``overwrite``, one that also holds files that are not part of a
    checkpoint (they would be deleted with it). ``overwrite_option``: how the caller's user
    spells ``overwrite`` (the CLI: ``--overwrite``; None where it has no such option), for
    the messages."""
    path = Path(out_dir)
    real = real_output_dir(path)
    _check_not_degenerate(path, real)
    if reading is not None and Path(reading).exists():
        check_not_overlapping(path, reading)
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(
            f"{path} is a file, not a directory; nothing was written. Pass a directory path "
            "to save into."
        )
    explain_interrupted_replace(path)
    entries = sorted(real.iterdir()) if real.is_dir() else []
    if entries and not overwrite:
        what = "a model" if any(is_checkpoint_file(e) for e in entries) else "files"
        replace = f"Pass {overwrite_option} to replace it, or choose" if overwrite_option \
            else "Choose"
        raise FileExistsError(f"{path} already holds {what}; nothing was written. {replace} an "
                              "empty or new directory.")
    foreign = [entry.name for entry in entries if not is_checkpoint_file(entry)]
    if foreign:
        raise FileExistsError(
            f"{path} holds {foreign[:5]}, which are not part of a checkpoint; {overwrite_option} "
            "replaces the whole folder and would delete them, so nothing was written. Move "
            "them out, or save into another directory."
        )
    return path


# free space


def free_bytes(path: Path) -> int:
    """Bytes available to this user on the filesystem of ``path`` (or its nearest existing
    parent)."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def check_free_space(out_dir: str | os.PathLike, needed_bytes: int,
                     what: str = "the checkpoint") -> None:
    """Refuse to start writing ``needed_bytes`` beside ``out_dir`` when the disk has less free
    (a full disk found after a long calibration costs the whole run). With ``overwrite`` the
    old checkpoint stays until the new one is renamed into place, so it needs no less."""
    where = _existing_ancestor(real_output_dir(out_dir).parent)
    available = free_bytes(where)
    if available < needed_bytes:
        raise OutputDirError(
            f"Not enough free space in {where} for {what}: it needs about {needed_bytes:,} "
            f"bytes ({needed_bytes / 2**30:.2f} GiB), {available:,} bytes "
            f"({available / 2**30:.2f} GiB) are available; nothing was written. Free some "
            "space or save to another disk."
        )


# leftovers of interrupted saves


def _sibling(real: Path, kind: str) -> Path:
    return real.parent / f".{real.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_sibling(target: Path) -> Path:
    """A new ``.<name>.tmp-<pid>-<id>`` path beside ``target`` to write its replacement into
    (same filesystem, so the final rename is atomic)."""
    return _sibling(target, _TMP)


def _leftovers(real: Path, kind: str) -> list[tuple[Path, int]]:
    """``[(path, pid)]`` of ``.<name>.<kind>-<pid>-<id>`` folders beside ``real``."""
    if not real.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(real.name)}\.{kind}-(\d+)-[0-9a-f]+")
    return sorted((path, int(match.group(1))) for path in real.parent.iterdir()
                  if (match := pattern.fullmatch(path.name)) and path.is_dir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_interrupted_saves(out_dir: str | os.PathLike) -> None:
    """Delete ``.<name>.tmp-*`` and ``.<name>.del-*`` folders left by an interrupted save of
    ``out_dir`` (whose process is gone); ``.<name>.old-*`` folders hold a previous checkpoint
    and are only ever explained (``explain_interrupted_replace``), never deleted."""
    real = real_output_dir(out_dir)
    for kind in (_TMP, _DEL):
        for path, pid in _leftovers(real, kind):
            if not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                logger.warning("Removed %s, left by an interrupted save of %s.", path, out_dir)
            elif kind == _TMP:
                logger.warning("%s may be a save of %s in progress, or left by an interrupted "
                               "one; delete it if no save is running.", path, out_dir)


_EXPLAINED: set[Path] = set()
"""``.old`` folders already warned about in this process (a command resolves a model twice)."""


def replace_backups(path: str | os.PathLike) -> list[Path]:
    """The ``.<name>.old-*`` folders beside ``path``: previous checkpoints of overwrites that
    were killed between their two renames."""
    return [old for old, _ in _leftovers(real_output_dir(path), _OLD)]


def explain_interrupted_replace(path: str | os.PathLike) -> list[Path]:
    """Find ``.<name>.old-*`` folders beside ``path``: previous checkpoints of overwrites that
    were killed between their two renames. ``path`` missing: raises
    ``InterruptedReplaceError`` saying how to restore it (``mv`` or
    ``restore_interrupted_save``); present (the new checkpoint was already in place): warns how
    to delete the old copy or go back to it. Returns the folders found."""
    real = real_output_dir(path)
    leftovers = _leftovers(real, _OLD)
    olds = [old for old, _ in leftovers]
    if not olds:
        return []
    if not real.exists():
        running = [str(pid) for _, pid in leftovers if pid != os.getpid() and _pid_alive(pid)]
        if running:
            raise InterruptedReplaceError(
                f"{path} is missing: process {', '.join(running)} is replacing it right now "
                f"(its previous checkpoint is in {', '.join(map(_shown, olds))}); run this "
                "again when that save has finished. If no save is running, the replace was "
                f"interrupted: restore it with {_RESTORE}({str(path)!r}).")
        if len(olds) == 1:
            how = (f"restore it with `mv {_shown(olds[0])} {_shown(real)}` or "
                   f"{_RESTORE}({str(path)!r})")
        else:
            how = f"move the one you want back to {_shown(real)} with mv"
        raise InterruptedReplaceError(
            f"{path} is missing: a save that was replacing it was interrupted between its two "
            f"renames, and its previous checkpoint is in {', '.join(map(_shown, olds))}; "
            f"{how}, then run this again."
        )
    for old in olds:
        if old in _EXPLAINED:
            continue
        _EXPLAINED.add(old)
        logger.warning(
            "%s holds the previous checkpoint of %s, left by an overwrite that was interrupted "
            "after the new checkpoint was in place; delete it (`rm -r %s`) to keep %s, or to "
            "go back: `mv %s %s.new && mv %s %s`.", old, path, _shown(old), path, _shown(real),
            _shown(real), _shown(old), _shown(real))
    return olds


# writing


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes ``open()`` and ``mkdir`` give under the
    process umask. safetensors writes its files 0600, so without this a checkpoint in a shared
    folder is unreadable to the group while its config is not."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def replace_dir(new: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished folder ``new`` to ``target`` (its modes set by ``apply_umask``).
    Without ``overwrite`` a plain rename, which fails rather than replace a folder that holds
    files. With it, an existing ``target`` is moved aside, ``new`` renamed into place (the old
    one restored if that fails), and only then the old one deleted."""
    apply_umask(new)
    if not overwrite or not target.exists():
        try:
            os.rename(new, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{target} was filled by another program while this save "
                                  "ran; nothing was replaced and the new checkpoint was "
                                  "discarded. Save to another directory.") from error
        return
    backup = _sibling(target, _OLD)
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup, target)
        raise
    trash = _sibling(target, _DEL)
    os.replace(backup, trash)  # a kill from here on leaves nothing that looks restorable
    shutil.rmtree(trash, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file and a rename, so a reader
    (or a crash) never sees half a file. Overwrites ``path``; callers ask the user first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, _TMP)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
