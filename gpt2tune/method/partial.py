"""Partial fine-tuning: freeze all parameters, unfreeze chosen blocks and modules."""

from __future__ import annotations

import re

from gpt2tune.errors import UserError
from gpt2tune.method.registry import Method, register

_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.(.+)$")


def block_indices(layers, n_layer: int) -> set[int]:
    if isinstance(layers, list):
        bad = [i for i in layers if not -n_layer <= i < n_layer]
        if bad:
            raise UserError(f"method.layers: block {bad[0]} does not exist (the model has {n_layer} blocks)")
        return {i % n_layer for i in layers}
    if layers == "all":
        return set(range(n_layer))
    if layers == "none":
        return set()
    kind, _, k = layers.partition(":")
    k = int(k)
    if k > n_layer:
        raise UserError(f"method.layers {layers}: the model has only {n_layer} blocks")
    return set(range(n_layer - k, n_layer)) if kind == "top" else set(range(k))


def _kind(rest: str) -> str:
    if rest.startswith("attn."):
        return "attention"
    if rest.startswith("mlp."):
        return "mlp"
    return "layernorm"  # ln_1, ln_2


def apply_partial(model, cfg):
    n_layer = model.config.n_layer
    if cfg.freeze_bottom is not None:
        if cfg.freeze_bottom > n_layer:
            raise UserError(f"method.freeze_bottom {cfg.freeze_bottom}: the model has only {n_layer} blocks")
        blocks, modules = set(range(cfg.freeze_bottom, n_layer)), {"attention", "mlp", "layernorm", "final-norm", "head"}
    else:
        blocks, modules = block_indices(cfg.layers, n_layer), set(cfg.modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        m = _BLOCK.search(name)
        if m:
            train = int(m.group(1)) in blocks and _kind(m.group(2)) in modules
        elif ".wte." in f".{name}" or ".wpe." in f".{name}":
            train = "embeddings" in modules
        elif ".ln_f." in f".{name}":
            train = "final-norm" in modules
        elif name.startswith(("lm_head", "score")) or ".lm_head." in name or ".score." in name:
            train = "head" in modules
        else:
            train = False
        if train:
            p.requires_grad_(True)
    if "head" in modules and hasattr(model, "lm_head") and model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight.requires_grad_(True)  # tied: training the head trains the embeddings
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("method partial: the rule leaves no trainable parameter")
    return model


register(Method("partial", lambda model, cfg, tokenizer=None, seed=0: apply_partial(model, cfg)))
