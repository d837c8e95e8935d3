"""`gpt2tune data inspect SPEC`."""

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
    q.add_argument("--json", action="store_true")


def run(a) -> int:
    from gpt2tune.data import sources
    from gpt2tune.data.clean import clean_all
    from gpt2tune.data.inspect import format_report, inspect_texts
    from gpt2tune.method.io import model_folder
    from gpt2tune.model.tokenizer import build_tokenizer, framing_of, load_tokenizer

    cols = a.columns.split(",") if a.columns else None
    opts = sources.SourceOptions(field=a.field, columns=cols, poetry_form=a.form, poetry_simplified=a.simplified)
    loaded = sources.load_source(a.spec, opts)
    texts = sources.texts_of(loaded, a.field, a.spec)
    texts, stats = clean_all(texts)
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
