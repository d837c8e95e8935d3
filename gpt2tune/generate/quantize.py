"""Dynamic int8 quantization for CPU inference, and how far it moves the logits.

GPT-2's projections are `transformers` Conv1D modules (y = x W + b, W stored in x out), which
`torch.ao.quantization.quantize_dynamic` does not know; they are first turned into equivalent
`nn.Linear` modules (W transposed), then every Linear (the LM head included) gets int8 weights
with activations quantized on the fly per batch. Embeddings and layer norms stay fp32.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn


def conv1d_to_linear(module: nn.Module) -> int:
    """Replace every transformers Conv1D below `module` by the same nn.Linear; return how many."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(child.weight.t())
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
            setattr(module, name, lin)
            n += 1
        else:
            n += conv1d_to_linear(child)
    return n


def quantize_int8(model):
    """An int8 dynamically quantized copy of `model` (CPU only); the original is left untouched."""
    from torch.ao.quantization import quantize_dynamic

    q = copy.deepcopy(model).float().cpu().eval()
    conv1d_to_linear(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors in favour of torchao
        q = quantize_dynamic(q, {nn.Linear}, dtype=torch.qint8)
    q.eval()
    return q


@torch.inference_mode()
def logits_drift(reference, other, ids: torch.Tensor) -> dict:
    """How far `other`'s logits are from `reference`'s on the same ids: max and mean absolute
    difference, share of positions with the same top-1 token, mean KL(reference || other)."""
    a = reference(input_ids=ids).logits.float()
    b = other(input_ids=ids).logits.float()
    d = (a - b).abs()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"max_abs_logit_diff": round(float(d.max()), 4), "mean_abs_logit_diff": round(float(d.mean()), 4),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "mean_kl": round(float(kl.mean()), 5)}


def greedy_speed(model, prompt: list[int], eos_id, new_tokens: int = 32) -> float:
    """Greedy tokens/s of one sequence (end marker allowed only after `new_tokens`)."""
    from gpt2tune.generate.decode import decode
    from gpt2tune.generate.sampling import Sampling

    s = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens, greedy=True)
    decode(model, [prompt], eos_id, Sampling(max_new_tokens=2, greedy=True))  # warm-up
    t0 = time.perf_counter()
    res = decode(model, [prompt], eos_id, s)
    return sum(len(r.ids) for r in res) / max(time.perf_counter() - t0, 1e-9)
