"""`gpt2tune lr-find RECIPE`: the learning-rate range test on the recipe's model, method and data.

The model, tokenizer, method and training samples are what `gpt2tune train` would use (the same
loaders); the ramp itself is gpt2tune.train.lr_find. Nothing is trained for keeps: no checkpoint,
no warmup, no schedule, no validation; DIR receives lr_find.json, lr_find.png (and tokenizer/
when the recipe builds its tokenizer from the data). Tasks causal-lm and classification (without
its language-model pretraining stage).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError


def _causal_lm(recipe, folder: Path, log):
    from gpt2tune.data.dataset import collate, tokenize_texts
    from gpt2tune.method import apply_method
    from gpt2tune.tasks.common import load_base, train_val_texts

    d = recipe.data
    train_texts, _, _ = train_val_texts(d)
    base = load_base(recipe.model, train_texts, folder, False, d.max_length, recipe.train.seed)
    fr = base.framing
    rows, _ = tokenize_texts(base.tokenizer, train_texts, fr.bos, fr.eos, d.max_length, d.long_samples == "split")
    model = apply_method(base.model, recipe.method, tokenizer=base.tokenizer, seed=recipe.train.seed)
    return model, rows, partial(collate, pad_id=fr.pad), None, base.source, recipe.method.name


def _classification(recipe, folder: Path, log):
    from gpt2tune.classify.model import classifier_from_lm
    from gpt2tune.classify.objective import classification_loss
    from gpt2tune.data.labels import collate_examples
    from gpt2tune.method import apply_method
    from gpt2tune.tasks.classification import effective_method, examples, load_splits
    from gpt2tune.tasks.common import load_base

    d, t = recipe.data, recipe.train
    if d.batching == "pack":
        raise UserError("data.batching: pack joins samples together; a classifier needs one text per row")
    c = recipe.classification
    if c.pretrain_steps:
        log(f"note: lr-find ramps the classifier from the base model; classification.pretrain_steps ({c.pretrain_steps}) "
            f"of language-model training are not run first")
    splits = load_splits(d, c)
    base = load_base(recipe.model, splits.train.texts, folder, False, d.max_length, t.seed)
    rows, _ = examples(base.tokenizer, splits.train, splits.labels, d.max_length, "the train data")
    model = classifier_from_lm(base.model, splits.labels.id2label, base.framing.pad, seed=t.seed)
    method = effective_method(recipe)  # the classic classifier method when the recipe names none
    model = apply_method(model, method, tokenizer=base.tokenizer, seed=t.seed)
    return model, rows, partial(collate_examples, pad_id=base.framing.pad), classification_loss, base.source, method.name


PREPARE = {"causal-lm": _causal_lm, "classification": _classification}


def lr_find(recipe, output: Optional[str] = None, start: float = 1e-7, end: float = 1.0, steps: int = 100,
            diverge: float = 4.0, overwrite: bool = False, progress: bool = True, log=None) -> dict:
    from gpt2tune.tasks.common import describe_params, log as default_log, write_json
    from gpt2tune.tasks.jobs import prepare_output
    from gpt2tune.train import distributed as dist
    from gpt2tune.train.lr_find import check_ramp, lr_range_test, plot_lr_find
    from gpt2tune.train.objective import lm_loss

    log = log or default_log
    if recipe.task not in PREPARE:
        raise UserError(f"lr-find runs tasks {' and '.join(PREPARE)}, not {recipe.task}; sweep train.lr instead "
                        f"(gpt2tune sweep RECIPE --grid train.lr=1e-5:1e-2:log:4)")
    if dist.world_size() > 1:
        raise UserError("lr-find runs in one process (not under torchrun)")
    check_ramp(start, end, steps, diverge)
    folder = Path(output or recipe.output.dir.rstrip("/") + "-lr-find")
    prepare_output(folder, overwrite, "lr-find")
    model, rows, collate, loss_fn, source, method = PREPARE[recipe.task](recipe, folder, log)
    params = describe_params(model)
    t = recipe.train
    log(f"lr-find: {source}, method {method} ({params['trainable']:,} trainable parameters), "
        f"{len(rows):,} training samples, batch {t.batch_size} x {t.grad_accum}; lr {start:.1e} -> {end:.1e} "
        f"over {steps} steps")
    result = lr_range_test(model, rows, collate, t, loss_fn=loss_fn or lm_loss, start=start, end=end, steps=steps,
                           diverge=diverge, batching=recipe.data.batching, block=recipe.data.max_length,
                           log=log, progress=progress)
    sug = result["suggestion"]
    result.update(task=recipe.task, model=source, method=method, batch_size=t.batch_size,
                  grad_accum=t.grad_accum, max_length=recipe.data.max_length, recipe_lr=t.lr,
                  suggested_lr=sug["steepest"])
    write_json(folder / "lr_find.json", result)
    plot_lr_find(result, folder / "lr_find.png",
                 f"Learning-rate range test: {source}, {method}, batch {t.batch_size * t.grad_accum}")
    return {"folder": str(folder), **result}


def summary(result: dict) -> str:
    s = result["suggestion"]
    return (f"suggested train.lr: {s['steepest']:.2e} (steepest descent of the smoothed loss); "
            f"minimum / 10: {s['minimum_over_10']:.2e}; the recipe has {result['recipe_lr']:.2e}\n"
            f"try: --set train.lr={s['steepest']:.2g}")
