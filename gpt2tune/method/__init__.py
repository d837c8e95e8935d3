"""Method: decide which parameters learn (`apply_method`) and how the result is saved
(`save_trained`); `io` loads any run back.

- full / partial: the whole model is saved in RUN/model/ (a plain Hugging Face folder).
- lora, ia3, prompt-tuning, prefix-tuning (through peft) and adapter (ours, `adapter.py`):
  the base stays frozen and only the method's own tensors are saved, in RUN/adapter/,
  with rebuild.json saying how to rebuild the base (its folder or hub id; a scratch base
  is saved in RUN/base/) and where the tokenizer is (RUN/tokenizer/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2tune.errors import UserError
from gpt2tune.method.config import PEFT_METHODS

REBUILD = "rebuild.json"


def apply_method(model, cfg, tokenizer=None, seed: int = 0):
    """Prepare `model` for fine-tuning with the method described by `cfg` (a method config).

    Returns the model to train (for peft methods a wrapper around `model`). `tokenizer`
    is needed by prompt tuning's `init_text`; `seed` makes the new weights reproducible.
    """
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.name == "partial":
        from gpt2tune.method.partial import apply_partial

        return apply_partial(model, cfg)
    if cfg.name == "adapter":
        import torch

        from gpt2tune.method.adapter import add_adapters

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return add_adapters(model, cfg)
    if cfg.name in PEFT_METHODS:
        from gpt2tune.method.via_peft import apply_peft

        return apply_peft(model, cfg, tokenizer, seed)
    raise UserError(f"unknown method {cfg.name!r}")


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
    if cfg.name not in PEFT_METHODS:
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
            plain = _plain_base(model, cfg)
            plain.save_pretrained(str(run_dir / "base"))
            save_tokenizer(tokenizer, run_dir / "base", gen)
            base = {"name": None, "folder": "../base"}
        elif Path(name).is_dir():
            base["path"] = os.path.abspath(name)
        if not (run_dir / "tokenizer").is_dir():
            save_tokenizer(tokenizer, run_dir / "tokenizer", gen)
    _save_method_tensors(model, cfg, out, base)
    info = {"method": cfg.model_dump(mode="json"), "format": "gpt2tune-adapter" if cfg.name == "adapter" else "peft",
            "base": base, "tokenizer": "../tokenizer"}
    (out / REBUILD).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return "adapter"


def _plain_base(model, cfg):
    if cfg.name == "adapter":
        import copy

        from gpt2tune.method.adapter import remove_adapters

        return remove_adapters(copy.deepcopy(model))
    from gpt2tune.method.via_peft import plain_base

    return plain_base(model)


def _save_method_tensors(model, cfg, out: Path, base: dict) -> None:
    from gpt2tune.model.quiet import quiet_transformers

    if cfg.name == "adapter":
        from gpt2tune.method.adapter import save_adapters

        save_adapters(model, cfg, out)
        return
    from gpt2tune.method.via_peft import unwrap

    inner = unwrap(model)
    # plain peft users can then rebuild with AutoPeftModelForCausalLM.from_pretrained(RUN/adapter)
    where = base.get("path") or (os.path.abspath(out / base["folder"]) if base.get("folder") else base["name"])
    inner.peft_config["default"].base_model_name_or_path = where
    with quiet_transformers():
        inner.save_pretrained(str(out))
