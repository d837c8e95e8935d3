"""One typed config per fine-tuning method (the recipe's `method` section).

`method.name` selects the class; each class lists only the knobs its method has.
"""

from __future__ import annotations

from typing import Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BLOCK_MODULES = ["attention", "mlp", "layernorm"]
GLOBAL_MODULES = ["embeddings", "final-norm", "head"]
ModuleName = Literal["attention", "mlp", "layernorm", "embeddings", "final-norm", "head"]


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FullMethod(_Method):
    """Every parameter trains."""

    name: Literal["full"] = "full"


class PartialMethod(_Method):
    """Freeze everything, then unfreeze by rule.

    `layers` picks transformer blocks: "all", "none", "top:K", "bottom:K" or a list of
    indices; inside them the block `modules` (attention, mlp, layernorm) train, and the
    global ones (embeddings, final-norm, head) train if listed.
    One-liners: `{name: partial, freeze_bottom: 6}` (train everything above block 6) and
    `{name: partial, layers: all, modules: [attention]}` (train only attention).
    The default is the classic classifier setup: last block + final norm + head.
    Note: GPT-2's LM head is tied to the token embeddings, so `head` trains both there.
    """

    name: Literal["partial"] = "partial"
    layers: Union[str, list[int]] = "top:1"
    modules: list[ModuleName] = Field(default_factory=lambda: ["attention", "mlp", "layernorm", "final-norm", "head"])
    freeze_bottom: Optional[int] = Field(None, ge=0, description="freeze embeddings and the bottom N blocks, train the rest")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, str) and v not in ("all", "none"):
            kind, _, k = v.partition(":")
            if kind not in ("top", "bottom") or not k.isdigit():
                raise ValueError("layers must be 'all', 'none', 'top:K', 'bottom:K' or a list of block indices")
        return v


# GPT-2 module names that peft methods can target (Conv1D layers; `c_proj` means both
# `attn.c_proj` and `mlp.c_proj`, write `attn.c_proj` / `mlp.c_proj` to pick one).
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj"]


def _check_targets(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("list at least one module")
    bad = [t for t in v if t not in GPT2_LINEAR]
    if bad:
        raise ValueError(f"unknown GPT-2 module {bad[0]!r}; valid: {', '.join(GPT2_LINEAR)}")
    return v


class LoraMethod(_Method):
    """LoRA through peft: W + (alpha / rank) * B A on the target Conv1D layers (B starts at zero)."""

    name: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["c_attn"])

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        return _check_targets(v)


class PromptTuningMethod(_Method):
    """A soft prompt of `num_virtual_tokens` learned embeddings before every sample (peft).

    Initialised from the embeddings of `init_text` (repeated to fill the prompt) or, without
    it, of tokens sampled from the vocabulary. They use `num_virtual_tokens` positions of
    the model's context.
    """

    name: Literal["prompt-tuning"] = "prompt-tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    init_text: Optional[str] = None


class PrefixTuningMethod(_Method):
    """Learned key/value prefixes of `num_virtual_tokens` in every attention layer (peft).
    `projection: true` reparametrises them through a 2-layer MLP of `projection_size`."""

    name: Literal["prefix-tuning"] = "prefix-tuning"
    num_virtual_tokens: int = Field(20, gt=0)
    projection: bool = False
    projection_size: int = Field(256, gt=0)


class IA3Method(_Method):
    """(IA)^3 through peft: learned per-channel scales on attention and feed-forward activations."""

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] = Field(default_factory=lambda: ["c_attn", "mlp.c_proj"])
    feedforward_modules: list[str] = Field(default_factory=lambda: ["mlp.c_proj"])

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        return _check_targets(v)

    @model_validator(mode="after")
    def _ff_among_targets(self):
        bad = [m for m in self.feedforward_modules if m not in self.target_modules]
        if bad:
            raise ValueError(f"feedforward_modules: {bad[0]!r} is not among target_modules")
        return self


class AdapterMethod(_Method):
    """Bottleneck adapters (gpt2tune's own): h + up(act(down(h))) on the output of a block's
    attention and/or MLP projection, before the residual add; `up` starts at zero so the
    model starts unchanged. Houlsby: placement [attention, mlp]; Pfeiffer: [mlp]."""

    name: Literal["adapter"] = "adapter"
    bottleneck: int = Field(32, gt=0, description="width of the adapter's hidden layer")
    placement: list[Literal["attention", "mlp"]] = Field(default_factory=lambda: ["attention", "mlp"], min_length=1)
    activation: Literal["gelu", "relu", "tanh"] = "gelu"
    train_layernorm: bool = Field(False, description="also train the blocks' layer norms (as Houlsby et al.)")


# The recipe's `method` section: one of these, by `name` (the discriminator). A new method adds its
# class here and registers its implementation (`method.registry`).
MethodConfig = Union[FullMethod, PartialMethod, LoraMethod, PromptTuningMethod, PrefixTuningMethod, IA3Method,
                     AdapterMethod]
METHODS = {c.model_fields["name"].default: c for c in get_args(MethodConfig)}  # name -> config class
