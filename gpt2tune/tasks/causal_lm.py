"""Task `causal-lm`: fine-tune a GPT-2 language model on text and sample from it.

Text sources (`text:`, `jsonl:`, `csv:`, `tsv:`, `chinese-poetry:`) go through the corpus cache
(`data.cache`, on by default): read, cleaned and tokenized once into memory-mapped token ids keyed by
the files' content, the tokenizer and the data settings; later runs (and every rank of a
multi-process run) read that. Other sources (`builtin:`, `hf:`) are tokenized in memory at each run.
With `data.streaming` (`hf:`, `jsonl:`, `text:`), nothing is cached or read whole: the training rows
come from a `data.stream.RowStream` as the source is read (see gpt2tune/data/stream.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2tune.data import cache, sources, stream
from gpt2tune.data.cache import TokenStore
from gpt2tune.data.dataset import tokenize_texts
from gpt2tune.errors import UserError
from gpt2tune.generate.text import complete
from gpt2tune.method import apply_method
from gpt2tune.recipe import Recipe, dump_recipe
from gpt2tune.tasks import cached
from gpt2tune.tasks.common import (check_disk, describe_params, fit_and_save, load_base, log, prepare_run_dir,
                                   sample_settings, source_stats, train_val_texts, write_json)
from gpt2tune.train import distributed as dist
from gpt2tune.train.device import pick_device
from gpt2tune.train.loop import Data


@dataclass
class Corpus:
    folder: Path  # the cache entry
    meta: dict
    train: TokenStore
    val: TokenStore
    hit: bool  # read from an earlier build

    @property
    def stats(self) -> dict:
        return dict(self.meta["stats"])


def prepare_corpus(recipe: Recipe, run_dir: Optional[Path] = None, resume: bool = False, progress: bool = True,
                   build: bool = True) -> Optional[Corpus]:
    """The recipe's training and validation corpus from the cache, built first when missing, damaged
    or out of date; None when the recipe's sources are not cached (data.cache false, builtin:, hf:)."""
    from gpt2tune.model.tokenizer import build_tokenizer, framing_of, load_tokenizer

    d = recipe.data
    files = cached.recipe_files(d)
    if files is None:
        return None
    root = cached.root_of(d)
    parts = cached.key_parts("causal-lm", d, files)
    from_data = recipe.model.tokenizer == "from-data"
    run_tok = Path(run_dir) / "tokenizer" if (run_dir is not None and from_data and resume) else None
    keys = []
    if from_data:  # the tokenizer is built from the data and kept in the entry
        keys.append(cache.entry_key({**parts, "tokenizer": f"from-data:{recipe.model.vocab_size}"}))
    if from_data and not (run_tok is not None and run_tok.is_dir()):
        tok, fp = None, None
    else:  # (a resumed from-data run keeps its own tokenizer: an entry built with another is not used)
        tok = load_tokenizer(run_tok) if from_data else cached.tokenizer_of(recipe.model)
        framing_of(tok)  # (may set a pad token, as load_base does)
        fp = cache.tokenizer_fingerprint(tok)
        keys.append(cache.entry_key({**parts, "tokenizer": fp}))
    for key in dict.fromkeys(keys):
        found = cached.open_cached(root / key, build)
        if found is None:
            continue
        meta, stores = found
        if fp is not None and meta["tokenizer"] != fp:
            continue
        return Corpus(root / key, meta, stores["train"], stores["val"], True)
    if not build:
        raise UserError(f"data cache entry {root / keys[-1]} is missing (the first process builds it)")

    folder = root / keys[-1]
    tmp = cache.new_entry(root)
    try:
        if tok is None:  # from-data: the tokenizer is built from the training texts, read whole first
            train, val, stats = train_val_texts(d)
            tok = build_tokenizer(train, tmp / "tokenizer", recipe.model.vocab_size)
            tok = load_tokenizer(tmp / "tokenizer")  # as every run will load it
            framing_of(tok)
            fp = cache.tokenizer_fingerprint(tok)
            metas, truncated = _tokenize_lists(tok, {"train": train, "val": val}, tmp, d, progress)
            del train, val
        else:
            metas, truncated, stats = _tokenize_sources(tok, files, tmp, d, progress)
        stats.update(truncated=truncated, train_tokens=metas["train"]["tokens"])
        import numpy as np

        fr = framing_of(tok)
        meta = {"dtype": np.dtype(cache.token_dtype(len(tok))).name, "splits": metas, "stats": stats, "tokenizer": fp,
                "vocab_size": len(tok), "framing": [fr.bos, fr.eos], "key": parts}
        cache.commit(tmp, folder, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta, stores = cache.open_entry(folder)
    return Corpus(folder, meta, stores["train"], stores["val"], False)


def _tokenize_lists(tok, texts: dict[str, list[str]], tmp: Path, d, progress: bool) -> tuple[dict, int]:
    """Tokenize cleaned texts already in memory into the entry's splits; (split metas, truncated)."""
    from gpt2tune.data import corpus as cp
    from gpt2tune.model.tokenizer import framing_of

    fr = framing_of(tok)
    splits = {name: (t, sum(len(x.encode("utf-8")) for x in t)) for name, t in texts.items()}
    built = cp.tokenize_splits(tok, splits, tmp, fr.bos, fr.eos, d.max_length, d.long_samples == "split",
                               cache.token_dtype(len(tok)), None, d.num_proc, progress)
    return {n: b.meta for n, b in built.items()}, sum(int(b.truncated.sum()) for b in built.values())


def _tokenize_sources(tok, files: dict, tmp: Path, d, progress: bool) -> tuple[dict, int, dict]:
    """Read, clean and tokenize the recipe's sources into the entry's splits as they are read, never
    holding them whole (see data/corpus.py); (split metas, truncated samples, data.json counts), equal
    to what train_val_texts and tokenize_texts give in memory."""
    import numpy as np

    from gpt2tune.data import corpus as cp
    from gpt2tune.data.dataset import split_indices
    from gpt2tune.model.tokenizer import framing_of

    opts, infos = sources.SourceOptions.of(d), {}

    def texts(spec):
        infos[spec] = info = sources.Loaded([])
        return sources.iter_texts(sources.iter_records(spec, opts, info), d.field, spec, info), \
            sum(f.stat().st_size for f in files[spec])

    fr, dtype = framing_of(tok), cache.token_dtype(len(tok))
    splits = {"all": texts(d.source)}
    if d.validation:
        splits["val"] = texts(d.validation)
    built = cp.tokenize_splits(tok, splits, tmp, fr.bos, fr.eos, d.max_length, d.long_samples == "split", dtype,
                               cp.Cleaning.of(d), d.num_proc, progress)
    stats = {}
    for name, spec in (("all", d.source), ("val", d.validation)):
        if name not in built:
            continue
        s = source_stats(built[name].counts, infos[spec])
        if not len(built[name].pieces):
            raise UserError(f"{spec}: no usable samples (after cleaning: {s})")
        if name == "all":
            stats = s
        else:
            stats["validation_source"] = s
    n = len(built["all"].pieces)
    if d.validation:
        tr, va = list(range(n)), None
    else:
        tr, va = split_indices(n, d.val_fraction, d.seed)
    if d.limit:
        tr = tr[: d.limit]
    parts = {"train": np.asarray(tr, dtype=np.int64)}
    if va is not None:
        parts["val"] = np.asarray(va, dtype=np.int64)
    metas = cp.divide(tmp, "all", built["all"].pieces, parts, dtype)
    for f in ("all.tokens.bin", "all.offsets.bin"):
        (tmp / f).unlink()
    truncated = int(built["all"].truncated[parts["train"]].sum())
    if va is None:
        metas["val"] = built["val"].meta
        truncated += int(built["val"].truncated.sum())
    else:
        truncated += int(built["all"].truncated[parts["val"]].sum())
    stats.update(train_samples=len(parts["train"]), validation_samples=len(built["val"].pieces) if va is None
                 else len(parts["val"]))
    return metas, truncated, stats


def cached_corpus(recipe: Recipe, run_dir: Path, resume: bool, progress: bool) -> Optional[Corpus]:
    """prepare_corpus on rank 0 (which builds a missing entry) and then on the other ranks (which read
    it); a from-data tokenizer is copied from the entry into RUN/tokenizer."""
    corpus = prepare_corpus(recipe, run_dir, resume, progress) if dist.is_main() else None
    if dist.world_size() > 1:
        dist.barrier()
        if not dist.is_main():
            corpus = prepare_corpus(recipe, run_dir, resume, False, build=False)
    if corpus is not None and recipe.model.tokenizer == "from-data":
        tok_dir = run_dir / "tokenizer"
        if dist.is_main() and not tok_dir.is_dir():
            shutil.copytree(corpus.folder / "tokenizer", tok_dir)
        dist.barrier()
    return corpus


def check_streaming(recipe: Recipe) -> None:
    """One-line errors for what data.streaming cannot do, before anything is loaded; notes for the
    settings it does not use."""
    d = recipe.data
    if not recipe.train.max_steps:
        raise UserError("data.streaming needs train.max_steps: a stream has no known length, so no epochs")
    if recipe.model.tokenizer == "from-data":
        raise UserError("data.streaming needs a ready tokenizer (the model's, or model.tokenizer a folder): "
                        "model.tokenizer from-data would read the whole corpus first")
    for spec in (d.source, d.validation):
        if spec and sources.split_spec(spec)[0] not in stream.KINDS:
            raise UserError(f"data.streaming reads hf:, jsonl: and text: sources, not {spec}")
    given = d.model_fields_set
    unused = [f"data.batching {d.batching} (rows are packed)" if "batching" in given and d.batching != "pack" else "",
              "data.val_fraction (validation: data.val_documents)" if "val_fraction" in given else "",
              "data.cache" if "cache" in given else ""]
    if any(unused):
        log(f"note: data.streaming does not use {', '.join(u for u in unused if u)}")
    if sources.split_spec(d.source)[0] == "text" and d.text_mode == "auto":
        log("note: data.streaming reads text: files line by line (text_mode auto); data.text_mode documents "
            "reads blank-line separated documents")


def streaming_data(recipe: Recipe, base) -> tuple[stream.RowStream, list, dict]:
    """The training stream, the validation rows, and the data.json statistics of a data.streaming run."""
    d = recipe.data
    st = stream.StreamSettings.of(d)
    fr = base.framing
    val_rows, start, vstats = stream.read_validation(st, base.tokenizer, fr.bos, fr.eos)
    rows = stream.RowStream(st, base.tokenizer, fr.bos, fr.eos, start=start, seed=recipe.train.seed, log=log,
                            tokenizer_id=cache.tokenizer_fingerprint(base.tokenizer))
    where = (f"the first {vstats['documents']:,} documents of {d.validation}" if d.validation else
             f"the first {vstats['documents']:,} documents of the stream (held out)")
    log(f"data: streaming {d.source} (rows of {d.max_length} tokens, shuffled in windows of {d.shuffle_buffer:,}); "
        f"validation: {where}, {len(val_rows):,} rows")
    stats = {"streaming": True, "validation_samples": len(val_rows), "validation_documents": vstats["documents"],
             "validation_from": "data.validation" if d.validation else "stream head (held out)",
             "truncated": vstats["truncated"], "validation_cleaning": {k: vstats[k] for k in ("too_short", "too_long",
                                                                                             "skipped_records")}}
    return rows, val_rows, stats


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    d = recipe.data
    if d.streaming:
        check_streaming(recipe)
    dist.init(pick_device(recipe.train.device).type)
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    corpus = None if d.streaming else cached_corpus(recipe, run_dir, resume, progress)
    if d.streaming:
        base = load_base(recipe.model, [], run_dir, resume, d.max_length, recipe.train.seed)
        train_ids, val_ids, stats = streaming_data(recipe, base)
    elif corpus is not None:
        stats = corpus.stats
        for note in stats.get("notes", []):
            log(f"note: {note}")
        log(f"data: {'cached' if corpus.hit else 'tokenized into'} {corpus.folder} ({len(corpus.train):,} + "
            f"{len(corpus.val):,} documents, {corpus.train.total_tokens:,} training tokens, {corpus.meta['dtype']})")
        base = load_base(recipe.model, [], run_dir, resume or recipe.model.tokenizer == "from-data", d.max_length,
                         recipe.train.seed)
        if cache.tokenizer_fingerprint(base.tokenizer) != corpus.meta["tokenizer"]:
            raise UserError(f"the run's tokenizer differs from the one data cache entry {corpus.folder} was built with")
        train_ids, val_ids = corpus.train, corpus.val
        stats["cache"] = {"entry": str(corpus.folder), "hit": corpus.hit}
    else:
        train_texts, val_texts, stats = train_val_texts(d)
        base = load_base(recipe.model, train_texts, run_dir, resume, d.max_length, recipe.train.seed)
        split = d.long_samples == "split"
        train_ids, tr_cut = tokenize_texts(base.tokenizer, train_texts, base.framing.bos, base.framing.eos, d.max_length, split)
        val_ids, va_cut = tokenize_texts(base.tokenizer, val_texts, base.framing.bos, base.framing.eos, d.max_length, split)
        stats.update(truncated=tr_cut + va_cut, train_tokens=sum(map(len, train_ids)))
    if stats["truncated"]:
        what = "validation documents" if d.streaming else "samples"  # (the stream's count: data.json at the end)
        log(f"note: {stats['truncated']} {what} were longer than data.max_length={d.max_length} tokens and were truncated")
    if stats.get("skipped_records"):
        log(f"note: skipped {stats['skipped_records']} malformed records")

    model = apply_method(base.model, recipe.method, tokenizer=base.tokenizer, seed=recipe.train.seed)
    params = describe_params(model)
    samples = "streamed training rows" if d.streaming else f"{len(train_ids):,} training samples"
    log(f"model {base.source}: {params['total']:,} parameters, {params['trainable']:,} trainable "
        f"({params['percent']:.2f}%); {samples}, {len(val_ids):,} validation")
    check_disk(run_dir, params["total"], recipe.train.keep_checkpoints, recipe.train.save_every)
    if dist.is_main():
        dump_recipe(recipe, run_dir / "recipe.yaml")
        write_json(run_dir / "data.json", stats)

    data = Data(train_ids, val_ids, base.framing.pad, "pack" if d.streaming else d.batching, d.max_length)
    done = fit_and_save(recipe, run_dir, base, model, data, params, resume, progress)
    if done is None:  # not rank 0
        return {}
    model, report, _ = done
    if d.streaming:  # what this process read (a resumed run counts from its resume)
        stats["stream"] = dict(train_ids.stats, position=train_ids.state_dict())
        write_json(run_dir / "data.json", stats)

    if recipe.sample.prompts:
        s = sample_settings(recipe)
        samples = [{"prompt": p, "text": complete(model, base.tokenizer, base.framing, p, s)[0]}
                   for p in recipe.sample.prompts]
        write_json(run_dir / "samples.json", samples)
    return report
