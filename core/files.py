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
