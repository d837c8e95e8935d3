"""Classification loss for `gpt2tune.train.loop.Trainer`: mean cross-entropy over the
examples of a batch, plus their count and the number predicted right."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, int, torch.Tensor]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    labels = batch["labels"]
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).sum()
    return loss, int(labels.numel()), correct
