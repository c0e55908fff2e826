"""File helpers: atomic writes, sha256 of a file, JSON reading, output folders and locks.

Atomic writes go to a temporary file created exclusively (``O_EXCL``, a random name) in the
target's folder, are fsynced and renamed over the target, and the folder is fsynced: a kill or a
power cut mid-write never leaves a half-written file under the real name, and a symbolic link
planted at any fixed name is never followed. Locks are opened with ``O_NOFOLLOW``. A folder that
cannot be created or written (a read-only ``--out``) is a ToolError naming it, not a traceback.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from core.errors import ToolError


class OutputError(ToolError):
    """An output that cannot be written: a read-only folder, a planted symbolic link."""


def _cannot(what: str, path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {what} {path}: {e.strerror or e}; choose a writable location "
                       f"(--out) or fix the folder's permissions")


def ensure_dir(path: str | Path, what: str = "output folder") -> Path:
    """``mkdir -p`` whose failure (read-only, a file in the way) is an OutputError naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create {what} {path}: a file of that name is in the way") from None
    except OSError as e:
        raise _cannot(what, path, e) from None
    return path


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so that a rename or a new file in it survives a power cut (best effort: some
    file systems cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """fsync a file's data (before a "done" mark is written about it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic(path: str | Path, what: str = "file"):
    """Yield a binary file object on a fresh exclusive temporary beside ``path``; on success it is
    flushed, fsynced, renamed over ``path`` and the folder fsynced; on failure it is removed."""
    path = Path(path)
    ensure_dir(path.parent, "folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot(what, path, e) from None
    try:
        try:
            mode = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
        except OSError:
            mode = 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symbolic link at ``path`` itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with _atomic(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_npy(path: str | Path, array) -> Path:
    """Atomic ``np.save`` (a kill mid-write never leaves a half ``.npy`` under ``path``)."""
    import numpy as np

    with _atomic(path, "array") as f:
        np.save(f, array)
    return Path(path)


def save_checkpoint(obj, path: str | Path) -> Path:
    """Atomic ``torch.save``: a kill mid-write never leaves a half file under ``path``."""
    import torch

    with _atomic(path, "checkpoint") as f:
        torch.save(obj, f)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_jsonl(path: str | Path) -> list[dict]:
    """The complete records of a JSON-lines file; a line cut by a kill (or any bad line) is skipped.

    A missing file reads as no records.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


class JSONFileError(ToolError):
    """A JSON file that cannot be used: missing, too large, too deeply nested, not JSON, or not
    the type of value its reader expects. The message names the file."""


JSON_MAX_BYTES = 8 << 20  # a run's summary or config, a sweep plan, a manifest: kilobytes
JSON_MAX_DEPTH = 32       # the tool's own files nest at most 5 deep


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` and ``{}`` are 1); iterative,
    so a value nested deeper than the interpreter's stack is measured, not a RecursionError."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return depth


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _bracket_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in JSON text (an upper bound on the
    parsed value's depth; exact for valid JSON), without parsing it."""
    import numpy as np

    b = np.frombuffer(_JSON_STRING.sub(b'""', data), np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int32) - np.isin(b, (ord("]"), ord("}")))
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def load_json(path: str | Path, what: str = "JSON file", max_bytes: int = JSON_MAX_BYTES,
              max_depth: int = JSON_MAX_DEPTH, kind: type | None = None):
    """The JSON value in the file at ``path``, read as untrusted: at most ``max_bytes`` read and
    parsed (the parsed objects take at most ~20 times that), nesting at most ``max_depth`` deep,
    of type ``kind`` when given (``dict``: a JSON object). JSONFileError naming ``what``, the file
    and the problem otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise JSONFileError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise JSONFileError(f"{what} {path}: larger than {max_bytes} bytes; not a file this tool wrote")
    if _bracket_depth(data) > max_depth:  # before parsing: json.loads recurses per level
        raise JSONFileError(f"{what} {path}: nested deeper than {max_depth} levels")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise JSONFileError(f"{what} {path}: not valid JSON ({str(e)[:200]})") from None
    if json_depth(value) > max_depth:
        raise JSONFileError(f"{what} {path}: nested deeper than {max_depth} levels")
    if kind is not None and not isinstance(value, kind):
        want = {dict: "a JSON object", list: "a JSON array"}.get(kind, kind.__name__)
        raise JSONFileError(f"{what} {path}: holds {_json_type(value)}, not {want}")
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def read_json(path: str | Path, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH):
    """The JSON value in a file, or None when it is missing, unreadable, not JSON, over
    ``max_bytes`` or nested deeper than ``max_depth`` (a run folder's config, summary or plan
    written by a kill is simply absent)."""
    try:
        return load_json(path, max_bytes=max_bytes, max_depth=max_depth)
    except JSONFileError:
        return None


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in a file (a run's config or summary, a sweep plan), None when it is
    missing, unreadable, not an object, or over the size and depth bounds of :func:`load_json`."""
    value = read_json(path)
    return value if isinstance(value, dict) else None


class OutputLock:
    """Exclusive lock on an output (a run folder, a cache, a store, a teachers folder).

    ``with OutputLock(path, "what"):`` holds an ``fcntl.flock`` on ``<path>.lock`` (for a folder:
    ``<path>/.lock``) and writes this process's PID and start time into it. The kernel releases a
    flock when its process dies, so a lock left by a killed run is never stale: the next run
    takes it. A second writer gets a LockedError naming the holder.
    """

    def __init__(self, path: str | Path, what: str = "output"):
        path = Path(path)
        self.file = path / ".lock" if path.is_dir() else path.with_name(path.name + ".lock")
        self.target, self.what, self._fd = path, what, None

    def __enter__(self):
        import fcntl
        import time

        from core.errors import LockedError

        ensure_dir(self.file.parent, "output folder")
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.file, flags, 0o644)
        except OSError as e:
            if os.path.islink(self.file):
                raise OutputError(f"the lock file {self.file} is a symbolic link (to "
                                  f"{os.readlink(self.file)}): refusing to follow it (a received folder "
                                  "may plant one to overwrite another file); remove the link and run "
                                  "again") from None
            raise _cannot("the lock file", self.file, e) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"the lock file {self.file} is not a regular file; remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(f"{self.what} {self.target} is being written by another run ({holder}); "
                              "wait for it to finish (or stop it) and run again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
