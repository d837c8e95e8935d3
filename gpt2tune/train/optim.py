"""AdamW with decoupled weight decay on matrices only (its state in fp32, bf16 or 8 bits:
`train.optimizer`, see `optim_lowmem`), and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from gpt2tune.errors import UserError
from gpt2tune.train.optim_lowmem import LowMemAdamW


OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")


def build_optimizer(model, lr: float, weight_decay: float, betas, device: torch.device, fused: bool = False,
                    kind: str = "adamw"):
    """`kind` (train.optimizer): adamw, torch's AdamW with fp32 moments (fused on CUDA, and on the
    CPU with `fused`, else foreach); adamw_bf16 / adamw_8bit, `optim_lowmem.LowMemAdamW`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if kind == "adamw":
        kw = {"fused": True} if device.type == "cuda" or (fused and device.type == "cpu") else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kw)
    if kind not in OPTIMIZERS:
        raise UserError(f"train.optimizer: unknown optimizer {kind!r} (one of {', '.join(OPTIMIZERS)})")
    if any(_is_dtensor(p) for _, p in named):
        raise UserError(f"train.optimizer {kind} needs whole parameters: it does not run with train.distributed "
                        f"fsdp (use ddp, or train.optimizer adamw)")
    return LowMemAdamW(groups, lr=lr, betas=tuple(betas), state=kind.removeprefix("adamw_"))


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(p, DTensor)


def optimizer_step(opt, params, max_norm: float, scaler=None) -> None:
    """One update: with an enabled (fp16) `GradScaler`, unscale, clip, step unless a gradient
    overflowed and adapt the scale; else `clip_and_step`."""
    if scaler is None or not scaler.is_enabled():
        clip_and_step(opt, params, max_norm)
        return
    scaler.unscale_(opt)
    if max_norm:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()


def clip_and_step(opt, params, max_norm: float) -> None:
    """`clip_grad_norm_(params, max_norm)` then `opt.step()`. A fused optimizer takes the clip
    factor inside its kernel (as AMP's gradient scale, which it divides the gradients by) instead of
    a separate pass that reads and rewrites every gradient: the same update, one pass less."""
    if not max_norm:
        opt.step()
        return
    if not opt.defaults.get("fused"):
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # (FSDP's DTensor gradients: the norm over all shards)
        opt.step()
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        opt.step()
        return
    norm = torch.nn.utils.get_total_norm(grads, 2.0).float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    opt.grad_scale = 1.0 / coef
    try:
        opt.step()
    finally:
        del opt.grad_scale


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


def build_scheduler(optimizer, schedule: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup, total))
