"""Where the trainer runs: the device, and its rank when started by `torchrun`.

One process per GPU under `torchrun` (NCCL), or several CPU processes (gloo).
Every rank trains on its shard of each batch order; rank 0 alone evaluates,
draws, writes checkpoints and publishes, and decides when to stop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # in a process group (every torchrun job, one process included): collectives run

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.distributed else "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def rank0_decides(self, decision: bool) -> bool:
        """Rank 0's decision on every rank (ranks that disagree about stopping would deadlock)."""
        if not self.distributed:
            return decision
        flag = torch.tensor([int(decision)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def setup(device_arg: str) -> Runtime:
    """Pick the device (`auto`: CUDA when present) and join the process group under torchrun."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # TF32 matmuls/convolutions: ~3x faster on Ampere+, far below the noise of this task.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    # Under torchrun (TORCHELASTIC_RUN_ID) even one process joins a group, so a 1-GPU job runs NCCL and DDP for real.
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        return Runtime(device, dist.get_rank(), world_size, distributed=True)
    return Runtime(device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
