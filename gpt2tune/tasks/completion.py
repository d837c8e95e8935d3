"""Task `completion`: fine-tune on prompt->completion pairs with the loss on the completion only.

`completion.template` (e.g. "{document}\\nTL;DR: {title}") names the record fields; the last
placeholder is the completion. The template is saved with the model (completion.json) so
`gpt2tune generate RUN --template --prompt TEXT` completes a bare prompt the same way.
"""

from __future__ import annotations

from functools import partial

from gpt2tune.chat.prompt import PromptTemplate, encode_pair, parse_template, save_prompt_template, values_of
from gpt2tune.chat.template import marker_text
from gpt2tune.generate.text import complete
from gpt2tune.recipe import Recipe
from gpt2tune.tasks.cached import tokenizer_of
from gpt2tune.tasks.common import load_base, prepare_run_dir, sample_settings, write_json
from gpt2tune.tasks.masked import MaskedTask, Rows, Source, check_batching, report_rows, train_masked
from gpt2tune.train import distributed as dist
from gpt2tune.train.device import pick_device


def completion_task(recipe: Recipe, pt: PromptTemplate) -> MaskedTask:
    return MaskedTask("completion", recipe.completion.model_dump(mode="json"),
                      lambda records, spec, check: values_of(records, pt, spec, check),
                      lambda v: pt.prompt(v) + pt.completion(v),
                      f"{{spec}}: no record has all the fields of completion.template ({', '.join(pt.fields)}) filled")


def setup(pt: PromptTemplate, tok, framing, max_length: int):
    """encode(values, FitStats) -> row, framed by the tokenizer's markers."""
    return partial(_encode, tok, pt, marker_text(tok, framing.bos), marker_text(tok, framing.eos), max_length)


def _encode(tok, pt, bos, eos, max_length, values, st):
    return encode_pair(tok, pt, values, bos, eos, max_length, st)


def prepare(recipe: Recipe, progress: bool = True) -> Rows:
    """The cached rows of a completion recipe, built when missing (gpt2tune data prepare)."""
    from gpt2tune.model.tokenizer import framing_of

    pt = parse_template(recipe.completion.template)
    tok = tokenizer_of(recipe.model)
    return Source(recipe, completion_task(recipe, pt)).rows(tok, setup(pt, tok, framing_of(tok), recipe.data.max_length),
                                                           progress)


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    check_batching(recipe)
    pt = parse_template(recipe.completion.template)
    dist.init(pick_device(recipe.train.device).type)
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    d = recipe.data
    source = Source(recipe, completion_task(recipe, pt))
    base = load_base(recipe.model, source.tokenizer_texts(), run_dir, resume, d.max_length, recipe.train.seed)
    rows = source.rows(base.tokenizer, setup(pt, base.tokenizer, base.framing, d.max_length), progress)
    stats = {**report_rows(rows, "samples", "records with a missing or empty field", d.max_length),
             "template": pt.template}
    train_rows, val_rows = rows.train, rows.val

    done = train_masked(recipe, run_dir, base, train_rows, val_rows, stats, resume, progress)
    if done is None:  # not rank 0 of a multi-process run
        return {}
    model, report, saved = done
    save_prompt_template(pt, saved)
    save_prompt_template(pt, run_dir)

    if recipe.sample.prompts:
        s = sample_settings(recipe)
        samples = []
        for p in recipe.sample.prompts:
            prompt = pt.prompt_for(p)
            text = complete(model, base.tokenizer, base.framing, prompt, s)[0]
            samples.append({"prompt": p, "text": text, "completion": text[len(prompt):].strip()})
        write_json(run_dir / "samples.json", samples)
    return report
