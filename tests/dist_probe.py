"""Run `gpt2tune` with every Python-level collective checked: each tensor handed to one must live on
the backend's device (`distributed.comm_device()`: the rank's GPU for NCCL, the CPU for gloo).
Used as a torchrun script by tests/test_distributed.py (gloo) and tests/test_gpu.py (NCCL)."""

import functools
import sys

import torch
import torch.distributed as dist

from gpt2tune.train import distributed


def _checked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        want = distributed.comm_device()
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if torch.is_tensor(t) and t.device != want:
                    raise RuntimeError(f"{fn.__name__} called with a tensor on {t.device}; the backend needs {want}")
        return fn(*args, **kwargs)
    return wrapper


for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor",
             "reduce_scatter_tensor", "reduce", "gather", "scatter"):
    if hasattr(dist, name):
        setattr(dist, name, _checked(getattr(dist, name)))

if __name__ == "__main__":
    from gpt2tune.cli import main

    sys.exit(main(sys.argv[1:]))
