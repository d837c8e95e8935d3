"""Method: decide which parameters learn (`apply_method`) and how the result is saved
(`save_trained`); `io` loads any run back. Each method is registered once (`registry`) by the
module that implements it:

- full (`full`), partial (`partial`): the whole model is saved in RUN/model/ (a plain Hugging
  Face folder).
- lora, ia3, prompt-tuning, prefix-tuning (through peft: `via_peft`) and adapter (ours,
  `adapter`): the base stays frozen and only the method's own tensors are saved, in RUN/adapter/,
  with rebuild.json saying how to rebuild the base (its folder or hub id; a scratch base is saved
  in RUN/base/) and where the tokenizer is (RUN/tokenizer/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2tune.errors import UserError
from gpt2tune.method.registry import Method, registered

REBUILD = "rebuild.json"


def _register_all() -> None:
    """Import the method modules (each registers its methods) when a method is first asked for:
    importing the package (the recipe does) stays free of torch and peft."""
    from gpt2tune.method import adapter, full, partial, via_peft  # noqa: F401


def method(name: str) -> Method:
    """The registered method `name` (a UserError naming the known ones otherwise)."""
    _register_all()
    known = registered()
    if name not in known:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def method_names() -> list[str]:
    _register_all()
    return list(registered())


def apply_method(model, cfg, tokenizer=None, seed: int = 0):
    """Prepare `model` for fine-tuning with the method described by `cfg` (a method config).

    Returns the model to train (for peft methods a wrapper around `model`). `tokenizer`
    is needed by prompt tuning's `init_text`; `seed` makes the new weights reproducible.
    """
    return method(cfg.name).apply(model, cfg, tokenizer, seed)


def _base_name(model) -> str:
    from gpt2tune.method.via_peft import is_peft, unwrap

    inner = unwrap(model).get_base_model() if is_peft(model) else model
    return getattr(inner.config, "_name_or_path", "") or ""


def _generates(model) -> bool:
    """Whether the model continues text (a classifier has a `score` head and no `lm_head`)."""
    from gpt2tune.method.via_peft import unwrap

    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a peft model's base
    return not hasattr(inner, "score")


def save_trained(model, tokenizer, run_dir, cfg) -> str:
    """Save what the method trained in the run folder; return the sub-folder name.

    Tokenizers go through `save_tokenizer`: a language model's folder then works with plain
    `transformers`' text-generation pipeline as with gpt2tune (BERT-style Chinese vocabularies)."""
    from gpt2tune.model.quiet import quiet_transformers
    from gpt2tune.model.tokenizer import save_tokenizer

    run_dir = Path(run_dir)
    gen = _generates(model)
    m = method(cfg.name)
    if not m.own_tensors:  # the whole model
        out = run_dir / "model"
        with quiet_transformers():
            model.save_pretrained(str(out))
        save_tokenizer(tokenizer, out, gen)
        return "model"

    out = run_dir / "adapter"
    name = _base_name(model)
    base = {"name": name}
    with quiet_transformers():
        if not name:  # a scratch base exists nowhere else: keep it
            plain = m.plain_base(model)
            plain.save_pretrained(str(run_dir / "base"))
            save_tokenizer(tokenizer, run_dir / "base", gen)
            base = {"name": None, "folder": "../base"}
        elif Path(name).is_dir():
            base["path"] = os.path.abspath(name)
        if not (run_dir / "tokenizer").is_dir():
            save_tokenizer(tokenizer, run_dir / "tokenizer", gen)
    m.save(model, cfg, out, base)
    info = {"method": cfg.model_dump(mode="json"), "format": m.format, "base": base, "tokenizer": "../tokenizer"}
    (out / REBUILD).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return "adapter"
