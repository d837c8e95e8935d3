"""Training memory: gradient checkpointing, and an estimate of peak memory checked against what
the device has free before the first step.

The estimate adds weights, gradients and AdamW's two moments (fp32 master weights whatever the
compute precision; the moments 8 bytes per trained parameter, 4 with `train.optimizer: adamw_bf16`,
about 2 with adamw_8bit), the activations autograd keeps for one micro-batch (per block and token, after
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models": about
34·d + 5·heads·T values in 16-bit terms, i.e. 17·d + 2.5·heads·T elements; with checkpointing
only each block's input plus one block's inside) and the output layer's logits. It is an estimate
(allocator slack, temporary buffers and the framework itself come on top): `bench/memory.py`
measures the real peak beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2tune.errors import UserError
from gpt2tune.model.fast_gpt2 import unwrap
from gpt2tune.train.optim_lowmem import state_bytes


def enable_gradient_checkpointing(model) -> None:
    """transformers' own gradient checkpointing (non-reentrant) on the model under any peft wrapper."""
    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inner.config.use_cache = False


@dataclass
class Estimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        gb = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        return (f"{gb(self.total)} GiB (weights {gb(self.weights)}, gradients {gb(self.gradients)}, optimizer "
                f"{gb(self.optimizer)}, activations {gb(self.activations)}, logits {gb(self.logits)})")


def estimate(model, batch_size: int, seq_len: int, dtype: torch.dtype, checkpointing: bool = False,
             chunked_loss: bool = False, optimizer: str = "adamw") -> Estimate:
    """Peak training memory of one micro-batch of `batch_size` x `seq_len` tokens. `chunked_loss`:
    train.fast's fused head + loss, which never holds the whole [tokens, vocab] logits. `optimizer`:
    train.optimizer, whose moments take 8 (adamw), 4 (adamw_bf16) or ~2 (adamw_8bit) bytes per
    trained parameter (tensors under 4096 elements: 8)."""
    cfg = getattr(unwrap(model), "config", None)
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    d = getattr(cfg, "n_embd", 768)
    heads = getattr(cfg, "n_head", 12)
    layers = getattr(cfg, "n_layer", 12)
    # a language model's head has a row per vocabulary entry; a classifier's one per class
    outputs = getattr(cfg, "vocab_size", 50257) if hasattr(unwrap(model), "lm_head") else getattr(cfg, "num_labels", 2)
    act_bytes = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    tokens = batch_size * seq_len
    per_block = tokens * (17 * d + 2.5 * heads * seq_len) * act_bytes
    if checkpointing:  # each block's input kept, one block's inside alive during its recomputation
        activations = layers * tokens * d * 4 + per_block
    else:
        activations = layers * per_block
    if not hasattr(unwrap(model), "lm_head"):  # a classifier: one row of logits per example
        logits = batch_size * outputs * 12
    elif chunked_loss:
        logits = min(tokens, 512) * outputs * 4 * 3
    else:  # logits, their fp32 copy for the loss, and the gradient
        logits = tokens * outputs * (act_bytes + 4 + 4)
    opt_bytes = trainable * 8 if optimizer == "adamw" else state_bytes([p.numel() for p in params if p.requires_grad],
                                                                          optimizer)
    return Estimate(weights, trainable * 4, opt_bytes, int(activations), int(logits))


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: free GPU memory, or available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(est: Estimate, free: int, device: torch.device, checkpointing: bool) -> None:
    if est.total <= free:
        return
    advice = ["a smaller train.batch_size with train.grad_accum for the same effective batch",
              "a shorter data.max_length"]
    if not checkpointing:
        advice.insert(0, "train.gradient_checkpointing: true")
    if est.optimizer > 1.5 * est.gradients:  # fp32 moments (4 bytes of gradient, 8 of state per parameter)
        advice.append("train.optimizer: adamw_8bit (a quarter of AdamW's state)")
    advice.append("a method that trains fewer parameters (lora)")
    raise UserError(f"training would need about {est.describe()} but {device} has {free / 2**30:.2f} GiB free; "
                    f"try {'; '.join(advice)} (or train.check_memory: false to try anyway)")
