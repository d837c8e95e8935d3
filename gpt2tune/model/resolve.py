"""Resolve `model.name` to a local folder: a folder, an HF cache snapshot, or a hub id.

Hub ids go through the Hugging Face cache: a cached snapshot is used without any network
access; otherwise it is downloaded (needs the internet). Offline and not cached gives a
one-line error that says how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError

# what a GPT-2 checkpoint needs (weights in safetensors; legacy .bin only if nothing else)
ALLOW = ["*.json", "*.safetensors", "vocab.txt", "merges.txt", "*.model", "*.md"]


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_dir(name: str, revision: Optional[str] = None) -> Path:
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model folder {p} has no config.json; is it a Hugging Face model folder?")
        return p
    if _looks_like_path(name) or p.suffix in (".json", ".safetensors", ".bin"):
        raise UserError(f"model folder not found: {p}")
    return _from_hub(name, revision)


def cache_dir() -> Optional[str]:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _from_hub(repo_id: str, revision: Optional[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise UserError("resolving hub ids needs huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, local_files_only=True,
                                      cache_dir=cache_dir()))
    except LocalEntryNotFoundError:
        pass
    except Exception as err:  # malformed id and the like
        raise UserError(f"model {repo_id!r}: {str(err).splitlines()[0]}") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = (f"run once with internet access to cache it, or set model.name to a local folder "
            f"(a Hugging Face model folder or a cache snapshot folder)")
    hint = f"no local folder {repo_id!r}; " + hint if "/" in repo_id else hint
    if offline:
        raise UserError(f"model {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, cache_dir=cache_dir()))
    except Exception as err:
        kind = type(err).__name__
        if "RepositoryNotFound" in kind or "404" in str(err):
            raise UserError(f"model {repo_id!r} does not exist on the Hugging Face hub (and is not a local folder)") from None
        raise UserError(f"model {repo_id!r} is not in the Hugging Face cache and the hub cannot be reached: {hint}") from None
