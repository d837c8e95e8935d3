"""The corpus cache as the tasks use it: which sources it holds, an entry's key parts, opening an
entry (a damaged one is reported and rebuilt, never read). The cache itself: data/cache.py; filling
it: data/corpus.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gpt2tune.data import cache, sources
from gpt2tune.data.cache import CacheCorrupt
from gpt2tune.errors import UserError
from gpt2tune.tasks.common import log

CACHED_KINDS = ("text", "jsonl", "csv", "tsv", "chinese-poetry")
# data settings that do not change the tokens of a corpus
NOT_IN_KEY = {"cache", "cache_dir", "num_proc", "batching", "streaming", "shuffle_buffer", "val_documents"}


def source_files(spec: str) -> Optional[list[Path]]:
    """The files a source reads, or None when it is not cached (its reader then runs as before)."""
    from gpt2tune.data import poetry

    kind, rest = sources.split_spec(spec)
    if kind not in CACHED_KINDS:
        return None
    if kind == "chinese-poetry":
        return sorted(poetry.find_files(rest))
    p = Path(rest)
    return [p] if p.is_file() else None  # a missing file: the reader's own error


def recipe_files(d) -> Optional[dict[str, list[Path]]]:
    """The files of the data section's sources (source, validation), or None when one is not cached
    or data.cache is off."""
    if not d.cache:
        return None
    files = {s: source_files(s) for s in (d.source, d.validation) if s}
    return None if any(f is None for f in files.values()) else files


def root_of(d) -> Path:
    return Path(d.cache_dir).expanduser() if d.cache_dir else cache.default_root()


def key_parts(task: str, d, files: dict[str, list[Path]]) -> dict:
    """What an entry's key holds besides the tokenizer: the task, every file's fingerprint, the data
    settings that change tokens."""
    return {"task": task, "sources": {s: [cache.file_fingerprint(f) for f in fs] for s, fs in files.items()},
            "settings": d.model_dump(mode="json", exclude=NOT_IN_KEY)}


def tokenizer_of(model_cfg):
    """The tokenizer `load_base` would use (model.tokenizer, else the base model's), without the model."""
    from gpt2tune.model.resolve import resolve_model_dir
    from gpt2tune.model.tokenizer import load_tokenizer

    if model_cfg.tokenizer:
        return load_tokenizer(model_cfg.tokenizer)
    if not model_cfg.name:
        raise UserError("model.init: scratch needs model.tokenizer ('from-data' or a tokenizer folder)")
    return load_tokenizer(resolve_model_dir(model_cfg.name, model_cfg.revision))


def open_cached(folder: Path, build: bool) -> Optional[tuple[dict, dict]]:
    """(meta, stores) of the entry in `folder`; None when there is none, or it was damaged and is now
    removed (to be rebuilt). A process that may not build (a rank other than 0) gets an error instead."""
    if not folder.is_dir():
        return None
    try:
        return cache.open_entry(folder)
    except CacheCorrupt as err:
        if not build:
            raise UserError(f"data cache entry {folder} is damaged ({err}); run on one process to rebuild it") from None
        log(f"note: data cache entry {folder} is damaged ({err}); rebuilding it")
        cache.discard(folder)
        return None
