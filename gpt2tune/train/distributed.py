"""Multi-process data parallelism through PyTorch's own engine (launched by torchrun or
`accelerate launch`, which set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR).

Each optimizer step takes one global batch of `batch_size x world` rows; rank r trains on its
share (`shard`). Gradients are averaged by `DistributedDataParallel` (bucketed all-reduce
overlapped with the backward pass; no communication inside gradient accumulation), and the loss
of every micro-batch is weighted by its share of the real tokens of the whole window on all ranks,
so N processes x batch b give the same update as one process x batch N*b. One device per rank
(`cuda:LOCAL_RANK` on GPUs, NCCL; the CPU with gloo), and every tensor handed to a collective
lives on the backend's device (`comm_device`). Logging, progress and saving happen on rank 0.
"""

from __future__ import annotations

import atexit
import contextlib
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """This rank's own device: GPU number LOCAL_RANK when several processes share a machine's GPUs."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def init(device_type: str = "cpu") -> None:
    if world_size() > 1 and not dist.is_initialized():
        if device_type == "cuda":  # before any CUDA work: otherwise every rank lands on GPU 0
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group (at exit). A process that exits with the group still up can abort
    in its communication threads' destructors ("terminate called without an active exception",
    seen with gloo on a rank that finished first), which torchrun reports as a failed run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors handed to collectives must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (one all-reduce)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_states(states: dict) -> list[dict]:
    """Every rank's `states` (a dict of tensors with the same keys and shapes on all ranks), on
    every rank, in rank order: what a checkpoint needs to restore each rank's own RNG."""
    if not dist.is_initialized():
        return [states]
    dev = comm_device()
    out: list[dict] = [{} for _ in range(world_size())]
    for key in sorted(states):
        x = states[key].to(dev)
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        for r, t in enumerate(parts):
            out[r][key] = t.cpu()
    return out


def shard(rows: list, r: int, world: int) -> list:
    """Rank r's share of a global batch: contiguous, sizes differing by at most one row, so no rank
    is empty unless the batch has fewer rows than there are ranks."""
    per, extra = divmod(len(rows), world)
    start = r * per + min(r, extra)
    return rows[start : start + per + (r < extra)]


class LossModule(torch.nn.Module):
    """`loss_fn(model, batch)` as a module, so that DDP sees the forward it must synchronise."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class Parallel:
    """How the loop computes a micro-batch's loss: directly, through DDP, or on a model sharded by
    FSDP2 (`sharded`) when world > 1.

    `loss(batch)` runs the forward; `sync(last)` is the context for a micro-batch's forward and
    backward: gradients are reduced only on the last micro-batch of an accumulation window."""

    def __init__(self, model, loss_fn, device: torch.device, sharded: bool = False):
        self.model, self.loss_fn = model, loss_fn
        self.ddp = None
        self.fsdp = sharded and dist.is_initialized() and world_size() > 1
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            if hasattr(model, "peft_config") or not hasattr(type(model), "_from_config"):
                from gpt2tune.errors import UserError

                raise UserError("train.distributed fsdp shards Hugging Face models trained fully or partially; "
                                "use ddp for adapter methods and classifiers")

            # an empty copy (no memory) to rebuild a plain model from the gathered weights at the end
            with torch.device("meta"):
                self.skeleton = type(model)._from_config(model.config)
            blocks = getattr(getattr(model, "transformer", None), "h", None)
            for blk in blocks or []:  # one all-gather per block: only one block's weights whole at a time
                fully_shard(blk)
            fully_shard(model)
        elif dist.is_initialized() and world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            # gradient_as_bucket_view: .grad are views into DDP's buckets (no copy after the all-reduce)
            self.ddp = DDP(LossModule(model, loss_fn), device_ids=ids, gradient_as_bucket_view=True)

    def loss(self, batch):
        return self.loss_fn(self.model, batch) if self.ddp is None else self.ddp(batch)

    def sync(self, last: bool):
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def gathered_model(self):
        """A plain (unsharded) copy of an FSDP model with its trained weights (every rank must call)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        plain = self.skeleton.to_empty(device="cpu")
        if full:  # rank 0 (the others get nothing and save nothing)
            plain.load_state_dict(full, strict=False)
            plain.tie_weights()
        for n, p in self.model.named_parameters():  # keep the method's choice of trainable weights
            q = plain.get_parameter(n)
            q.requires_grad_(p.requires_grad)
        return plain
