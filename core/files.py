"""File helpers: atomic writes, sha256 of a file, tolerant JSON-lines reading.

Atomic writes go to ``<name>.tmp`` beside the target and are renamed over it, so a kill mid-write
never leaves a half-written file under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def _tmp_of(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_of(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(obj, path: str | Path) -> Path:
    """Atomic ``torch.save``: a kill mid-write never leaves a half file under ``path``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_of(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


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

        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
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
