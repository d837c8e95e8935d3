"""Task `causal-lm`: fine-tune a GPT-2 language model on text and sample from it."""

from __future__ import annotations

from gpt2tune.data.dataset import tokenize_texts
from gpt2tune.generate.text import complete
from gpt2tune.method import apply_method
from gpt2tune.recipe import Recipe, dump_recipe
from gpt2tune.tasks.common import (check_disk, describe_params, fit_and_save, load_base, log, prepare_run_dir,
                                   sample_settings, train_val_texts, write_json)
from gpt2tune.train import distributed as dist
from gpt2tune.train.device import pick_device
from gpt2tune.train.loop import Data


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    dist.init(pick_device(recipe.train.device).type)
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    d = recipe.data
    train_texts, val_texts, stats = train_val_texts(d)
    base = load_base(recipe.model, train_texts, run_dir, resume, d.max_length, recipe.train.seed)
    split = d.long_samples == "split"
    train_ids, tr_cut = tokenize_texts(base.tokenizer, train_texts, base.framing.bos, base.framing.eos, d.max_length, split)
    val_ids, va_cut = tokenize_texts(base.tokenizer, val_texts, base.framing.bos, base.framing.eos, d.max_length, split)
    stats.update(truncated=tr_cut + va_cut, train_tokens=sum(map(len, train_ids)))
    if stats["truncated"]:
        log(f"note: {stats['truncated']} samples were longer than data.max_length={d.max_length} tokens and were truncated")
    if stats.get("skipped_records"):
        log(f"note: skipped {stats['skipped_records']} malformed records")

    model = apply_method(base.model, recipe.method, tokenizer=base.tokenizer, seed=recipe.train.seed)
    params = describe_params(model)
    log(f"model {base.source}: {params['total']:,} parameters, {params['trainable']:,} trainable "
        f"({params['percent']:.2f}%); {len(train_ids):,} training samples, {len(val_ids):,} validation")
    check_disk(run_dir, params["total"], recipe.train.keep_checkpoints, recipe.train.save_every)
    if dist.is_main():
        dump_recipe(recipe, run_dir / "recipe.yaml")
        write_json(run_dir / "data.json", stats)

    data = Data(train_ids, val_ids, base.framing.pad, d.batching, d.max_length)
    done = fit_and_save(recipe, run_dir, base, model, data, params, resume, progress)
    if done is None:  # not rank 0
        return {}
    model, report, _ = done

    if recipe.sample.prompts:
        s = sample_settings(recipe)
        samples = [{"prompt": p, "text": complete(model, base.tokenizer, base.framing, p, s)[0]}
                   for p in recipe.sample.prompts]
        write_json(run_dir / "samples.json", samples)
    return report
