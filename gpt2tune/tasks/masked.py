"""What the `chat` and `completion` tasks share: records read from a source and split, and
training on rows whose labels mask everything but the answers."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from gpt2tune.chat.masking import FitStats, collate_masked
from gpt2tune.data import sources
from gpt2tune.data.dataset import split_indices
from gpt2tune.errors import UserError
from gpt2tune.method import apply_method
from gpt2tune.recipe import Recipe, dump_recipe
from gpt2tune.tasks.common import Base, check_disk, describe_params, fit_and_save, log, write_json
from gpt2tune.train import distributed as dist
from gpt2tune.train.loop import Data


def check_batching(recipe: Recipe) -> None:
    if recipe.data.batching == "pack":
        raise UserError(f"data.batching: pack would glue samples together across their loss masks; "
                        f"task {recipe.task} uses group (default) or pad")


def load_records(data_cfg, spec: str) -> sources.Loaded:
    opts = sources.SourceOptions(field=data_cfg.field, columns=data_cfg.columns, header=data_cfg.header,
                                 text_mode=data_cfg.text_mode)
    loaded = sources.load_source(spec, opts)
    for note in loaded.notes:  # decisions the reader took (e.g. a header row), as `read_texts` logs them
        log(f"note: {note}")
    return loaded


def split_items(data_cfg, items: list, val_items: list | None) -> tuple[list, list]:
    """Train/validation items: the separate validation source, else a seeded split; then data.limit."""
    if val_items is not None:
        train, val = items, val_items
    else:
        tr, va = split_indices(len(items), data_cfg.val_fraction, data_cfg.seed)
        train, val = [items[i] for i in tr], [items[i] for i in va]
    if data_cfg.limit:
        train = train[: data_cfg.limit]
    return train, val


def report_fit(what: str, st: FitStats, max_length: int) -> None:
    if st.shortened:
        log(f"note: {st.shortened} {what} were longer than data.max_length={max_length} tokens: "
            f"{st.dropped_turns} earliest turns dropped, {st.prompt_cut} prompts cut at the start, "
            f"{st.answer_cut} answers cut at the end")
    if st.skipped:
        log(f"warning: skipped {st.skipped} {what} with nothing to train on "
            f"({st.skipped_no_answer} without an answer, {st.skipped_too_long} too long for data.max_length={max_length})")


def train_masked(recipe: Recipe, run_dir: Path, base: Base, train_rows: list, val_rows: list, stats: dict,
                 resume: bool, progress: bool):
    """Train on masked rows and save the model; (trained model, report, saved folder), None off rank 0."""
    d = recipe.data
    if not train_rows:
        raise UserError(f"no training samples left for task {recipe.task} (see the warnings above)")
    model = apply_method(base.model, recipe.method, tokenizer=base.tokenizer, seed=recipe.train.seed)
    params = describe_params(model)
    log(f"model {base.source}: {params['total']:,} parameters, {params['trainable']:,} trainable "
        f"({params['percent']:.2f}%); {len(train_rows):,} training samples, {len(val_rows):,} validation; "
        f"{stats.get('trained_tokens', 0):,} trained (answer) tokens")
    check_disk(run_dir, params["total"], recipe.train.keep_checkpoints, recipe.train.save_every)
    if dist.is_main():
        dump_recipe(recipe, run_dir / "recipe.yaml")
        write_json(run_dir / "data.json", stats)

    pad = base.framing.pad
    data = Data(train_rows, val_rows, pad, d.batching, d.max_length, collate=partial(collate_masked, pad_id=pad))
    return fit_and_save(recipe, run_dir, base, model, data, params, resume, progress, headline="loss",
                        note="; loss on answers only")
