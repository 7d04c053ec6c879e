"""Files that are never half written, and torch files verified on load.

:func:`atomic_path` is the one way this package writes a file (checkpoints, ``history.json``,
figures, the experiments' reports): the bytes go to a temporary file next to the target,
are flushed to disk, and ``os.replace`` moves them onto the target, so a reader (or a run
killed at any moment) sees the old file or the complete new one. A run killed inside the
write leaves its temporary file behind; :func:`remove_stale_temporaries` deletes those of
processes that are gone.

:func:`save_verified` and :func:`load_verified` store a dict with ``torch.save`` together with
a SHA-256 digest of its contents, and check the digest on load: the zip container torch
writes has no check of its own over the tensor data, so a flipped byte there would load
silently. A file that is empty, truncated, not a torch file, or whose contents do not
match their digest raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

_DIGEST_KEY = "sha256"
_PAYLOAD_KEY = "payload"


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or written; the message names the file.

    Attributes:
        path: the file.
        reason: what is wrong with it.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path}: {reason}")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    Readers of ``path`` see either the old file or the complete new one, never a partial
    write: the temporary file is flushed to disk before ``os.replace`` (atomic on one file
    system) moves it. On an exception the temporary file is removed and ``path`` is left
    as it was.

    Args:
        path: the destination file.

    Yields:
        The temporary path to write to (its name does not end like ``path``: pass a file
        format explicitly where a writer guesses it from the suffix).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("complete")
        >>> target.read_text()
        'complete'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: PathLike) -> Path:
    """``path`` if a file can be written there: it is not a directory, and the nearest
    existing folder on its way takes a file (probed with a temporary one; nothing else is
    created). Raises ``OSError`` (with ``strerror``) or ``IsADirectoryError`` otherwise, so a
    run can refuse a destination before its work rather than after."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a file", str(path))
    existing = next(folder for folder in path.parents if folder.exists())
    with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
        pass
    return path


def writable_file(text: str) -> Path:
    """An ``argparse`` type: the path of a file :func:`check_writable` accepts, else one usage
    line naming the path and why (e.g. ``--json /proc/x.json: cannot write there (No such
    file or directory)``), before the run spends any time.

    Example:
        >>> import argparse, tempfile
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--json", type=writable_file)
        >>> parser.parse_args(["--json", tempfile.gettempdir() + "/out.json"]).json.name
        'out.json'
    """
    return _writable_or_usage(text, text)


def writable_directory(text: str) -> Path:
    """An ``argparse`` type: the path of an output folder files can be written into (it exists,
    or it can be made below its nearest existing folder), else one usage line naming the path
    and why (e.g. ``--out notes.txt/run: notes.txt is a file, not a directory``), before the
    run spends any time. Creates nothing.

    Example:
        >>> import argparse, tempfile
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--out", type=writable_directory)
        >>> parser.parse_args(["--out", tempfile.gettempdir() + "/run"]).out.name
        'run'
    """
    import argparse

    path = Path(text)
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
    except OSError as error:  # an ancestor this user may not search
        raise _cannot_write(text, error, "; give another directory") from None
    if not existing.is_dir():
        what = "" if existing == path else f" {existing}"
        raise argparse.ArgumentTypeError(f"{text}:{what} is a file, not a directory; give a directory")
    _writable_or_usage(text, path / ".write-test", "; give another directory")
    return path


def _writable_or_usage(text: str, path: PathLike, fix: str = "") -> Path:
    """:func:`check_writable` of ``path``, its refusal as the usage line of the option value ``text``."""
    try:
        return check_writable(path)
    except OSError as error:
        raise _cannot_write(text, error, fix) from None


def _cannot_write(text: str, error: OSError, fix: str) -> Exception:
    """The usage error of the option value ``text`` whose place refused a write with ``error``."""
    import argparse

    return argparse.ArgumentTypeError(f"{text}: cannot write there ({error.strerror or error}){fix}")


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`) and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or cannot tell: leave its file
    return True


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory``.

    Only files named like :func:`atomic_path`'s (``.NAME.PID.tmp``) whose process no longer
    runs are removed, so a concurrent writer's file is left alone.

    Args:
        directory: the directory to clean (a missing one is fine).

    Returns:
        The removed files.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for tmp in directory.glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _digest(obj: Any, h: Any) -> None:
    """Feed a canonical encoding of ``obj`` (tensors, containers, scalars) into ``h``."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _digest(key, h)
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        # Lists and tuples alike: only the values matter, not which container pickled them.
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _digest(value, h)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def digest(obj: Any) -> str:
    """SHA-256 (hex) of the contents of ``obj``: tensor bytes, dtypes, shapes and plain values.

    Independent of the device the tensors are on and of how ``torch.save`` laid them out.
    """
    h = hashlib.sha256()
    _digest(obj, h)
    return h.hexdigest()


def save_verified(payload: dict[str, Any], path: PathLike, previous: PathLike | None = None) -> None:
    """``torch.save`` ``payload`` with its :func:`digest`, atomically.

    Args:
        payload: tensors, dicts, lists and Python scalars (what ``weights_only`` loads).
        path: the destination file.
        previous: if given and ``path`` exists, the file ``path`` held is kept there. At
            every moment of the write ``path`` holds a complete file (the old one, then the
            new one), and ``previous`` the one before it.
    """
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save({_DIGEST_KEY: digest(payload), _PAYLOAD_KEY: payload}, f)
        if previous is not None and path.exists():
            _keep_copy(path, Path(previous))


def _keep_copy(path: Path, previous: Path) -> None:
    """Make ``previous`` hold what ``path`` holds now, atomically, leaving ``path`` in place."""
    with atomic_path(previous) as tmp:
        try:
            os.link(path, tmp)  # a second name for the same bytes: no copy
        except OSError:
            shutil.copyfile(path, tmp)  # file systems without hard links


def load_verified(path: PathLike, legacy: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Load a file written by :func:`save_verified` (on the CPU) and check its digest.

    Loading uses ``weights_only=True``: no code runs on load.

    Args:
        path: the file.
        legacy: says whether a file without a digest (written before digests were stored)
            is still accepted, unverified, as its own payload.

    Returns:
        The payload.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, not a torch file, or its contents
            do not match the digest stored with them.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes); it is no checkpoint")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        # torch.save writes a zip archive; anything else (an image, a text file, a pickle)
        # would reach torch's pickle fallback, whose error advises weights_only=False.
        raise CheckpointError(path, f"is not a torch checkpoint (no zip archive: it starts with {magic!r})")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch.load's errors here (RuntimeError from the zip reader, EOFError,
        # UnicodeDecodeError, UnpicklingError from the weights-only unpickler, ...) are
        # several lines long and never name the file.
        text = str(error).strip()
        # Its first sentence: torch 2.13's zip reader appends a paragraph of advice to it.
        first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
        detail = f"{size} bytes, truncated or corrupted: {first}"
        raise CheckpointError(path, f"cannot be read as a torch checkpoint ({detail})") from None
    if legacy is not None and isinstance(stored, dict) and _DIGEST_KEY not in stored and legacy(stored):
        return stored
    if not isinstance(stored, dict) or _PAYLOAD_KEY not in stored or _DIGEST_KEY not in stored:
        raise CheckpointError(path, "holds no verified flows payload (not written by flows)")
    payload = stored[_PAYLOAD_KEY]
    if digest(payload) != stored[_DIGEST_KEY]:
        raise CheckpointError(
            path, "its contents do not match their SHA-256 digest: the file was corrupted or edited after writing"
        )
    return payload
