"""Multi-process data parallelism on plain `torch.distributed` (launched by torchrun or
`accelerate launch`, which set RANK / WORLD_SIZE / MASTER_ADDR).

Each optimizer step takes one global batch of `batch_size x world` rows; rank r trains on
its contiguous slice. Losses are weighted by the global count of real tokens and
gradients are summed across ranks, so N processes x batch b give the same update as one
process x batch N*b. Logging, progress and saving happen on rank 0 only.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device_type: str = "cpu") -> None:
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_all(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of `params` in one flat buffer."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather_states(states: dict) -> list[dict]:
    """Every rank's `states` (a dict of tensors with the same keys and shapes on all ranks), on
    every rank, in rank order: what a checkpoint needs to restore each rank's own RNG."""
    if not dist.is_initialized():
        return [states]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out: list[dict] = [{} for _ in range(world_size())]
    for key in sorted(states):
        x = states[key].to(dev)
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        for r, t in enumerate(parts):
            out[r][key] = t.cpu()
    return out


def shard(rows: list, r: int, world: int) -> list:
    """Rank r's contiguous slice of a global batch."""
    per = -(-len(rows) // world)
    return rows[r * per : (r + 1) * per]
