"""`gpt2tune data inspect SPEC` and `gpt2tune data prepare RECIPE`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gpt2tune.errors import UserError

NAME = "data"


def add_parser(sub):
    p = sub.add_parser("data", help="look at data before training")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("inspect", help="counts, token length percentiles, truncation, examples",
                        description="Inspect a data source (KIND:PATH) as training would see it.",
                        epilog="Example: gpt2tune data inspect chinese-poetry:../shared/data/chinese-poetry/全唐诗")
    q.add_argument("spec", metavar="SPEC", help="KIND:PATH, e.g. text:notes.txt, jsonl:data.jsonl, builtin:tang-lvshi")
    q.add_argument("--field", default="text", help="jsonl field / csv column with the text")
    q.add_argument("--columns", default=None, help="comma-separated column names for csv/tsv without a header")
    q.add_argument("--tokenizer", default="from-data", help="tokenizer folder, run or model; or from-data (default)")
    q.add_argument("--max-length", type=int, default=128)
    q.add_argument("--form", default=None, help="chinese-poetry: keep one verse form, e.g. qiyan-jueju")
    q.add_argument("--simplified", action="store_true", help="chinese-poetry: convert to simplified characters")
    q.add_argument("-n", type=int, default=3, help="examples to show")
    q.add_argument("--streaming", type=int, default=None, metavar="N",
                   help="read only the first N records, through datasets' streaming mode (hf:, jsonl:, text:), "
                        "as data.streaming reads a source too large to read whole")
    q.add_argument("--json", action="store_true")
    r = dsub.add_parser("prepare", help="tokenize a recipe's data into the corpus cache before training",
                        description="Read, clean and tokenize the recipe's data (tasks causal-lm, chat and completion; "
                                    "text, jsonl, csv, tsv and chinese-poetry sources) into the memory-mapped corpus "
                                    "cache (data.cache_dir), so that training, on one process or several, starts "
                                    "from it. Chat and completion rows are stored with their loss masks.",
                        epilog="Example: gpt2tune data prepare recipes/english-gpt2.yaml --set data.source=text:book.txt")
    r.add_argument("recipe", help="path to a YAML recipe")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set data.num_proc=2 (repeatable)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true")


def prepare(a) -> int:
    from gpt2tune.recipe import load_recipe
    from gpt2tune.tasks.cached import recipe_files

    recipe = load_recipe(a.recipe, a.overrides)
    if recipe.task not in ("causal-lm", "chat", "completion"):
        raise UserError(f"data prepare: task {recipe.task} is tokenized in memory at each run; causal-lm, chat and "
                        f"completion recipes use the corpus cache")
    if recipe.data.streaming:
        raise UserError("data prepare: the recipe sets data.streaming: the source is read as training goes, "
                        "nothing is prepared")
    if not recipe.data.cache:
        raise UserError("data prepare: the recipe sets data.cache: false")
    if recipe_files(recipe.data) is None:
        raise UserError(f"data prepare: {recipe.data.source} is not cached (text, jsonl, csv, tsv and "
                        f"chinese-poetry sources are; builtin: and hf: are read at each run)")
    if recipe.task == "causal-lm":
        info = _prepare_corpus(recipe, not a.no_progress)
        what = "documents"
    else:
        info = _prepare_rows(recipe, not a.no_progress)
        what = "rows"
    if a.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
    else:
        print(f"{'built' if info['built'] else 'already cached'}: {info['entry']}\n"
              f"train {info['train_documents']:,} {what}, {info['train_tokens']:,} tokens; validation "
              f"{info['validation_documents']:,} {what}, {info['validation_tokens']:,} tokens")
    return 0


def _prepare_corpus(recipe, progress: bool) -> dict:
    from gpt2tune.tasks.causal_lm import prepare_corpus

    corpus = prepare_corpus(recipe, progress=progress)
    return {"entry": str(corpus.folder), "built": not corpus.hit, "dtype": corpus.meta["dtype"],
            "train_documents": len(corpus.train), "validation_documents": len(corpus.val),
            "train_tokens": corpus.train.total_tokens, "validation_tokens": corpus.val.total_tokens,
            "stats": corpus.stats}


def _prepare_rows(recipe, progress: bool) -> dict:
    """A chat or completion recipe's masked rows (the template's added tokens are part of the key)."""
    if recipe.model.tokenizer == "from-data":
        raise UserError(f"data prepare: task {recipe.task} with model.tokenizer from-data reads its data in memory "
                        f"at each run (the tokenizer is built from it first); nothing is cached")
    if recipe.task == "chat":
        from gpt2tune.tasks.chat import prepare
    else:
        from gpt2tune.tasks.completion import prepare
    rows = prepare(recipe, progress)
    return {"entry": rows.cache["entry"], "built": not rows.cache["hit"],
            "train_documents": len(rows.train), "validation_documents": len(rows.val),
            "train_tokens": rows.train.store.total_tokens, "validation_tokens": rows.val.store.total_tokens,
            "trained_tokens": rows.train_fit.trained_tokens, "skipped_records": rows.skipped,
            "train_fit": rows.train_fit.as_dict(), "validation_fit": rows.val_fit.as_dict()}


def run(a) -> int:
    if a.data_cmd == "prepare":
        return prepare(a)
    from gpt2tune.data import sources
    from gpt2tune.data.clean import clean_all
    from gpt2tune.data.inspect import format_report, inspect_texts
    from gpt2tune.method.io import model_folder
    from gpt2tune.model.tokenizer import build_tokenizer, framing_of, load_tokenizer

    cols = a.columns.split(",") if a.columns else None
    if a.streaming is not None:
        from gpt2tune.data import stream

        if a.streaming < 1:
            raise UserError("--streaming N needs N >= 1 records")
        raw, skipped = stream.head_texts(a.spec, a.field, a.streaming)
        loaded = sources.Loaded([], skipped, [f"the first {len(raw) + skipped:,} records of the stream (--streaming)"])
    else:
        opts = sources.SourceOptions(field=a.field, columns=cols, poetry_form=a.form, poetry_simplified=a.simplified)
        loaded = sources.load_source(a.spec, opts)
        raw = sources.texts_of(loaded, a.field, a.spec)
    texts, stats = clean_all(raw)
    stats["skipped_records"] = loaded.skipped
    if loaded.text_mode:
        stats["text_mode"] = loaded.text_mode
    if not texts:
        raise UserError(f"{a.spec}: no usable samples")
    if a.tokenizer == "from-data":
        with tempfile.TemporaryDirectory() as tmp:
            tok = build_tokenizer(texts, tmp)
    else:
        t = Path(a.tokenizer)
        plain_tok_dir = t.is_dir() and not (t / "config.json").exists() and not (t / "model").exists()
        tok = load_tokenizer(t if plain_tok_dir else model_folder(a.tokenizer))
    fr = framing_of(tok)
    report = inspect_texts(texts, stats, tok, fr.bos, fr.eos, a.max_length, a.n)
    report["notes"] = loaded.notes  # decisions the reader took for the user
    print(json.dumps(report, ensure_ascii=False, indent=2) if a.json else format_report(a.spec, report))
    return 0
