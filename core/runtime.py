"""Where and how the work runs: device choice, mixed precision, per-epoch seeds, the CPU allocator."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

from core.errors import ConfigError

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's generator (shuffling, crops): replayable, so resume is exact."""
    return seed * 100_003 + epoch


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU (one code path for both)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def memory_format_for(device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) on CUDA, where cuDNN's tensor-core kernels want it; the default layout
    elsewhere, where channels_last made the CPU step slower (docs/results.md#speed)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB instead of handing them back to the OS.

    A CPU forward pass allocates and frees activation buffers of a few MiB on every batch; with
    glibc's defaults they often go back to the OS (mmap/munmap, heap trimming) and are page-faulted
    in again on the next batch. Measured on a 2-core box: the precompute pass of 5 ResNet-50s at
    64 px ran 68 -> 80-85 img/s (``benchmarks/bench_precompute.py``). Process-wide; the price is
    that the process keeps its peak heap. Returns False where it does not apply (not glibc).
    Called once by every command (``cli.py``) and by the benchmarks.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
            and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)))


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (``platform.processor()`` elsewhere): every
    benchmark figure names its machine."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"
