"""Device choice, autocast, and the CPU allocator setting every command applies."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from core.runtime import autocast, pick_device

glibc = platform.libc_ver()[0] == "glibc" and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) >= (2, 33)

# Bytes glibc holds in mmap()ed blocks (mallinfo2().hblkhd) before and after a 16 MiB buffer is made.
PROBE = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if {tune}:
        from core.runtime import keep_freed_memory
        assert keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    buf = np.ones(16 * 2**20, dtype=np.uint8)
    print(libc.mallinfo2().hblkhd - before)
""")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here; use --device cpu or auto"):
            pick_device("cuda")


def test_autocast_is_off_on_cpu():
    with autocast(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(not glibc, reason="glibc >= 2.33 (mallinfo2) only")
@pytest.mark.parametrize("tune", [False, True])
def test_keep_freed_memory_serves_large_buffers_from_the_heap(tune):
    """glibc's default puts a 16 MiB buffer in its own mmap (returned to the OS on free, page-faulted
    again next time); after keep_freed_memory it comes from the heap that freed buffers refill."""
    from pathlib import Path

    code = PROBE.format(root=str(Path(__file__).resolve().parents[1]), tune=tune)
    mmapped = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    if tune:
        assert mmapped == 0
    else:
        assert mmapped >= 16 * 2**20
