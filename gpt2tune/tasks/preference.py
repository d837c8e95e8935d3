"""Task `preference`: tune a model on preference pairs (prompt, chosen, rejected) with DPO or ORPO.

Data: JSONL (or any record source) `{"prompt", "chosen", "rejected"}` as strings, or the chat-messages
form of TRL / UltraFeedback (chosen and rejected message lists; the prompt is their shared prefix).
Log-probs and losses count response tokens only (gpt2tune/train/preference.py).

DPO's reference is the model before training:
- methods that add weights (LoRA, IA3, prompt/prefix tuning, adapters): the same model with its
  adapter switched off (peft's `disable_adapter()`, or the bottleneck adapters detached), computed
  next to every training batch: no second copy of the model;
- full / partial fine-tuning: the reference log-probs of every pair are computed in one pass before
  training (`preference.reference: precompute`), so no frozen copy is held during training either
  (half the weight memory, and one forward per pair instead of one per step and pair).
ORPO needs no reference.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

import torch

from gpt2tune.chat.preference import encode_pairs
from gpt2tune.chat.template import install, make_template, marker_text, save_template
from gpt2tune.data.preference import collate_pairs, flat_text, items_of
from gpt2tune.errors import UserError
from gpt2tune.method import apply_method, save_trained
from gpt2tune.recipe import Recipe, dump_recipe
from gpt2tune.tasks.common import (check_disk, describe_params, keep_best_model, load_base, log, prepare_run_dir,
                                   write_json)
from gpt2tune.tasks.masked import check_batching, load_records, split_items
from gpt2tune.train import distributed as dist
from gpt2tune.train.device import autocast, pick_device, pick_precision
from gpt2tune.train.loop import Data, Trainer
from gpt2tune.train.preference import PreferenceLoss, reference_logps
from gpt2tune.train.tracking import open_tracking



def _own_tensors(name: str) -> bool:
    """Whether method `name` trains added tensors (which can be switched off), not the base's weights."""
    from gpt2tune.method import method

    return method(name).own_tensors


def read_items(recipe: Recipe, spec: str):
    d = recipe.data
    loaded = load_records(d, spec)
    items, skipped = items_of(loaded.records, spec, d.normalize, d.whitespace)
    return items, skipped + loaded.skipped


@contextlib.contextmanager
def adapters_off(model):
    """`model` computing as its base: a peft adapter disabled, or the bottleneck adapters detached."""
    from gpt2tune.method.adapter import Bottleneck
    from gpt2tune.method.via_peft import is_peft, unwrap

    if is_peft(model):
        with unwrap(model).disable_adapter():
            yield
        return
    held = [(m, m._modules["adapter"]) for m in model.modules() if isinstance(m._modules.get("adapter"), Bottleneck)]
    for m, _ in held:
        m._modules["adapter"] = None  # the projection's hook then passes its output through
    try:
        yield
    finally:
        for m, a in held:
            m._modules["adapter"] = a


def reference_mode(recipe: Recipe) -> str:
    p, name = recipe.preference, recipe.method.name
    if p.loss != "dpo":
        return "none"
    if p.reference == "adapter" and not _own_tensors(name):
        raise UserError(f"preference.reference: adapter needs a method that adds weights (lora, ia3, adapter, ...); "
                        f"method {name} changes the model's own weights: use precompute (or auto)")
    if p.reference == "auto":
        return "precompute" if not _own_tensors(name) else "adapter"
    return p.reference


