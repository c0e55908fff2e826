"""Running under torchrun: who this process is, collectives, and BatchNorm over the global batch.

``torchrun --nproc-per-node N cli.py ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`context`
joins the process group (gloo on CPU, nccl on GPU) and gives a :class:`Dist`. In a plain
``python cli.py`` run it is a one-process Dist whose collectives do nothing, so every stage has
one code path.
"""
from __future__ import annotations

import atexit
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place (one flat all-reduce)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


@functools.cache
def context(device_type: str = "cpu") -> Dist:
    """This process's Dist, joining the process group once when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
        # Leave the group while the interpreter is alive: gloo's worker threads still holding
        # tensors at interpreter finalization abort the process (SIGABRT, "terminate called
        # without an active exception"; pytorch/pytorch#190489), seen once in 4 CI-like runs.
        atexit.register(_leave)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return Dist(torch.distributed.get_rank(), world, local)


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across processes.

    Mean and (biased) variance from all-reduced per-channel sums, sums of squares and counts,
    through the autograd-aware all-reduce, so the gradients are those of one process holding the
    whole batch. torch's SyncBatchNorm does this on GPUs only; this works with gloo on CPUs too.
    Running statistics follow nn.BatchNorm2d (momentum, unbiased variance). Evaluation mode is
    plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        C = x.shape[1]
        count = torch.full((1,), xf.numel() / C, dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            global_batch_norm(child)
    return module
