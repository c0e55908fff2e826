"""core/files.py under a hostile folder: planted symbolic links, read-only outputs, cut writes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import ToolError
from core.files import (OutputError, OutputLock, atomic_write_json, atomic_write_text, ensure_dir, read_json,
                        save_checkpoint)


def test_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    out = tmp_path / "cache.h5"
    os.symlink(victim, tmp_path / "cache.h5.lock")
    with pytest.raises(OutputError, match="is a symbolic link .*refusing to follow it"):
        with OutputLock(out, "cache"):
            pass
    assert victim.read_text() == "keep me"
    # a folder's lock too
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / ".lock")
    with pytest.raises(OutputError, match="symbolic link"):
        with OutputLock(run, "run folder"):
            pass
    assert victim.read_text() == "keep me"


def test_lock_still_locks(tmp_path):
    from core.errors import LockedError

    with OutputLock(tmp_path / "x.h5", "cache"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with OutputLock(tmp_path / "x.h5", "cache"):
                pass
    with OutputLock(tmp_path / "x.h5", "cache"):  # released
        pass


def test_atomic_write_never_follows_a_planted_tmp_link(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    target = tmp_path / "out" / "summary.json"
    target.parent.mkdir()
    os.symlink(victim, target.with_name("summary.json.tmp"))  # the old fixed temporary name
    atomic_write_json(target, {"a": 1})
    assert read_json(target) == {"a": 1} and victim.read_text() == "keep me"
    # a link at the target itself is replaced, its target untouched
    os.symlink(victim, tmp_path / "out" / "report.csv")
    atomic_write_text(tmp_path / "out" / "report.csv", "x\n")
    assert not (tmp_path / "out" / "report.csv").is_symlink() and victim.read_text() == "keep me"
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
    assert leftovers == []


def test_failed_write_leaves_target_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    atomic_write_text(target, "old")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception):
        save_checkpoint({"x": Boom()}, target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_read_only_output_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="a file of that name is in the way"):
        ensure_dir(blocker)
    with pytest.raises(ToolError, match="cannot"):
        atomic_write_text(blocker / "sub" / "x.json", "{}")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)  # as a read-only --out does (even for root)
    with pytest.raises(OutputError,
                       match=r"cannot write output folder .*Permission denied; choose a writable"):
        with OutputLock(tmp_path / "ro" / "run", "run folder"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied"):
            atomic_write_text(ro / "x.txt", "x")
        with pytest.raises(OutputError, match="Permission denied"):
            with OutputLock(ro / "c.h5"):
                pass
    finally:
        ro.chmod(0o755)


def test_read_json(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "cut.json").write_text('{"a": ')
    assert read_json(tmp_path / "cut.json") is None
    (tmp_path / "big.json").write_text("[" + "1," * 100 + "1]")
    assert read_json(tmp_path / "big.json", max_bytes=50) is None and len(read_json(tmp_path / "big.json")) == 101


def test_load_json_bounds_size_depth_and_type(tmp_path):
    from core.files import JSONFileError, load_json

    path = tmp_path / "summary.json"
    path.write_text("[" * 200_000 + "]" * 200_000)  # a RecursionError in `report` before
    with pytest.raises(JSONFileError, match=r"summary .*summary\.json: nested deeper than 32 levels"):
        load_json(path, "summary")
    assert read_json(path) is None
    path.write_text('{"a": "' + "[" * 39 + '\\"[[", "b": [[1]]}')  # brackets in strings
    assert load_json(path, max_depth=3) == {"a": "[" * 39 + '"[[', "b": [[1]]}
    with pytest.raises(JSONFileError, match="nested deeper than 2 levels"):
        load_json(path, max_depth=2)
    path.write_text("[]")
    with pytest.raises(JSONFileError, match=r"summary\.json: holds an array, not a JSON object"):
        load_json(path, "summary", kind=dict)
    path.write_text('{"a": ' + " " * 100 + "1}")
    with pytest.raises(JSONFileError, match="larger than 50 bytes"):
        load_json(path, max_bytes=50)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(JSONFileError, match="not valid JSON"):
        load_json(path)
    with pytest.raises(JSONFileError, match="cannot be read"):
        load_json(tmp_path / "missing.json")


def test_deep_json_is_refused_before_parsing_even_with_a_raised_recursion_limit(tmp_path):
    """json.loads recurses once per level (a segmentation fault past the C stack when a library
    raised the recursion limit): the depth is measured on the text first."""
    import subprocess
    import sys

    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    code = ("import sys; sys.setrecursionlimit(10**6); from core.files import read_json; "
            f"print(read_json({str(path)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
