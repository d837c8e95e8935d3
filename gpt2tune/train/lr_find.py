"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks",
section 3.3) as fastai's `lr_find` runs it: train from the starting weights while the learning
rate grows exponentially from `start` to `end`, one optimizer step per value, and watch the loss.

The loss is smoothed with an exponential moving average (beta 0.98, bias-corrected); the test stops
early once the smoothed loss exceeds `diverge` x the best so far (or is not finite). The suggestion
is where the smoothed loss falls fastest against log(lr) (fastai's `steep`), with the lr of the
minimum / 10 as a second, more cautious value; both ignore the first tenth of the ramp and its last
points, where the average has not settled or the run diverges.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from gpt2tune.data.dataset import epoch_batches
from gpt2tune.errors import UserError
from gpt2tune.train.device import autocast, pick_device, pick_precision
from gpt2tune.train.objective import count_targets, lm_loss
from gpt2tune.train.optim import build_optimizer, optimizer_step


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average (what fastai plots)."""
    out, avg = [], 0.0
    for i, x in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: Optional[int] = None, skip_end: int = 5) -> dict:
    """{"steepest": lr where d(smoothed)/d(log lr) is most negative, "minimum_over_10": lr of the
    lowest smoothed loss / 10}, over the ramp without its first tenth and last `skip_end` points."""
    n = len(lrs)
    if n != len(smoothed):
        raise ValueError("lrs and losses differ in length")
    a = n // 10 if skip_start is None else skip_start
    b = n - skip_end
    if b - a < 3:  # too short to trim
        a, b = 0, n
    if b - a < 2:
        raise UserError(f"the range test ran only {n} steps: too few to suggest a learning rate "
                        f"(use more --steps or a lower --start)")
    xs, ys = [math.log(v) for v in lrs[a:b]], smoothed[a:b]
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    i = min(range(len(slopes)), key=slopes.__getitem__)
    j = min(range(len(ys)), key=ys.__getitem__)
    return {"steepest": lrs[a + i], "steepest_slope": slopes[i], "minimum_over_10": lrs[a + j] / 10,
            "minimum_lr": lrs[a + j], "minimum_loss": ys[j]}


def check_ramp(start: float, end: float, steps: int, diverge: float = 4.0) -> None:
    if not (0 < start < end) or not math.isfinite(end):
        raise UserError(f"lr-find needs 0 < --start < --end (got {start:g}, {end:g})")
    if steps < 5:
        raise UserError(f"lr-find needs --steps >= 5 (got {steps})")
    if not diverge > 1:
        raise UserError(f"lr-find needs --diverge > 1 (got {diverge:g})")


def lr_range_test(model, train_rows: list, collate: Callable, cfg, loss_fn=lm_loss, start: float = 1e-7,
                  end: float = 1.0, steps: int = 100, diverge: float = 4.0, beta: float = 0.98,
                  batching: str = "group", block: int = 128, log: Optional[Callable[[str], None]] = None,
                  progress: bool = True) -> dict:
    """Run the ramp on `model` (its weights change: pass a copy you can lose). `cfg` is the recipe's
    train section (device, precision, batch_size, grad_accum, weight_decay, betas, grad_clip, seed)."""
    from tqdm.auto import tqdm

    check_ramp(start, end, steps, diverge)
    if not train_rows:
        raise UserError("no training samples left after cleaning and splitting")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    device = pick_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    opt = build_optimizer(model, start, cfg.weight_decay, cfg.betas, device, kind=getattr(cfg, "optimizer", "adamw"))
    params = [p for g in opt.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    factor = (end / start) ** (1.0 / (steps - 1))
    epoch, pos, batches = 0, 0, epoch_batches(train_rows, cfg.batch_size, batching, cfg.seed, 0, block)
    lrs, losses, smoothed = [], [], []
    best, avg, stopped = math.inf, 0.0, None
    bar = tqdm(total=steps, disable=not progress, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    for step in range(steps):
        lr = start * factor**step
        for g in opt.param_groups:
            g["lr"] = lr
        window = []
        for _ in range(cfg.grad_accum):
            if pos >= len(batches):
                epoch, pos = epoch + 1, 0
                batches = epoch_batches(train_rows, cfg.batch_size, batching, cfg.seed, epoch, block)
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(batches[pos]).items()}
            pos += 1
            window.append((b, count_targets(b)))
        total = max(sum(n for _, n in window), 1)
        loss_sum = 0.0
        for b, n in window:
            with autocast(device, dtype):
                loss, _, _ = loss_fn(model, b)
            part = loss * (n / total)
            (scaler.scale(part) if scaler is not None else part).backward()
            loss_sum += float(loss.detach()) * n / total
        optimizer_step(opt, params, cfg.grad_clip, scaler)
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if not math.isfinite(loss_sum):
            stopped = {"step": step + 1, "lr": lr, "why": "the loss is not finite"}
            break
        avg = beta * avg + (1 - beta) * loss_sum
        s = avg / (1 - beta ** (step + 1))
        lrs.append(lr)
        losses.append(loss_sum)
        smoothed.append(s)
        best = min(best, s)
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{s:.3f}")
        if s > diverge * best:
            stopped = {"step": step + 1, "lr": lr, "why": f"the smoothed loss {s:.3g} exceeds {diverge:g} x the best {best:.3g}"}
            break
    bar.close()
    if stopped:
        log(f"lr-find: stopped at step {stopped['step']} (lr {stopped['lr']:.2e}): {stopped['why']}")
    return {"lrs": lrs, "losses": losses, "smoothed": smoothed, "stopped_early": stopped,
            "suggestion": suggest(lrs, smoothed), "start": start, "end": end, "steps": steps,
            "steps_done": len(lrs), "beta": beta, "diverge": diverge}


def plot_lr_find(result: dict, path: Path, title: str = "") -> None:
    """Loss against learning rate (log x): raw and smoothed, the suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, raw, sm, sug = result["lrs"], result["losses"], result["smoothed"], result["suggestion"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(lrs, raw, color="tab:blue", alpha=0.25, lw=1, label="loss")
    ax.plot(lrs, sm, color="tab:blue", lw=2, label="smoothed loss")
    for key, color, what in (("steepest", "tab:red", "steepest descent"), ("minimum_over_10", "tab:green", "minimum / 10")):
        ax.axvline(sug[key], color=color, ls="--", label=f"{what}: {sug[key]:.2e}")
    ax.set_xscale("log")
    top = max(sm[: max(2, len(sm) // 10)] + [sm[0]])  # the start of the ramp sets the scale, not its blow-up
    low = min(sm + raw)
    ax.set_ylim(low - 0.1 * (top - low + 1e-9), top + 0.3 * (top - low + 1e-9))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title or "Learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
