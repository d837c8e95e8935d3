"""Task `classification`: fine-tune GPT-2 as a text classifier (spam / sentiment / ...).

data (text + label) -> balance -> stratified train/validation/test split -> tokenizer and
base model -> optional language-model pretraining on the training texts
(`classification.pretrain_steps`) -> GPT-2 with a class head on the last real token -> method ->
train -> metrics on every split (eval.json), plots, and the model in RUN/model.

Without a `method` section the method is the classic one: last block + final layer norm
+ head (`PartialMethod()`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gpt2tune.classify.metrics import classification_report
from gpt2tune.classify.model import HF_ARCHITECTURE, classifier_from_lm
from gpt2tune.classify.objective import classification_loss, evaluate_classifier
from gpt2tune.classify.plots import plot_confusion, plot_curves
from gpt2tune.classify.predict import encode, predict_ids
from gpt2tune.data.dataset import tokenize_texts
from gpt2tune.data.labels import (DEFAULT_SPLIT, Example, LabelMap, Labeled, check_fractions, collate_examples,
                                  read_labeled, stratified_split, undersample)
from gpt2tune.errors import UserError
from gpt2tune.method import apply_method, save_trained
from gpt2tune.method.config import PartialMethod
from gpt2tune.recipe import Recipe, dump_recipe
from gpt2tune.tasks.common import (check_disk, describe_params, keep_best_model, load_base, log, prepare_run_dir,
                                   write_json)
from gpt2tune.train.loop import Data, Trainer
from gpt2tune.train.tracking import open_tracking

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: Labeled
    validation: Labeled
    test: Labeled
    labels: LabelMap
    stats: dict


def effective_method(recipe: Recipe):
    """The recipe's method, or the classic classifier method when the recipe names none."""
    return recipe.method if "method" in recipe.model_fields_set else PartialMethod()


def load_splits(d, c) -> Splits:
    """Read, balance and split the data as the recipe's `data` (`d`: source and cleaning) and
    `classification` (`c`: label, balance, split, test source) sections say."""
    data = read_labeled(d, d.source, c.label_field)
    for note in data.stats.get("notes", []):
        log(f"note: {note}")
    stats = {"source": data.stats, "source_counts": data.counts()}
    if c.balance == "undersample":
        data = undersample(data, d.seed)
        stats["balanced_counts"] = data.counts()
    f_train, f_val, f_test = check_fractions(c.split or DEFAULT_SPLIT)
    val_file = read_labeled(d, d.validation, c.label_field) if d.validation else None
    test_file = read_labeled(d, c.test, c.label_field) if c.test else None
    # parts not given as files are cut from the source, in the configured proportions
    fr = [f_train, 0.0 if val_file else f_val, 0.0 if test_file else f_test]
    total = sum(fr)
    after = " (after classification.balance: undersample)" if c.balance == "undersample" else ""
    tr, va, te = stratified_split(data.labels, [f / total for f in fr], d.seed,
                                  shown=list(c.split or DEFAULT_SPLIT), after=after)
    train = data.subset(tr)
    val = val_file if val_file is not None else data.subset(va)
    test = test_file if test_file is not None else data.subset(te)
    if d.limit:
        train = train.subset(range(min(d.limit, len(train))))
    labels = LabelMap.from_labels(train.labels, "the training split")
    labels.encode(val.labels, "the validation data")
    labels.encode(test.labels, "the test data")
    stats["counts"] = {name: part.counts() for name, part in zip(SPLITS, (train, val, test))}
    return Splits(train, val, test, labels, stats)


def examples(tokenizer, part: Labeled, labels: LabelMap, max_length: int, where: str) -> tuple[list[Example], int]:
    rows, cut = encode(tokenizer, part.texts, max_length)
    ids = labels.encode(part.labels, where)
    return [Example(r, y) for r, y in zip(rows, ids)], cut