def precompute_reference(model, rows: list, pad: int, recipe: Recipe, switch_off: bool) -> float:
    """Store the reference log-probs in every pair (one pass, before training); the seconds it took."""
    t = recipe.train
    device = dist.rank_device(pick_device(t.device))
    dtype = pick_precision(t.precision, device)
    model.to(device)
    t0 = time.perf_counter()
    bs = max(t.batch_size, 8)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # little padding
    batches = [collate_pairs([rows[i] for i in order[k:k + bs]], pad) for k in range(0, len(order), bs)]
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    with adapters_off(model) if switch_off else contextlib.nullcontext():
        refs = reference_logps(model, batches, to_device, lambda: autocast(device, dtype))
    for i, ref in zip(order, refs):
        rows[i].ref = ref
    return time.perf_counter() - t0


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    check_batching(recipe)
    p, d, t = recipe.preference, recipe.data, recipe.train
    if p.loss == "orpo" and p.rpo_alpha:
        raise UserError("preference.rpo_alpha adds the chosen responses' NLL to dpo; orpo has that term already "
                        "(preference.orpo_nll)")
    ref_mode = reference_mode(recipe)
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    items, skipped = read_items(recipe, d.source)
    val_items = None
    if d.validation:
        val_items, vskipped = read_items(recipe, d.validation)
        skipped += vskipped
    if not items:
        raise UserError(f"{d.source}: no usable preference pairs (records need prompt, chosen and rejected, "
                        f"with chosen different from rejected)")
    if skipped:
        log(f"note: skipped {skipped} records (chosen equal to rejected, or empty)")
    train, val = split_items(d, items, val_items)

    texts = [flat_text(it.prompt) + flat_text(it.chosen) + "\n" + flat_text(it.rejected) for it in train]
    base = load_base(recipe.model, texts, run_dir, resume, d.max_length, t.seed)
    chat = any(it.chat for it in train + val)
    template = None
    if chat:
        template = make_template(recipe.chat.template, base.tokenizer, base.framing)
        if install(template, base.tokenizer, base.model) and _own_tensors(recipe.method.name):
            raise UserError(f"chat.template: special adds tokens whose embeddings must train; method "
                            f"{recipe.method.name} freezes them: use chat.template: plain, or method full/partial")
    bos, eos = marker_text(base.tokenizer, base.framing.bos), marker_text(base.tokenizer, base.framing.eos)
    train_rows, st = encode_pairs(base.tokenizer, train, template, bos, eos, d.max_length)
    val_rows, vst = encode_pairs(base.tokenizer, val, template, bos, eos, d.max_length)
    for what, s in (("training", st), ("validation", vst)):
        if s.prompt_cut or s.response_cut:
            log(f"note: {s.prompt_cut + s.response_cut} {what} pairs were longer than data.max_length={d.max_length}: "
                f"{s.prompt_cut} prompts cut at the start, {s.response_cut} responses cut at the end")
        if s.skipped:
            log(f"warning: skipped {s.skipped} {what} pairs with nothing left to compare after fitting")
    if not train_rows:
        raise UserError("no training pairs left for task preference (see the warnings above)")

    model = apply_method(base.model, recipe.method, tokenizer=base.tokenizer, seed=t.seed)
    if p.disable_dropout:  # the model's and the method's own (LoRA dropout), as TRL does; the saved config keeps its own
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    params = describe_params(model)
    log(f"model {base.source}: {params['total']:,} parameters, {params['trainable']:,} trainable "
        f"({params['percent']:.2f}%); {len(train_rows):,} training pairs, {len(val_rows):,} validation; "
        f"{p.loss.upper()} (beta {p.beta:g})" + (f", reference: {ref_mode}" if ref_mode != "none" else ""))
    ref_seconds = 0.0
    if ref_mode == "precompute":  # before any step (on --resume too: the checkpoint loads in fit)
        ref_seconds = precompute_reference(model, train_rows + val_rows, base.framing.pad, recipe,
                                           switch_off=_own_tensors(recipe.method.name))
        log(f"reference log-probs of {len(train_rows) + len(val_rows):,} pairs computed in {ref_seconds:.1f}s")
    check_disk(run_dir, params["total"], t.keep_checkpoints, t.save_every)
    stats = {"skipped_records": skipped, "train_pairs": len(train_rows), "validation_pairs": len(val_rows),
             "form": "messages" if chat else "text", "train_fit": st.as_dict(), "validation_fit": vst.as_dict(),
             "reference": ref_mode}
    if dist.is_main():
        dump_recipe(recipe, run_dir / "recipe.yaml")
        write_json(run_dir / "data.json", stats)
    if t.fast:
        log("note: train.fast applies to causal language modelling; preference pairs train through the "
            "Hugging Face forward")

    loss = PreferenceLoss(p.loss, p.beta, adapters_off if ref_mode == "adapter" else None, p.orpo_nll, p.rpo_alpha)
    pad = base.framing.pad
    data = Data(train_rows, val_rows, pad, d.batching, d.max_length, collate=partial(collate_pairs, pad_id=pad),
                rows_per_sample=2)  # a pair is two rows (chosen, rejected)
    tracking = open_tracking(recipe, run_dir, log)
    trainer = Trainer(model, data, t, run_dir, loss_fn=loss, log=log, progress=progress,
                      loggers=[tracking.stage()], eval_fn=loss.evaluate)
    log(f"training {trainer.total_steps} steps on {trainer.device} ({str(trainer.dtype).replace('torch.', '')}); "
        f"loss on responses only")
    result = tracking.fit(trainer, resume=resume)
    if not dist.is_main():
        return {}
    model = trainer.model.float().cpu()
    best = keep_best_model(trainer, model, base.tokenizer, run_dir, recipe.method)
    saved = run_dir / save_trained(model, base.tokenizer, run_dir, recipe.method)
    if template is not None:
        save_template(template, run_dir, jinja=False)
        for folder in (saved, run_dir / "tokenizer"):
            if (folder / "tokenizer_config.json").is_file():
                save_template(template, folder)
    report = {
        "validation": best["best"]["validation"] if "last" in best else result.final_eval,
        "validation_at_start": result.first_eval,
        "steps": result.steps,
        **best,
        "train_seconds": round(result.seconds, 2),
        "reference_seconds": round(ref_seconds, 2),
        "train_tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
        "parameters": params,
        "loss": p.loss,
        "beta": p.beta,
    }
    write_json(run_dir / "eval.json", report)
    first, end = result.first_eval, report["validation"]
    if end:
        log(f"validation reward accuracy {first.get('reward_accuracy', float('nan')):.3f} -> {end['reward_accuracy']:.3f}, "
            f"margin {first.get('reward_margin', float('nan')):+.4f} -> {end['reward_margin']:+.4f}, "
            f"loss {first.get('loss', float('nan')):.4f} -> {end['loss']:.4f}")
    log(f"saved {saved}")
    return report
