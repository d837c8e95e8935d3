"""The fine-tuning methods, each registered once by the module that implements it.

A method module (`full`, `partial`, `adapter`, `via_peft`) calls `register(Method(...))` with what
the rest of gpt2tune asks of a method: how to apply it to a model, whether it saves the whole model
(RUN/model/) or only its own tensors over a frozen base (RUN/adapter/, rebuilt from rebuild.json),
how to save, strip and load those tensors, and whether they fold into the base weights. Its options
are a config class in `method.config` (the recipe's `method` section). Adding a method touches no
if-chain: a config class, a module that registers it, and its import in `method/__init__.py`
(whose `method(name)` looks one up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

@dataclass(frozen=True)
class Method:
    name: str  # the recipe's method.name
    apply: Callable  # (model, cfg, tokenizer, seed) -> the model to train (only the method's parameters learn)
    # for methods that train tensors of their own over a frozen base (saved in RUN/adapter/):
    format: Optional[str] = None  # rebuild.json's "format"; None: the whole model is saved (RUN/model/)
    save: Optional[Callable] = None  # (model, cfg, out, base) -> None: the method's tensors into `out`
    plain_base: Optional[Callable] = None  # model -> a copy of the frozen base, without the method
    load: Optional[Callable] = None  # (base, folder, name) -> the base with the saved tensors, for inference
    mergeable: bool = False  # folds into the base weights (`merge_and_unload`): decodes as a plain GPT-2

    @property
    def own_tensors(self) -> bool:
        """Trains tensors of its own on a frozen base (which can be switched off), not the base's weights."""
        return self.format is not None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.format is not None and None in (method.save, method.plain_base, method.load):
        raise ValueError(f"method {method.name!r}: a method with its own tensors saves, strips and loads them")
    _METHODS[method.name] = method
    return method


def registered() -> dict[str, Method]:
    """name -> Method of every method registered so far (`gpt2tune.method.method` asks after importing them all)."""
    return dict(_METHODS)
