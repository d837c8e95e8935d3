"""Load what a run saved, whatever the method.

A run folder holds either model/ (full, partial: a plain Hugging Face folder) or adapter/
(peft methods and bottleneck adapters) whose rebuild.json says where the frozen base and
the tokenizer are. An exported folder (`gpt2tune export` without --merge) has the same
adapter/ next to the base model's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError
from gpt2tune.method import REBUILD, method
from gpt2tune.model.build import load_pretrained
from gpt2tune.model.resolve import resolve_model_dir
from gpt2tune.model.tokenizer import Framing, framing_of, load_tokenizer


def adapter_folder(path: str | Path) -> Optional[Path]:
    """RUN/adapter (or the adapter folder itself) when `path` holds a saved adapter."""
    p = Path(path)
    for cand in (p / "adapter", p):
        if (cand / REBUILD).is_file():
            return cand
    return None


def read_rebuild(folder: Path) -> dict:
    try:
        return json.loads((folder / REBUILD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / REBUILD} is unreadable: {err}") from None


def base_folder(folder: Path, info: dict) -> Path:
    """Where the frozen base of the adapter in `folder` lives (saved copy, local folder or hub id)."""
    base = info.get("base", {})
    if base.get("folder"):
        p = (folder / base["folder"]).resolve()
        if not (p / "config.json").is_file():
            raise UserError(f"the base model of {folder} should be in {p}, which has no config.json")
        return p
    if base.get("path") and Path(base["path"]).is_dir():
        return Path(base["path"])
    if not base.get("name"):
        raise UserError(f"{folder / REBUILD} does not say where the base model is")
    return resolve_model_dir(base["name"])


def model_folder(path: str | Path) -> Path:
    """A run folder means its model/ (for an adapter run: the base model's folder);
    anything else is a model folder or hub id."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    ad = adapter_folder(p)
    if ad is not None:
        return base_folder(ad, read_rebuild(ad))
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"{p} is neither a run folder with a finished model/ or adapter/ nor a model folder")
    return resolve_model_dir(str(path))


@dataclass
class Loaded:
    model: object  # a transformers model, a peft model (prompt methods: PromptLearningLM) or one with adapters
    tokenizer: object
    framing: Framing
    method: str  # "full" for plain model folders
    adapter: Optional[Path] = None  # the adapter folder, for adapter runs
    info: Optional[dict] = None  # its rebuild.json


def load_method(base, folder: Path, info: dict):
    """`base` with the method's tensors saved in the adapter `folder` (whose rebuild.json is `info`)."""
    name = info.get("method", {}).get("name", "")
    try:
        m = method(name)
    except UserError as err:
        raise UserError(f"{folder / REBUILD}: {err}") from None
    if m.format is None or m.format != info.get("format"):
        raise UserError(f"{folder / REBUILD}: unknown adapter format {info.get('format')!r} for method {name!r}")
    return m.load(base, folder, name)


def load_trained(path: str | Path) -> Loaded:
    """Load a run folder, exported folder, model folder or hub id (training mode untouched)."""
    ad = adapter_folder(path)
    if ad is None:
        folder = model_folder(path)
        tok = load_tokenizer(folder)
        framing = framing_of(tok)
        return Loaded(load_pretrained(folder, framing, len(tok)), tok, framing, "full")
    info = read_rebuild(ad)
    base_dir = base_folder(ad, info)
    tok_dir = (ad / info.get("tokenizer", "../tokenizer")).resolve()
    tok = load_tokenizer(tok_dir if tok_dir.is_dir() else base_dir)
    framing = framing_of(tok)
    base = load_pretrained(base_dir, framing, len(tok))
    model = load_method(base, ad, info)
    return Loaded(model, tok, framing, info.get("method", {}).get("name", ""), ad, info)


def load_run(path: str | Path, merge: bool = True):
    """(model, tokenizer, framing) ready for inference, from a run folder, model folder or hub id.

    `merge`: fold LoRA / IA3 adapters into the base weights (peft's `merge_and_unload`): the same
    function (up to float rounding) as a plain GPT-2, which decodes through the fast runner."""
    loaded = load_trained(path)
    model = loaded.model
    if merge and loaded.adapter is not None and method(loaded.method).mergeable and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    return model, loaded.tokenizer, loaded.framing
