"""One typed config per fine-tuning method (the recipe's `method` section).

`method.name` selects the class; each class lists only the knobs its method has.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


# The union grows as methods are added; `name` is the discriminator.
MethodConfig = Union[FullMethod, PartialMethod]
METHODS = {"full": FullMethod, "partial": PartialMethod}
