"""The model folder a training command writes (``--output-dir``): what it may replace, and how it publishes.

A run saves into a staging folder next to the destination, then renames it into place, so that an interrupted
run leaves no half-written model where the final one belongs. Three rules keep other people's files safe:

- **Replace only our own.** With ``--overwrite`` an existing destination is replaced only when it is a model folder
  that a fastcache command wrote: it holds :data:`SUMMARY_FILE`, whose ``files`` list names every other entry
  (older run files without the list: every entry looks like part of a saved model), and it is neither the working
  directory nor one of its ancestors. Anything else is refused with one line (:class:`OutputDirError`). The rule
  is checked before any work and again at the rename, under the lock.
- **Never replace what appeared meanwhile.** Without ``--overwrite`` the rename never replaces: Linux's
  ``renameat2(RENAME_NOREPLACE)`` (through ctypes) fails if the destination exists, atomically. Where it is not
  available (another OS, a file system without the flag) the check and a plain rename run under the lock. If the
  destination appeared during the run, the finished model is kept in the staging folder and the error names it.
- **Normal permissions.** The staging folder is made by ``os.mkdir`` with mode 0o777, so the published folder has
  the umask's normal mode (``0o777 & ~umask``), not mkdtemp's 0700.

The lock is an advisory ``flock`` on the destination's parent folder, taken by every fastcache run that publishes
there; it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
from pathlib import Path

SUMMARY_FILE = "fastcache_run.json"
# What sentence-transformers / transformers save in a model folder (for run files written before the list).
_MODEL_ENTRY = re.compile(r"README\.md|config.*\.json|modules\.json|sentence_bert_config\.json|tokenizer.*|vocab\.txt|"
                          r"merges\.txt|special_tokens_map\.json|added_tokens\.json|generation_config\.json|"
                          r".*\.safetensors(\.index\.json)?|pytorch_model.*\.bin|.*\.model|\d+_\w+")
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class OutputDirError(ValueError):
    """An --output-dir that may not be written or replaced; the message says why."""


def _saved_entries(folder: Path) -> list[str] | None:
    """The entries the run file of ``folder`` lists, [] for an older run file without the list, None without a
    readable run file."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    files = summary.get("files", [])
    return files if isinstance(files, list) else None


def refusal(destination: Path, overwrite: bool) -> str | None:
    """Why ``destination`` may not be written now (None: it may): it exists without ``overwrite``, or it is not a
    model folder that a fastcache command wrote, or it holds the working directory."""
    if not os.path.lexists(destination):
        return None
    shown = f"--output-dir {str(destination)!r}"
    if not overwrite:
        return f"{shown} exists; pass --overwrite to replace it"
    real = destination.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        return f"{shown} is the working directory or holds it; --overwrite replaces only a model folder"
    if destination.is_symlink() or not destination.is_dir():
        return f"{shown} is not a folder; --overwrite replaces only a model folder written by fastcache"
    saved = _saved_entries(destination)
    if saved is None:
        return (f"{shown} has no readable {SUMMARY_FILE}: not a model folder written by fastcache, so --overwrite "
                "does not replace it")
    others = sorted(e.name for e in destination.iterdir() if e.name != SUMMARY_FILE and e.name not in saved
                    and (saved or not _MODEL_ENTRY.fullmatch(e.name)))
    if others:
        listed = ", ".join(map(repr, others[:3])) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (f"{shown} holds {listed}, which the fastcache run that wrote it did not save; --overwrite does not "
                "replace it")
    return None


def check(destination: Path, overwrite: bool) -> None:
    """Raise :class:`OutputDirError` when :func:`refusal` says no."""
    reason = refusal(destination, overwrite)
    if reason:
        raise OutputDirError(reason)


def make_staging(destination: Path) -> Path:
    """A new empty folder next to ``destination`` (its parents created), with the umask's normal mode."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = destination.with_name(f".{destination.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            staging.mkdir(mode=0o777)
            return staging
        except FileExistsError:
            continue


def entries(folder: Path) -> list[str]:
    """The names in ``folder``, sorted (the ``files`` list of its run file)."""
    return sorted(e.name for e in folder.iterdir())


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _rename2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(source, target, flags)``; False when it or the flag is not supported here."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; FileExistsError if ``target`` exists (even an empty folder, which a plain
    rename would replace). Atomic through renameat2; elsewhere a check then a rename (callers hold :func:`lock`)."""
    if _rename2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


@contextlib.contextmanager
def lock(folder: Path):
    """An exclusive advisory lock on ``folder`` (flock on the folder itself; nothing where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def publish(staging: Path, destination: Path, overwrite: bool) -> None:
    """Move the finished ``staging`` folder to ``destination`` under :func:`lock`, after checking the rules again.
    On a refusal (or a destination that appeared during the run) ``staging`` is left as it is and the
    :class:`OutputDirError` names it."""
    kept = f"; the trained model is kept in {str(staging)!r}"
    with lock(destination.parent):
        if not overwrite or not os.path.lexists(destination):
            try:
                rename_noreplace(staging, destination)
            except FileExistsError:
                raise OutputDirError(f"--output-dir {str(destination)!r} was created by something else during the "
                                     f"run{kept}") from None
            return
        reason = refusal(destination, overwrite)
        if reason:
            raise OutputDirError(f"{reason} (checked again when saving){kept}")
        # --overwrite of one of our model folders: swap the two atomically, then delete the old model
        if _rename2(staging, destination, _RENAME_EXCHANGE):
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        rename_noreplace(destination, old)
        try:
            rename_noreplace(staging, destination)
        except FileExistsError:
            raise OutputDirError(f"--output-dir {str(destination)!r} was created by something else while the "
                                 f"old model was being replaced{kept}, the old one in {str(old)!r}") from None
        shutil.rmtree(old, ignore_errors=True)
