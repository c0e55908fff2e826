"""Provenance and identity: what made an artifact, and how two sets of settings differ.

``provenance()`` records the code (git commit, dirty flag, tool and torch versions) and time;
``canon`` gives settings one JSON form so equal settings compare equal; ``settings_diff`` says
which settings differ, for every "reuse only on an exact match" check of the tool.
"""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

TOOL_VERSION = "0.2.0"
PROVENANCE_FIELDS = ("created", "tool_version", "git_commit", "torch_version")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                          capture_output=True, text=True, timeout=10)


def provenance() -> dict:
    """``{"created", "tool_version", "git_commit", "torch_version"}`` of this process.

    ``git_commit`` is ``git rev-parse HEAD`` with ``-dirty`` when tracked files differ from it, or
    ``"unknown"`` outside a repository or without git. Never raises.
    """
    try:
        head = _git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "unknown"
        if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no").stdout.strip():
            commit += "-dirty"
    except Exception:  # no git binary, timeout, ...: provenance must never stop a run
        commit = "unknown"
    try:
        import torch
        torch_version = str(torch.__version__)
    except Exception:
        torch_version = "none"
    return {"created": utc_now(), "tool_version": TOOL_VERSION, "git_commit": commit,
            "torch_version": torch_version}


def canon(x):
    """JSON round trip: tuples become lists and dict keys strings, so equal settings compare equal."""
    return json.loads(json.dumps(x, sort_keys=True))


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


def settings_diff(before: dict, now: dict, ignore=(), names: tuple[str, str] = ("was", "now")) -> list[str]:
    """``["key: was X, now Y", ...]`` for every key (outside ``ignore``) whose canonical value differs.

    A key missing on one side counts as ``None`` there.
    """
    a, b = canon(before), canon(now)
    return [f"{k}: {names[0]} {_short(a.get(k))}, {names[1]} {_short(b.get(k))}"
            for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]
