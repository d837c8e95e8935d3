"""Full fine-tuning: every parameter learns; the whole model is saved (RUN/model/)."""

from __future__ import annotations

from gpt2tune.method.registry import Method, register


def apply_full(model, cfg=None, tokenizer=None, seed: int = 0):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


register(Method("full", apply_full))
