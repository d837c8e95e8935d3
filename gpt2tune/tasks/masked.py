"""What the `chat` and `completion` tasks share: records read from a source and split into items
(conversations, prompt/completion pairs), encoded into rows whose labels mask everything but the
answers, and training on them.

With data.cache on (the default) and a file source (`jsonl:`, `csv:`, ...), the rows go through the
corpus cache: the source is read a chunk at a time, encoded on every core (data/corpus.py
`encode_records`) into memory-mapped ids and loss masks keyed by the files' content, the tokenizer
(with the chat template's added tokens), the data and task settings and the encoding code; a later
run reads them back without reading the source. A `from-data` tokenizer, `hf:` and `builtin:` sources,
or data.cache false: read and encoded in memory at each run, as before.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from gpt2tune.chat.masking import FitStats, Masked, MaskedStore, collate_masked
from gpt2tune.data import cache, sources
from gpt2tune.data.dataset import IGNORE, split_indices
from gpt2tune.errors import UserError
from gpt2tune.method import apply_method
from gpt2tune.recipe import Recipe, dump_recipe
from gpt2tune.tasks import cached
from gpt2tune.tasks.common import Base, check_disk, describe_params, fit_and_save, log, write_json
from gpt2tune.train import distributed as dist
from gpt2tune.train.loop import Data

# the code that turns records into masked rows (with data/cache.PIPELINE): an entry built by other code is not reused
ENCODING = ("chat/masking.py", "chat/prompt.py", "chat/template.py", "chat/messages.py", "chat/history.py",
            "tasks/masked.py")


@dataclass
class MaskedTask:
    """What a task gives the shared machinery: its name and settings (in the cache key), how records
    become items (`items_of(records, spec, check)` -> (items, malformed records), `check` on a source's
    first records), and the plain text of an item (what a from-data tokenizer learns from)."""

    name: str
    settings: dict
    items_of: Callable[[list, str, bool], tuple[list, int]]
    text_of: Callable[[Any], str]
    empty: str  # the error for a source with no usable item, with {spec}


@dataclass
class Rows:
    """Training and validation rows (lists of Masked, or MaskedStores of a cache entry), how they were
    fitted to max_length, records skipped as malformed, the cache entry they came from."""

    train: Any
    val: Any
    train_fit: FitStats
    val_fit: FitStats
    skipped: int
    cache: Optional[dict] = None


def report_rows(rows: Rows, what: str, skipped_what: str, max_length: int) -> dict:
    """Log how the rows were made (skipped records, fitting to max_length); their data.json counts."""
    if rows.skipped:
        log(f"note: skipped {rows.skipped} {skipped_what}")
    report_fit(f"training {what}", rows.train_fit, max_length)
    report_fit(f"validation {what}", rows.val_fit, max_length)
    stats = {"skipped_records": rows.skipped, "train_samples": len(rows.train), "validation_samples": len(rows.val),
             "train_fit": rows.train_fit.as_dict(), "validation_fit": rows.val_fit.as_dict(),
             "trained_tokens": rows.train_fit.trained_tokens}
    if rows.cache:
        stats["cache"] = rows.cache
    return stats


def encoding_fingerprint() -> str:
    h = hashlib.sha256()
    for name in ENCODING:
        h.update((Path(__file__).parents[1] / name).read_bytes())
    return h.hexdigest()


def check_batching(recipe: Recipe) -> None:
    if recipe.data.batching == "pack":
        raise UserError(f"data.batching: pack would glue samples together across their loss masks; "
                        f"task {recipe.task} uses group (default) or pad")


def load_records(data_cfg, spec: str) -> sources.Loaded:
    loaded = sources.load_source(spec, sources.SourceOptions.of(data_cfg))
    for note in loaded.notes:  # decisions the reader took (e.g. a header row), as `read_texts` logs them
        log(f"note: {note}")
    return loaded


def split_items(data_cfg, items: list, val_items: list | None) -> tuple[list, list]:
    """Train/validation items: the separate validation source, else a seeded split; then data.limit."""
    if val_items is not None:
        train, val = items, val_items
    else:
        tr, va = split_indices(len(items), data_cfg.val_fraction, data_cfg.seed)
        train, val = [items[i] for i in tr], [items[i] for i in va]
    if data_cfg.limit:
        train = train[: data_cfg.limit]
    return train, val


def report_fit(what: str, st: FitStats, max_length: int) -> None:
    if st.shortened:
        log(f"note: {st.shortened} {what} were longer than data.max_length={max_length} tokens: "
            f"{st.dropped_turns} earliest turns dropped, {st.prompt_cut} prompts cut at the start, "
            f"{st.answer_cut} answers cut at the end")
    if st.skipped:
        log(f"warning: skipped {st.skipped} {what} with nothing to train on "
            f"({st.skipped_no_answer} without an answer, {st.skipped_too_long} too long for data.max_length={max_length})")


def train_masked(recipe: Recipe, run_dir: Path, base: Base, train_rows: list, val_rows: list, stats: dict,
                 resume: bool, progress: bool):
    """Train on masked rows and save the model; (trained model, report, saved folder), None off rank 0."""
    d = recipe.data
    if not train_rows:
        raise UserError(f"no training samples left for task {recipe.task} (see the warnings above)")
    model = apply_method(base.model, recipe.method, tokenizer=base.tokenizer, seed=recipe.train.seed)
    params = describe_params(model)
    log(f"model {base.source}: {params['total']:,} parameters, {params['trainable']:,} trainable "
        f"({params['percent']:.2f}%); {len(train_rows):,} training samples, {len(val_rows):,} validation; "
        f"{stats.get('trained_tokens', 0):,} trained (answer) tokens")
    check_disk(run_dir, params["total"], recipe.train.keep_checkpoints, recipe.train.save_every)
    if dist.is_main():
        dump_recipe(recipe, run_dir / "recipe.yaml")
        write_json(run_dir / "data.json", stats)

    pad = base.framing.pad
    data = Data(train_rows, val_rows, pad, d.batching, d.max_length, collate=partial(collate_masked, pad_id=pad))
    return fit_and_save(recipe, run_dir, base, model, data, params, resume, progress, headline="loss",
                        note="; loss on answers only")


def _encode_all(encode: Callable, items: list) -> tuple[list[Masked], FitStats]:
    st = FitStats()
    return [r for x in items if (r := encode(x, st)) is not None], st


def _rows_of(task: MaskedTask, encode: Callable, spec: str, records: list, first: bool) -> tuple[list, list, int]:
    """A chunk of records as `corpus.encode_records` takes it: a row (ids, mask) or None per item, the
    item's FitStats counters, the malformed records."""
    items, bad = task.items_of(records, spec, first)
    rows, stats = [], []
    for x in items:
        st = FitStats()
        r = encode(x, st)
        stats.append(st.vector())
        rows.append(None if r is None else (r.ids, [lab != IGNORE for lab in r.labels]))
    return rows, stats, bad