def pretrain_lm(base, splits: Splits, recipe: Recipe, run_dir: Path, resume: bool, progress: bool) -> dict:
    """Language-model training of the base model on the training texts (never the test texts).

    Every parameter trains. The result is kept in RUN/pretrain/transformer.safetensors so
    a resumed run does not repeat it.
    """
    from safetensors.torch import load_file, save_file

    t, d, c = recipe.train, recipe.data, recipe.classification
    out = run_dir / "pretrain"
    done = out / "transformer.safetensors"
    lm = base.model
    if resume and done.is_file():
        lm.transformer.load_state_dict(load_file(str(done)))
        log(f"pretraining: reusing {done}")
        return json.loads((out / "pretrain.json").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    fr = base.framing
    train_ids, _ = tokenize_texts(base.tokenizer, splits.train.texts, fr.bos, fr.eos, d.max_length, True)
    val_ids, _ = tokenize_texts(base.tokenizer, splits.validation.texts, fr.bos, fr.eos, d.max_length, True)
    for p in lm.parameters():
        p.requires_grad_(True)
    cfg = t.model_copy(update={"max_steps": c.pretrain_steps, "lr": c.pretrain_lr or t.lr, "eval_every": 0})
    tracking = open_tracking(recipe, run_dir, log)  # the run's trackers: this stage logs under pretrain/
    trainer = Trainer(lm, Data(train_ids, val_ids, fr.pad, "group", d.max_length), cfg, out, progress=progress,
                      log=log, loggers=[tracking.stage("pretrain/")])
    log(f"pretraining (language model on the {len(train_ids):,} training texts): {trainer.total_steps} steps")
    again = resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    result = tracking.fit(trainer, resume=again, finish=False)
    lm.float().cpu()
    save_file({k: v.detach().contiguous() for k, v in lm.transformer.state_dict().items()}, str(done))
    report = {"steps": result.steps, "seconds": round(result.seconds, 2), "validation": result.final_eval,
              "validation_at_start": result.first_eval}
    write_json(out / "pretrain.json", report)
    if result.final_eval:
        log(f"pretraining: validation perplexity {result.first_eval.get('perplexity', float('nan')):.1f} -> "
            f"{result.final_eval['perplexity']:.1f} ({result.seconds:.0f}s)")
    return report


def _fix_architecture(folder: Path) -> None:
    """Name the class `transformers` loads the export with (ours is a drop-in subclass)."""
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("architectures") != [HF_ARCHITECTURE]:
            cfg["architectures"] = [HF_ARCHITECTURE]
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    d, t = recipe.data, recipe.train
    if d.batching == "pack":
        raise UserError("data.batching: pack joins samples together; a classifier needs one text per row "
                        "(use group or pad)")
    method = effective_method(recipe)
    recipe = recipe.model_copy(update={"method": method})
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    splits = load_splits(d, recipe.classification)
    names = splits.labels.names
    base = load_base(recipe.model, splits.train.texts, run_dir, resume, d.max_length, t.seed)
    tok = base.tokenizer
    tok.model_max_length = d.max_length  # saved with the tokenizer: inference cuts texts the same way
    rows, cut = {}, 0
    for name, part in zip(SPLITS, (splits.train, splits.validation, splits.test)):
        rows[name], c = examples(tok, part, splits.labels, d.max_length, f"the {name} data")
        cut += c
    stats = dict(splits.stats, truncated=cut, labels=list(names))
    if cut:
        log(f"note: {cut} texts were longer than data.max_length={d.max_length} tokens and were truncated")
    log("data: " + "; ".join(f"{n} {len(rows[n]):,} ({', '.join(f'{k} {v}' for k, v in c.items())})"
                               for n, c in stats["counts"].items()))

    pre = {}
    if recipe.classification.pretrain_steps:
        pre = pretrain_lm(base, splits, recipe, run_dir, resume, progress)
    model = classifier_from_lm(base.model, splits.labels.id2label, base.framing.pad, seed=t.seed)
    model = apply_method(model, method, tokenizer=tok, seed=t.seed)
    params = describe_params(model)
    log(f"model {base.source} + {len(names)}-class head: {params['total']:,} parameters, "
        f"{params['trainable']:,} trainable ({params['percent']:.2f}%), method {method.name}")
    check_disk(run_dir, params["total"], t.keep_checkpoints, t.save_every)
    dump_recipe(recipe, run_dir / "recipe.yaml")
    write_json(run_dir / "data.json", stats)

    data = Data(rows["train"], rows["validation"], base.framing.pad, d.batching, d.max_length,
                collate=partial(collate_examples, pad_id=base.framing.pad))
    tracking = open_tracking(recipe, run_dir, log)  # train.report_to; finished after the plots below
    trainer = Trainer(model, data, t, run_dir, loss_fn=classification_loss, progress=progress, log=log,
                      loggers=[tracking.stage()], eval_fn=evaluate_classifier)
    if not t.eval_every:  # a classifier is cheap to validate: once per epoch
        trainer.cfg = t.model_copy(update={"eval_every": trainer.steps_per_epoch})
    log(f"training {trainer.total_steps} steps ({trainer.total_steps / trainer.steps_per_epoch:.1f} epochs) on "
        f"{trainer.device} ({str(trainer.dtype).replace('torch.', '')})")
    resume_cls = resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    result = tracking.fit(trainer, resume=resume_cls, finish=False)

    model = model.float().cpu()
    best = keep_best_model(trainer, model, tok, run_dir, method)  # train.keep_best: RUN/model is the best
    saved = save_trained(model, tok, run_dir, method)
    for folder in (run_dir / saved, run_dir / "base"):  # base: a scratch base saved for adapter methods
        _fix_architecture(folder)

    report: dict = {}
    for name in ("test", "validation", "train"):
        if not rows[name]:
            report[name] = {}
            continue
        probs = predict_ids(model, rows[name], base.framing.pad, batch_size=max(t.batch_size, 32))
        true = [r.label for r in rows[name]]
        pred = probs.argmax(-1).tolist()
        report[name] = classification_report(true, pred, names, [float(probs[i, y]) for i, y in enumerate(true)])
    report.update(
        labels=list(names),
        steps=result.steps,
        **best,
        epochs=round(result.steps / trainer.steps_per_epoch, 3),
        train_seconds=round(result.seconds + pre.get("seconds", 0.0), 2),
        pretrain=pre,
        method=method.name,
        parameters=params,
    )
    write_json(run_dir / "eval.json", report)
    plot_curves(result.records, trainer.steps_per_epoch, len(rows["train"]), run_dir / "plots")
    shown = "test" if rows["test"] else "validation"
    if report[shown]:
        plot_confusion(report[shown]["confusion_matrix"]["rows_true_columns_predicted"], names,
                       run_dir / "plots" / "confusion-matrix.png", f"{shown} ({len(rows[shown])} examples)")
    for name in ("train", "validation", "test"):
        if report[name]:
            log(f"{name}: accuracy {100 * report[name]['accuracy']:.2f}%, macro-F1 {report[name]['macro_f1']:.4f} "
                f"({report[name]['errors']} errors in {report[name]['examples']})")
    tracking.finish()  # plots and recipe as artifacts; trackers closed
    log(f"saved {run_dir / saved} ({report['train_seconds']:.0f}s of training)")
    return report
