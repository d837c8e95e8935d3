"""`gpt2tune generate RUN_OR_MODEL`: sample, decode greedily or by beam search, stream, verse forms."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gpt2tune.errors import UserError

NAME = "generate"


def add_decoding_args(p, default_top_k: int = 40) -> None:
    """Decoding options shared by the commands that generate (generate, eval-poems)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="no end marker before this many tokens")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=default_top_k,
                   help=f"sample among the k most likely tokens (default {default_top_k}; 0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (deterministic)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam scores are divided by length**this")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages seen tokens (1.0: off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size (0: off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample where this text appears (repeatable; the text is not kept)")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    add_weights_arg(g)
    f = p.add_argument_group("verse forms (character-level Chinese tokenizers)")
    f.add_argument("--form", choices=["wuyan-jueju", "qiyan-jueju", "wuyan-lvshi", "qiyan-lvshi"],
                   help="exact classical form: lines x characters, '，' after odd lines, '。' after even ones")
    f.add_argument("--rows", type=int, help="custom form: number of lines (with --cols)")
    f.add_argument("--cols", type=int, help="custom form: characters per line (with --rows)")
    f.add_argument("--acrostic", help="line i starts with the i-th of these characters (藏頭詩)")
    f.add_argument("--rhyme", action="store_true", help="even lines end on the rhyme of line 2 (see --prosody); "
                                                         "with --tones, a first line that ends level rhymes too")
    f.add_argument("--rhyme-group", metavar="GROUP",
                   help="with --rhyme: the rhyme group to use, a 平水韻 level group (東, 一東 or 上平一東; "
                        "simplified 东 works) or, with --prosody modern, a final (ang)")
    f.add_argument("--tones", choices=["strict", "standard"],
                   help="tone pattern (平仄) of regulated verse, for 5- or 7-character lines: strict (every "
                        "position) or standard (positions 1, 3, 5 free, 一三五不論, but no 孤平 and no 三平尾/三仄尾)")
    f.add_argument("--pattern", choices=["ping-rhymed", "ping-unrhymed", "ze-rhymed", "ze-unrhymed"],
                   help="with --tones: one of the four standard patterns (平起/仄起: tone of line 1's 2nd character; "
                        "whether line 1 rhymes); default: picked by the first line written")
    f.add_argument("--prosody", choices=["classical", "modern"], default="classical",
                   help="rhymes (and eval-poems' tones) by the 平水韻 rhyme book: level-tone groups, entering tones "
                        "oblique (classical, the default), or by today's Mandarin readings from pypinyin (modern)")
    f.add_argument("--no-repeat-chars", action="store_true", help="no character twice in a poem")


WEIGHTS_HELP = ("decoding weights: 'model' (default: as loaded, exact), 'bf16' (a bf16 copy, ~1.4x faster "
                "on CPU) or 'int8' (per-channel int8, ~2.5x faster on CPU); bf16/int8 move the logits a "
                "little (the drift is printed) and need a plain GPT-2 (merge adapters with export --merge)")


def add_weights_arg(g) -> None:
    g.add_argument("--weights", choices=["model", "bf16", "int8"], default="model", help=WEIGHTS_HELP)


def check_weights(model, tok, framing, weights: str, prompt: str = "", report: bool = True) -> None:
    """One-line error when `weights` cannot apply to `model`; else print on stderr how far they
    move the logits on `prompt` (continued greedily when it is shorter than 8 tokens)."""
    import torch

    from gpt2tune.generate.fast import fast_supported, logits_drift

    if weights == "model":
        return
    why = fast_supported(model)
    if why:
        raise UserError(f"--weights {weights} needs a plain GPT-2 model ({why})")
    if not report:
        return
    from gpt2tune.generate.decode import decode
    from gpt2tune.generate.sampling import Sampling
    from gpt2tune.model.tokenizer import prompt_ids

    ids = prompt_ids(tok, framing, prompt or "")
    ids = ids[-min(len(ids), 256):] or [0]
    if len(ids) < 8:
        ids = ids + decode(model, [ids], None, Sampling(max_new_tokens=16, greedy=True))[0].ids
    d = logits_drift(model, weights, torch.tensor([ids], device=next(model.parameters()).device))
    print(f"{weights}: logits drift vs the model's weights on {len(ids)} tokens: max |diff| "
          f"{d['max_abs_logit_diff']}, mean |diff| {d['mean_abs_logit_diff']}, top-1 agreement "
          f"{d['top1_agreement']:.0%}, mean KL {d['mean_kl']}", file=sys.stderr)


def sampling_from_args(a, num_return_sequences: int):
    from gpt2tune.generate.sampling import Sampling

    s = Sampling(max_new_tokens=a.max_new_tokens, min_new_tokens=a.min_new_tokens, greedy=a.greedy,
                 temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, num_return_sequences=num_return_sequences,
                 seed=a.seed, repetition_penalty=a.repetition_penalty, no_repeat_ngram_size=a.no_repeat_ngram_size,
                 num_beams=a.num_beams, length_penalty=a.length_penalty, stop=list(a.stop),
                 weights="int8" if getattr(a, "quantize", None) == "int8" else a.weights)
    msg = s.check()
    if msg:
        raise UserError(msg.replace("_", "-"))
    return s


def form_from_args(a):
    from gpt2tune.generate.forms import form_spec

    from gpt2tune.generate.forms import form_notes

    spec = form_spec(a.form, a.rows, a.cols, a.acrostic, a.rhyme, a.no_repeat_chars, a.prosody, a.tones, a.pattern,
                     a.rhyme_group)
    for note in form_notes(spec) if spec is not None else ():
        print(f"note: {note}", file=sys.stderr)
    return spec


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a run or a model",
                       description="Generate from RUN (a run folder; means RUN/model) or a model folder / hub id.",
                       epilog="Examples: gpt2tune generate runs/quickstart --prompt 白日 -n 3 | "
                              "gpt2tune generate runs/quickstart --form qiyan-lvshi --acrostic 春夏秋冬 --rhyme")
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("--prompt", default=None, help="text to continue (default: empty, start a new sample)")
    p.add_argument("--prompts-file", help="one prompt per line, decoded in batches (left-padded)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward batch with --prompts-file")
    p.add_argument("--num-return-sequences", "-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="sample N per returned sample and keep the best by --rank-by")
    p.add_argument("--rank-by", default=None, metavar="METRIC",
                   help="with --best-of: logprob (mean log-probability per token; any text), or for verse forms "
                        "poem (default with a form), form, rhyme, tones, pattern, repetition (by --prosody)")
    add_decoding_args(p)
    p.add_argument("--stream", action="store_true",
                   help="print text as it is generated (one sample; with --json: JSON lines of deltas, then the samples)")
    p.add_argument("--json", action="store_true", help="print a JSON list of samples, each with 'text'")
    p.add_argument("--quantize", choices=["int8"], help="the same as --weights int8")
    p.add_argument("--template", action="store_true",
                   help="completion runs: put each prompt into the run's saved template (e.g. '{document}\\nTL;DR:')")


def read_prompts(a) -> list[str]:
    if a.prompts_file and a.prompt is not None:
        raise UserError("give --prompt or --prompts-file, not both")
    if a.prompts_file:
        p = Path(a.prompts_file)
        if not p.is_file():
            raise UserError(f"prompts file not found: {p}")
        try:
            lines = [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError:
            raise UserError(f"{p} is not UTF-8 text") from None
        prompts = [line for line in lines if line]
        if not prompts:
            raise UserError(f"{p} holds no prompts (one per line)")
        return prompts
    return [a.prompt or ""]


def run(a) -> int:
    from gpt2tune.generate.text import generate_texts
    from gpt2tune.method.io import load_run

    if a.best_of < 1:
        raise UserError("--best-of must be at least 1")
    s = sampling_from_args(a, a.num_return_sequences * a.best_of)
    form = form_from_args(a)
    if a.rank_by is not None and a.best_of == 1:
        raise UserError("--rank-by ranks the samples of --best-of N (N > 1)")
    if a.best_of > 1 and (a.stream or s.num_beams > 1 or a.greedy):
        raise UserError("--best-of samples several continuations: not with --stream, --greedy or beam search")
    metric = None
    if a.best_of > 1:
        from gpt2tune.generate.best_of import POEM_METRICS, RANK_BY

        metric = a.rank_by or ("poem" if form is not None else "logprob")
        if metric not in RANK_BY:
            raise UserError(f"--rank-by: unknown metric {metric!r}; valid: {', '.join(RANK_BY)}")
        if metric in POEM_METRICS and form is None:
            raise UserError(f"--rank-by {metric} scores poems: give a verse form (--form, or --rows and --cols)")
    prompts = read_prompts(a)
    if a.template:
        from gpt2tune.chat.prompt import find_prompt_template

        pt = find_prompt_template(a.model)
        prompts = [pt.prompt_for(x) for x in prompts]
    if a.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if a.stream and s.num_beams > 1:
        raise UserError("--stream does not work with beam search (--num-beams > 1)")
    if a.stream and not a.json and len(prompts) * s.num_return_sequences > 1:
        raise UserError("--stream prints one sample as it is written; for several samples add --json (JSON lines)")
    model, tok, framing = load_run(a.model)
    check_weights(model, tok, framing, s.weights, prompts[0])
    if a.stream:
        return _stream(model, tok, framing, prompts, s, form, a.json)
    samples, stats = generate_texts(model, tok, framing, prompts, s, form=form, batch_size=a.batch_size)
    if a.best_of > 1:
        from gpt2tune.generate.best_of import keep_best, scores_of

        shape = (form.rows, form.cols) if form is not None else None
        samples = keep_best(samples, scores_of(samples, metric, model, tok, framing, shape, a.prosody), a.num_return_sequences)
        print(f"best of {a.best_of} by {metric}: scores {', '.join(f'{x.score:.4g}' for x in samples)}", file=sys.stderr)
    if a.json:
        print(json.dumps([dict(x.as_dict(), tokens_per_s=stats["tokens_per_s"]) for x in samples], ensure_ascii=False))
    else:
        for x in samples:
            print(x.text)
    _report(samples, stats)
    return 0


def _report(samples, stats) -> None:
    loops = [i for i, x in enumerate(samples) if x.loop]
    msg = (f"{len(samples)} sample(s), {stats['new_tokens']} new tokens in {stats['seconds']:.2f}s "
           f"({stats['tokens_per_s']} tokens/s)")
    if loops:
        msg += f"; repetition loop in sample(s) {', '.join(str(i + 1) for i in loops)}"
    print(msg, file=sys.stderr)


def _stream(model, tok, framing, prompts, s, form, as_json: bool) -> int:
    from gpt2tune.generate.text import stream_texts

    for ev in stream_texts(model, tok, framing, prompts, s, form):
        if ev["type"] in ("start", "delta"):
            if as_json:
                print(json.dumps(ev, ensure_ascii=False), flush=True)
            else:
                sys.stdout.write(ev["heads"][0] if ev["type"] == "start" else ev["text"])
                sys.stdout.flush()
        else:
            samples, stats = ev["samples"], ev["stats"]
            if as_json:
                print(json.dumps({"type": "done", "samples": [x.as_dict() for x in samples], "stats": stats},
                                 ensure_ascii=False), flush=True)
            else:
                sys.stdout.write("\n")
            _report(samples, stats)
    return 0