class Source:
    """A masked task's data. `tokenizer_texts()` is what load_base needs (the source is read for it only
    with a from-data tokenizer); `rows(tok, encode)` gives the rows, `encode(item, FitStats)` making
    one (or None): from the corpus cache when the source is cached, else in memory."""

    def __init__(self, recipe: Recipe, task: MaskedTask):
        self.recipe, self.task = recipe, task
        self._items = None  # (train, val, malformed records) once read in memory

    def tokenizer_texts(self) -> list[str]:
        if self.recipe.model.tokenizer != "from-data":
            return []
        return [self.task.text_of(x) for x in self._read()[0]]

    def _items_of(self, spec: str) -> tuple[list, int]:
        loaded = load_records(self.recipe.data, spec)
        items, bad = self.task.items_of(loaded.records, spec, True)
        if not items:
            raise UserError(self.task.empty.format(spec=spec))
        return items, bad + loaded.skipped

    def _read(self) -> tuple[list, list, int]:
        if self._items is None:
            d = self.recipe.data
            items, skipped = self._items_of(d.source)
            val_items = None
            if d.validation:
                val_items, vskipped = self._items_of(d.validation)
                skipped += vskipped
            self._items = (*split_items(d, items, val_items), skipped)
        return self._items

    def files(self) -> Optional[dict]:
        """The source files when the rows go through the cache (else None)."""
        if self._items is not None or self.recipe.model.tokenizer == "from-data":
            return None
        return cached.recipe_files(self.recipe.data)

    def rows(self, tok, encode: Callable, progress: bool = True) -> Rows:
        files = self.files()
        if files is None:
            train, val, skipped = self._read()
            (tr, st), (va, vst) = _encode_all(encode, train), _encode_all(encode, val)
            return Rows(tr, va, st, vst, skipped)
        rows = self._cached(tok, encode, files, progress, build=True) if dist.is_main() else None
        if dist.world_size() > 1:  # rank 0 builds a missing entry; the others then read it
            dist.barrier()
            if not dist.is_main():
                rows = self._cached(tok, encode, files, False, build=False)
        return rows

    def _cached(self, tok, encode: Callable, files: dict, progress: bool, build: bool) -> Rows:
        d = self.recipe.data
        root = cached.root_of(d)
        parts = {**cached.key_parts(self.task.name, d, files), "task_settings": self.task.settings,
                 "encoding": encoding_fingerprint(), "tokenizer": cache.tokenizer_fingerprint(tok)}
        folder = root / cache.entry_key(parts)
        found = cached.open_cached(folder, build)
        hit = found is not None
        if not hit:
            if not build:
                raise UserError(f"data cache entry {folder} is missing (the first process builds it)")
            self._build(tok, encode, files, folder, parts, progress)
            found = cache.open_entry(folder)
        meta, stores = found
        s = meta["stats"]
        for note in s["notes"]:
            log(f"note: {note}")
        return Rows(MaskedStore(stores["train"], stores["train.mask"]), MaskedStore(stores["val"], stores["val.mask"]),
                    FitStats.of_vector(s["train_fit"]), FitStats.of_vector(s["validation_fit"]),
                    s["skipped_records"], {"entry": str(folder), "hit": hit})

    def _build(self, tok, encode: Callable, files: dict, folder: Path, parts: dict, progress: bool) -> None:
        """Read the sources a chunk at a time, encode them on every core into a temporary split, divide it
        into train/val as `split_items` divides items in memory, and commit the entry."""
        from gpt2tune.data import corpus

        d = self.recipe.data
        opts, infos = sources.SourceOptions.of(d), {}

        def split(spec: str) -> tuple:
            infos[spec] = info = sources.Loaded([])
            return (sources.iter_records(spec, opts, info), sum(f.stat().st_size for f in files[spec]),
                    partial(_rows_of, self.task, encode, spec))

        splits = {"all": split(d.source)}
        if d.validation:
            splits["val"] = split(d.validation)
        dtype = cache.token_dtype(len(tok))
        tmp = cache.new_entry(folder.parent)
        try:
            built = corpus.encode_records(splits, tmp, dtype, len(FitStats.COUNTERS), d.num_proc, progress)
            for name, spec in (("all", d.source), ("val", d.validation)):
                if name in built and not len(built[name].pieces):
                    raise UserError(self.task.empty.format(spec=spec))
            whole = built["all"]
            n = len(whole.pieces)
            if d.validation:
                tr, va = np.arange(n), None
            else:
                tr, va = (np.asarray(x, dtype=np.int64) for x in split_indices(n, d.val_fraction, d.seed))
            if d.limit:
                tr = tr[: d.limit]
            idx = {"train": tr} if va is None else {"train": tr, "val": va}
            metas = corpus.divide(tmp, "all", whole.pieces, idx, dtype)
            metas.update(corpus.divide(tmp, "all.mask", whole.pieces, {f"{k}.mask": v for k, v in idx.items()},
                                       np.uint8))
            for f in tmp.glob("all.*"):
                f.unlink()
            if va is None:
                metas.update(built["val"].metas)
                val_fit = built["val"].stats.sum(0)
            else:
                val_fit = whole.stats[va].sum(0)
            stats = {"train_fit": whole.stats[tr].sum(0).tolist(), "validation_fit": np.asarray(val_fit).tolist(),
                     "skipped_records": sum(b.bad for b in built.values()) + sum(i.skipped for i in infos.values()),
                     "notes": [note for i in infos.values() for note in i.notes]}
            meta = {"dtype": np.dtype(dtype).name, "splits": metas, "stats": stats, "tokenizer": parts["tokenizer"],
                    "vocab_size": len(tok), "key": parts}
            cache.commit(tmp, folder, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
