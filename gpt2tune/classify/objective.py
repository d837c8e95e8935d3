"""Classification loss for `gpt2tune.train.loop.Trainer`: mean cross-entropy over the
examples of a batch, plus their count and the number predicted right."""

from __future__ import annotations

import math

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


@torch.no_grad()
def evaluate_classifier(model, batches, to_device, autocast_ctx) -> dict:
    """Validation of a classifier in one pass: loss, accuracy and macro-F1 (what early stopping
    and the validation rows of metrics.jsonl can name)."""
    from gpt2tune.classify.metrics import classification_report

    was_training = model.training
    model.eval()
    total, true, pred = 0.0, [], []
    n_classes = 0
    for b in batches:
        b = to_device(b)
        with autocast_ctx():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
        true += b["labels"].tolist()
        pred += logits.argmax(-1).tolist()
        n_classes = logits.size(-1)
    model.train(was_training)
    if not true:
        return {}
    r = classification_report(true, pred, [str(c) for c in range(n_classes)])
    loss = total / len(true)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": r["accuracy"],
            "macro_f1": r["macro_f1"], "tokens": len(true)}
