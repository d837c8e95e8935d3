"""Training objectives and validation. Padding is never counted: labels -100 are ignored."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2tune.data.dataset import IGNORE, model_inputs
from gpt2tune.model.fast_gpt2 import FastGPT2, right_padded, supported, tune_allocator


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Mean next-token cross-entropy over real tokens; also their count and #correct."""
    out = model(**model_inputs(batch))
    labels = batch["labels"][:, 1:]
    # methods that prepend virtual tokens (prompt tuning) return longer logits: align on the right
    logits = out.logits[:, -batch["labels"].size(1):-1, :]
    flat = logits.reshape(-1, logits.size(-1)).float()
    flat_labels = labels.reshape(-1)
    valid = flat_labels != IGNORE
    n = int(valid.sum())
    # sum / count rather than "mean": a batch without targets gives 0 with zero gradients, not nan
    loss = F.cross_entropy(flat, flat_labels, ignore_index=IGNORE, reduction="sum") / max(n, 1)
    with torch.no_grad():
        correct = (flat.argmax(-1) == flat_labels) & valid
    return loss, n, correct.sum()


def make_fast_loss(model, tune_malloc: bool = True, direct_grads: bool = True, checkpoint: bool = False):
    """A loss function bound to `model` (what `Trainer(loss_fn=...)` takes), or None when the
    model is not a plain GPT-2 LM (the caller then keeps `lm_loss`). `tune_malloc`: see
    `tune_allocator` (on CPU only); `direct_grads`, `checkpoint` (gradient checkpointing): see `FastGPT2`."""
    if supported(model):
        return None
    if tune_malloc and next(iter(model.parameters())).device.type == "cpu":
        tune_allocator()
    fast = FastGPT2(model, direct_grads, checkpoint)

    def loss_fn(m, batch):
        if m is not model or not right_padded(batch.get("attention_mask")):
            return lm_loss(m, batch)  # another model (should not happen), or left padding: the exact HF path
        return fast.loss(batch)

    loss_fn.fast = fast
    return loss_fn


def count_targets(batch: dict) -> int:
    """How many targets a batch trains on, before its forward: next-token labels other than -100
    (labels [B, T]) or one per example (classification labels [B])."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate(model, batches, to_device, autocast_ctx, loss_fn=lm_loss) -> dict:
    """Token-weighted loss, perplexity and accuracy over all validation batches."""
    was_training = model.training
    model.eval()
    total, n, correct = 0.0, 0, 0
    for b in batches:
        b = to_device(b)
        with autocast_ctx():
            loss, count, corr = loss_fn(model, b)
        total += float(loss) * count
        n += count
        correct += int(corr)
    model.train(was_training)
    if n == 0:
        return {}
    mean = total / n
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": correct / n, "tokens": n}
