"""`gpt2tune classify RUN --text ... | --file PATH`."""

from __future__ import annotations

import json
import sys
import time

from gpt2tune.errors import UserError

NAME = "classify"


def add_parser(sub):
    p = sub.add_parser("classify", help="classify texts with a classification run",
                       description="Classify texts with RUN (a classification run folder; means RUN/model) or a "
                                   "classifier folder. Prints label and probability per text.",
                       epilog='Example: gpt2tune classify runs/sms-spam --text "You won a free prize! Call now"')
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--file", default=None, help="a UTF-8 file with one text per line (blank lines are skipped)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true",
                   help='print a JSON list: one {"text", "label", "probability", "probabilities"} per text, in order')


def read_lines(path: str) -> list[str]:
    from gpt2tune.data.sources import read_text_file

    text = read_text_file(path)
    lines = [l.strip() for l in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    lines = [l for l in lines if l]
    if not lines:
        raise UserError(f"{path} holds no text lines")
    return lines


def run(a) -> int:
    from gpt2tune.classify.predict import load_classifier, predict

    texts = list(a.text)
    if a.file:
        texts += read_lines(a.file)
    if not texts:
        raise UserError("nothing to classify: give --text TEXT or --file PATH")
    if any(not t.strip() for t in texts):
        raise UserError("--text: empty text")
    if a.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    model, tok = load_classifier(a.model)
    t0 = time.perf_counter()
    preds = predict(model, tok, texts, batch_size=a.batch_size)
    dt = time.perf_counter() - t0
    if a.json:
        out = [{"text": t, "label": p["label"], "probability": round(p["probability"], 6),
                "probabilities": {k: round(v, 6) for k, v in p["probabilities"].items()}}
               for t, p in zip(texts, preds)]
        print(json.dumps(out, ensure_ascii=False))
    else:
        width = max(len(p["label"]) for p in preds)
        for t, p in zip(texts, preds):
            one_line = " ".join(t.split())
            print(f"{p['label']:<{width}}  {p['probability']:.4f}  {one_line}")
        print(f"({len(texts)} texts, {dt:.2f}s)", file=sys.stderr)
    return 0
