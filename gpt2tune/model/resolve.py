"""Resolve `model.name` to a local folder: a folder, an HF cache snapshot, or a hub id.

Hub ids go through the Hugging Face cache: a cached snapshot is used without any network
access; otherwise it is downloaded (needs the internet). Offline and not cached gives a
one-line error that says how to fix it.

Weights are taken whichever way the repo ships them: `*.safetensors` when the repo has them,
otherwise `pytorch_model.bin` (older repos such as `uer/gpt2-chinese-*`), which is loaded with
`torch.load(weights_only=True)` and refused if it holds more than tensors (see `build.py`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError

# what a GPT-2 checkpoint needs besides its weights, plus safetensors weights
ALLOW = ["*.json", "*.safetensors", "vocab.txt", "merges.txt", "*.model", "*.md"]
# legacy PyTorch weights, fetched only when the repo has no safetensors
BIN = ["pytorch_model.bin", "pytorch_model-*.bin"]
TOKEN_HINT = "set HF_TOKEN to a token that can read it (or run `hf auth login`)"


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


def weights_file(folder: Path) -> Optional[str]:
    """The weights a model folder holds: its safetensors file(s) if any, else its pytorch_model .bin."""
    names = sorted(f.name for f in folder.iterdir()) if folder.is_dir() else []
    st = [n for n in names if n.endswith(".safetensors")]
    if st:
        return "model.safetensors" if "model.safetensors" in st else st[0]
    if "pytorch_model.bin" in names:
        return "pytorch_model.bin"
    shards = [n for n in names if n.startswith("pytorch_model-") and n.endswith(".bin")]
    return shards[0] if shards else None


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_error(repo_id: str, revision: Optional[str], err: BaseException, hint: str) -> UserError:
    """One line for what went wrong talking to the hub (kinds checked by name: no hard import)."""
    kinds = {c.__name__ for c in type(err).__mro__}
    status = getattr(getattr(err, "response", None), "status_code", None)
    if "RevisionNotFoundError" in kinds:
        return UserError(f"model {repo_id!r} has no revision {revision!r} on the Hugging Face hub")
    if "GatedRepoError" in kinds:
        return UserError(f"model {repo_id!r} is gated: accept its conditions on the hub, then {TOKEN_HINT}")
    if status == 401 or status == 403:
        who = "the token in HF_TOKEN was refused" if os.environ.get("HF_TOKEN") else "no valid token was sent"
        return UserError(f"model {repo_id!r}: the Hugging Face hub answered {status} ({who}): a private or gated "
                         f"repo (or a misspelt id) needs a token: {TOKEN_HINT}")
    if "RepositoryNotFoundError" in kinds or status == 404:
        return UserError(f"model {repo_id!r} does not exist on the Hugging Face hub (and is not a local folder)")
    if "IncompleteSnapshotError" in kinds:
        return UserError(f"model {repo_id!r}: the cached copy is incomplete and the hub cannot be reached: {hint}")
    return UserError(f"model {repo_id!r} is not in the Hugging Face cache and the hub cannot be reached: {hint}")


def _from_hub(repo_id: str, revision: Optional[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise UserError("resolving hub ids needs huggingface_hub") from None
    where = f"{repo_id}@{revision}" if revision else repo_id
    # 1. the cache, without network: usable when it holds weights (safetensors, or the .bin of a repo without them)
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, local_files_only=True,
                                      cache_dir=cache_dir()))
    except LocalEntryNotFoundError:
        snap = None
    except Exception as err:  # malformed id and the like
        raise UserError(f"model {repo_id!r}: {_first_line(err)}") from None
    hint = ("run once with internet access to cache it, or set model.name to a local folder "
            "(a Hugging Face model folder or a cache snapshot folder)")
    hint = f"no local folder {repo_id!r}; " + hint if "/" in repo_id else hint
    if snap is not None and weights_file(snap):
        _say(f"model {where}: {weights_file(snap)} from the Hugging Face cache ({snap})")
        return snap
    if _offline():
        what = "has no weights in the Hugging Face cache" if snap is not None else "is not in the Hugging Face cache"
        raise UserError(f"model {repo_id!r} {what} and HF_HUB_OFFLINE is set: {hint}")
    # 2. download: config, tokenizer files and safetensors; the .bin only when the repo has no safetensors
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, cache_dir=cache_dir()))
        if weights_file(snap) is None:
            snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW + BIN,
                                          cache_dir=cache_dir()))
    except Exception as err:
        raise _hub_error(repo_id, revision, err, hint) from None
    found = weights_file(snap)
    if found is None:
        raise UserError(f"model {repo_id!r} has no weights on the hub (neither *.safetensors nor pytorch_model.bin)")
    why = "" if found.endswith(".safetensors") else " (the repo has no safetensors weights)"
    _say(f"model {where}: downloaded {found}{why}")
    return snap
