"""Training objectives and validation. Padding is never counted: labels -100 are ignored."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2tune.data.dataset import IGNORE


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Mean next-token cross-entropy over real tokens; also their count and #correct."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    # methods that prepend virtual tokens (prompt tuning) return longer logits: align on the right
    logits = out.logits[:, -batch["labels"].size(1):-1, :]
    flat = logits.reshape(-1, logits.size(-1)).float()
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(flat, flat_labels, ignore_index=IGNORE)
    with torch.no_grad():
        valid = flat_labels != IGNORE
        correct = (flat.argmax(-1) == flat_labels) & valid
    return loss, int(valid.sum()), correct.sum()


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
