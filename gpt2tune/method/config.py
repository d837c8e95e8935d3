"""One typed config per fine-tuning method (the recipe's `method` section).

`method.name` selects the class; each class lists only the knobs its method has.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FullMethod(_Method):
    """Every parameter trains."""

    name: Literal["full"] = "full"


# The union grows as methods are added; `name` is the discriminator.
MethodConfig = FullMethod
METHOD_NAMES = ["full"]
