"""Task `completion`: fine-tune on prompt->completion pairs with the loss on the completion only.

`completion.template` (e.g. "{document}\\nTL;DR: {title}") names the record fields; the last
placeholder is the completion. The template is saved with the model (completion.json) so
`gpt2tune generate RUN --template --prompt TEXT` completes a bare prompt the same way.
"""

from __future__ import annotations

from gpt2tune.chat.prompt import encode_pairs, parse_template, save_prompt_template, values_of
from gpt2tune.chat.template import marker_text
from gpt2tune.errors import UserError
from gpt2tune.generate.text import complete
from gpt2tune.recipe import Recipe
from gpt2tune.tasks.common import load_base, log, prepare_run_dir, sample_settings, write_json
from gpt2tune.tasks.masked import check_batching, load_records, report_fit, split_items, train_masked


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    check_batching(recipe)
    pt = parse_template(recipe.completion.template)
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    d = recipe.data
    loaded = load_records(d, d.source)
    items, skipped = values_of(loaded.records, pt, d.source)
    skipped += loaded.skipped
    val_items = None
    if d.validation:
        vloaded = load_records(d, d.validation)
        val_items, vskipped = values_of(vloaded.records, pt, d.validation)
        skipped += vskipped + vloaded.skipped
    if not items:
        raise UserError(f"{d.source}: no record has all the fields of completion.template "
                        f"({', '.join(pt.fields)}) filled")
    if skipped:
        log(f"note: skipped {skipped} records with a missing or empty field")
    train, val = split_items(d, items, val_items)

    base = load_base(recipe.model, [pt.prompt(v) + pt.completion(v) for v in train], run_dir, resume,
                     d.max_length, recipe.train.seed)
    bos, eos = marker_text(base.tokenizer, base.framing.bos), marker_text(base.tokenizer, base.framing.eos)
    train_rows, st = encode_pairs(base.tokenizer, pt, train, bos, eos, d.max_length)
    val_rows, vst = encode_pairs(base.tokenizer, pt, val, bos, eos, d.max_length)
    report_fit("training samples", st, d.max_length)
    report_fit("validation samples", vst, d.max_length)
    stats = {"skipped_records": skipped, "train_samples": len(train_rows), "validation_samples": len(val_rows),
             "template": pt.template, "train_fit": st.as_dict(), "validation_fit": vst.as_dict(),
             "trained_tokens": st.trained_tokens}

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
