"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), gpt2tune's own.

Each adapter maps a sub-layer's output h to h + up(act(down(h))): down-projection to a
small width, a nonlinearity, an up-projection that starts at zero (so a fresh adapter
leaves the model unchanged), and the residual. It sits on the output projection of a
block's attention (`attn.c_proj`) and/or MLP (`mlp.c_proj`), before dropout and the
block's own residual add, where Houlsby places it.

The adapter is a child module named `adapter` of that projection (so its parameters are
`transformer.h.N.attn.c_proj.adapter.down.weight`, ...), applied by a forward hook; the
base model's own parameter names do not change. Saved as RUN/adapter/adapter.safetensors
(only the adapters' tensors) and adapter.json (their config).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from gpt2tune.errors import UserError
from gpt2tune.method.registry import Method, register

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"
_ACT = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
_SITES = {"attention": "attn", "mlp": "mlp"}


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACT[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _apply_adapter(module, args, output):
    """Forward hook on a projection: run its `adapter` child (a module-level function, so
    copies of the model keep working)."""
    adapter = module._modules.get("adapter")
    return output if adapter is None else adapter(output)


# what `model.fast_gpt2` and the fast decoder recognise (and apply themselves: the projection's
# `adapter` child on its output), without importing this module from below
_apply_adapter.output_adapter = True


def _blocks(model):
    body = getattr(model, "transformer", None)
    if body is None or not hasattr(body, "h"):
        raise UserError("method adapter: expected a GPT-2 model (model.transformer.h blocks)")
    return body.h


def add_adapters(model, cfg) -> nn.Module:
    """Freeze `model` and attach fresh adapters as `cfg` (an AdapterMethod) says; return it."""
    for p in model.parameters():
        p.requires_grad_(False)
    dim = model.config.n_embd
    for block in _blocks(model):
        for site in cfg.placement:
            proj = getattr(block, _SITES[site]).c_proj
            if "adapter" in proj._modules:
                raise UserError("method adapter: the model already has adapters")
            ref = proj.weight
            proj.adapter = Bottleneck(dim, cfg.bottleneck, cfg.activation).to(device=ref.device, dtype=ref.dtype)
            proj.register_forward_hook(_apply_adapter)
        if cfg.train_layernorm:
            for ln in (block.ln_1, block.ln_2):
                ln.requires_grad_(True)
    if hasattr(model, "score"):  # a classification head is new: it must learn too
        model.score.requires_grad_(True)
    return model


def remove_adapters(model) -> nn.Module:
    """Detach every adapter (and its hook), leaving the plain base model."""
    for module in model.modules():
        if isinstance(module._modules.get("adapter"), Bottleneck):
            del module._modules["adapter"]
            for key in [k for k, fn in module._forward_hooks.items() if fn is _apply_adapter]:
                del module._forward_hooks[key]
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """What this method trained: the adapters, plus layer norms / head when they train."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad or ".adapter." in n}


def save_adapters(model, cfg, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")


def load_adapters(model, folder: Path):
    """Attach the adapters saved in `folder` to a base `model` (returns it, frozen)."""
    from safetensors.torch import load_file

    from gpt2tune.method.config import AdapterMethod

    try:
        cfg = AdapterMethod.model_validate_json((folder / CONFIG).read_text(encoding="utf-8"))
        state = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as err:
        raise UserError(f"adapter folder {folder} is unreadable: {str(err).splitlines()[0]}") from None
    add_adapters(model, cfg)
    params = dict(model.named_parameters())
    missing = [n for n in params if ".adapter." in n and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise UserError(f"adapter folder {folder} does not fit this base model "
                        f"({'missing ' + missing[0] if missing else 'unexpected ' + unknown[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _apply(model, cfg, tokenizer=None, seed: int = 0):
    with torch.random.fork_rng(devices=[]):  # the same fresh adapters for the same seed
        torch.manual_seed(seed)
        return add_adapters(model, cfg)


register(Method("adapter", _apply, format="gpt2tune-adapter",
                save=lambda model, cfg, out, base: save_adapters(model, cfg, out),
                plain_base=lambda model: remove_adapters(copy.deepcopy(model)),
                load=lambda base, folder, name: load_adapters(base, folder)))
