"""Pieces every task shares: the run folder, loading the base model and tokenizer, logging."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2tune.data import sources
from gpt2tune.data.clean import clean_all
from gpt2tune.data.dataset import split_indices
from gpt2tune.errors import UserError
from gpt2tune.train import distributed as dist
from gpt2tune.model.build import SIZES, build_scratch, count_parameters, load_pretrained
from gpt2tune.model.resolve import resolve_model_dir
from gpt2tune.model.tokenizer import Framing, build_tokenizer, framing_of, load_tokenizer


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(path: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create the run folder (on rank 0; other ranks wait for it)."""
    if dist.is_main():
        _prepare_run_dir(path, resume, overwrite)
    dist.barrier()
    return Path(path)


def _prepare_run_dir(path: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create the run folder; refuse to clobber a previous run without --overwrite."""
    run = Path(path)
    if run.exists() and not run.is_dir():
        raise UserError(f"output.dir {run} exists and is not a folder")
    used = run.is_dir() and any(run.iterdir())
    if resume:
        if not (run / "checkpoints").is_dir():
            raise UserError(f"--resume: {run} has no checkpoints folder to resume from")
        return run
    if used:
        finished = (run / "model").exists() or (run / "adapter").exists() or (run / "eval.json").exists()
        if not overwrite:
            what = "a finished run" if finished else "files from an earlier run"
            raise UserError(f"output.dir {run} already holds {what}; pass --overwrite to replace it, "
                            f"--resume to continue it, or choose another output.dir")
        shutil.rmtree(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output.dir {run} is not writable: {err.strerror}") from None
    return run


def check_disk(run: Path, n_params: int, keep: int, save_every: int) -> None:
    """Refuse to start when the disk cannot hold the final model and the checkpoints."""
    need = n_params * 4 * (1 + (3 * keep if save_every else 0))  # weights + (weights, 2 Adam moments) per checkpoint
    free = shutil.disk_usage(run).free
    if free < need:
        raise UserError(f"not enough disk space in {run}: about {need / 1e9:.2f} GB needed "
                        f"(model and checkpoints), {free / 1e9:.2f} GB free")


def source_stats(counts: dict, loaded: sources.Loaded) -> dict:
    """A source's data.json counts: cleaning (too_short, too_long, duplicates), skipped records, and
    the reader's text mode and notes."""
    stats = {**counts, "skipped_records": loaded.skipped}
    if loaded.text_mode:
        stats["text_mode"] = loaded.text_mode
    if loaded.notes:
        stats["notes"] = loaded.notes
    return stats


def read_texts(data_cfg, spec: str) -> tuple[list[str], dict]:
    loaded = sources.load_source(spec, sources.SourceOptions.of(data_cfg))
    texts = sources.texts_of(loaded, data_cfg.field, spec)
    texts, stats = clean_all(texts, data_cfg.normalize, data_cfg.whitespace, data_cfg.min_chars,
                             data_cfg.max_chars, data_cfg.dedupe)
    stats = source_stats(stats, loaded)
    for note in loaded.notes:
        log(f"note: {note}")
    if not texts:
        raise UserError(f"{spec}: no usable samples (after cleaning: {stats})")
    return texts, stats


def train_val_texts(data_cfg) -> tuple[list[str], list[str], dict]:
    if getattr(data_cfg, "streaming", False):  # (lr-find, compare and the other tasks read the corpus whole)
        raise UserError("data.streaming is for gpt2tune train with task causal-lm; this reads the whole corpus: "
                        "set data.streaming false")
    texts, stats = read_texts(data_cfg, data_cfg.source)
    if data_cfg.validation:
        val, vstats = read_texts(data_cfg, data_cfg.validation)
        train = texts
        stats["validation_source"] = vstats
    else:
        tr, va = split_indices(len(texts), data_cfg.val_fraction, data_cfg.seed)
        train, val = [texts[i] for i in tr], [texts[i] for i in va]
    if data_cfg.limit:
        train = train[: data_cfg.limit]
    stats.update(train_samples=len(train), validation_samples=len(val))
    return train, val, stats


@dataclass
class Base:
    model: object
    tokenizer: object
    framing: Framing
    source: str  # where the base came from (for model cards / rebuilding)


def load_base(model_cfg, train_texts: list[str], run: Path, resume: bool, max_length: int, seed: int) -> Base:
    """The tokenizer and the model a run starts from."""
    tok_spec = model_cfg.tokenizer
    folder: Optional[Path] = None
    if model_cfg.init == "pretrained" or (model_cfg.name and tok_spec is None):
        if not model_cfg.name:
            raise UserError("model.name is required with model.init: pretrained (a hub id or a folder); "
                            "or set model.init: scratch")
        folder = resolve_model_dir(model_cfg.name, model_cfg.revision)
    if tok_spec == "from-data":
        tok_dir = run / "tokenizer"
        if not (resume and tok_dir.is_dir()):
            if dist.is_main():  # rank 0 builds and saves it; every rank loads the saved one
                build_tokenizer(train_texts, tok_dir, model_cfg.vocab_size)
            dist.barrier()
        tok = load_tokenizer(tok_dir)
    elif tok_spec:
        tok = load_tokenizer(tok_spec)
    elif folder is not None:
        tok = load_tokenizer(folder)
    else:
        raise UserError("model.init: scratch needs model.tokenizer ('from-data' or a tokenizer folder)")
    framing = framing_of(tok)
    if model_cfg.init == "scratch":
        n_pos = model_cfg.n_positions or max(SIZES[model_cfg.size][3], max_length)
        if max_length > n_pos:
            raise UserError(f"data.max_length {max_length} exceeds model.n_positions {n_pos}")
        model = build_scratch(model_cfg.size, len(tok), framing, n_pos, model_cfg.dropout, seed=seed)
        source = f"scratch:{model_cfg.size}"
    else:
        model = load_pretrained(folder, framing, len(tok), model_cfg.dropout)
        if max_length > model.config.n_positions:
            raise UserError(f"data.max_length {max_length} exceeds the model's context of {model.config.n_positions} tokens")
        source = model_cfg.name
    return Base(model, tok, framing, source)


def describe_params(model) -> dict:
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fit_and_save(recipe, run_dir: Path, base: Base, model, data, params: dict, resume: bool, progress: bool,
                 headline: str = "perplexity", note: str = ""):
    """Train, save what the method trained, write eval.json; (model, report, saved folder).

    Returns None on ranks other than 0 of a multi-process run: only rank 0 saves.
    """
    from gpt2tune.method import save_trained
    from gpt2tune.train.loop import Trainer
    from gpt2tune.train.tracking import open_tracking

    tracking = open_tracking(recipe, run_dir, log)  # train.report_to: TensorBoard, MLflow, W&B, Trackio
    trainer = Trainer(model, data, recipe.train, run_dir, progress=progress, log=log, loggers=[tracking.stage()])
    log(f"training {trainer.total_steps} steps on {trainer.device} ({str(trainer.dtype).replace('torch.', '')}){note}")
    result = tracking.fit(trainer, resume=resume)  # trackers closed at the end, or as failed on an error
    if not dist.is_main():
        return None
    model = trainer.model.float().cpu()  # (a plain copy when FSDP had sharded it)
    best = keep_best_model(trainer, model, base.tokenizer, run_dir, recipe.method)
    saved = run_dir / save_trained(model, base.tokenizer, run_dir, recipe.method)
    report = {
        "validation": best["best"]["validation"] if "last" in best else result.final_eval,
        "validation_at_start": result.first_eval,
        "steps": result.steps,
        **best,
        "train_seconds": round(result.seconds, 2),
        "train_tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
        "parameters": params,
    }
    write_json(run_dir / "eval.json", report)
    if report["validation"]:
        first = result.first_eval.get(headline)
        end = report["validation"][headline]
        log(f"validation {headline} {first:.3f} -> {end:.3f}" if first is not None else f"validation {headline} {end:.3f}")
    log(f"saved {saved}")
    return model, report, saved


def keep_best_model(trainer, model, tokenizer, run_dir: Path, method) -> dict:
    """After training: with train.keep_best and a best evaluation before the last step, save the last
    model in RUN/last and load the best one's weights into `model` (what RUN/model then holds).
    The fields eval.json gains: best (step, metric, value, validation), last, stopped_early."""
    from gpt2tune.method import save_trained

    result, out = trainer.result, {}
    if result.best is not None:
        out["best"] = result.best
    if result.stopped_early:
        out["stopped_early"] = True
    if trainer.cfg.keep_best and result.best is not None and result.best["step"] != result.steps:
        last = run_dir / "last"
        shutil.rmtree(last, ignore_errors=True)
        sub = save_trained(model, tokenizer, last, method)
        trainer.restore_best(model)
        out["last"] = {"step": result.steps, "folder": f"last/{sub}", "validation": result.final_eval}
        b = result.best
        log(f"keep_best: {sub} holds the best model (step {b['step']}, validation {b['metric']} {b['value']:.4g}); "
            f"the last one (step {result.steps}) is in {last / sub}")
    return out


def sample_settings(recipe):
    """The decoding settings of the samples written at the end of training (recipe.sample)."""
    from gpt2tune.generate.sampling import Sampling

    sm = recipe.sample
    return Sampling(max_new_tokens=sm.max_new_tokens, top_k=sm.top_k, temperature=sm.temperature,
                    seed=recipe.train.seed, weights=sm.weights)
