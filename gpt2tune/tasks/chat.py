"""Task `chat`: fine-tune on conversations with the loss on the assistant's turns only.

Data: records with a `messages` list (chat.field) of {role, content}; JSONL files or
`hf:HuggingFaceH4/ultrachat_200k:train_sft`. The chat template (chat.template) is saved
with the model; `gpt2tune chat RUN` talks to the result.
"""

from __future__ import annotations

from gpt2tune.chat.masking import encode_conversations
from gpt2tune.chat.messages import conversations_of
from gpt2tune.chat.reply import ChatModel, reply
from gpt2tune.chat.template import install, make_template, save_template
from gpt2tune.errors import UserError
from gpt2tune.recipe import Recipe
from gpt2tune.tasks.common import load_base, log, prepare_run_dir, sample_settings, write_json
from gpt2tune.tasks.masked import check_batching, load_records, report_fit, split_items, train_masked


def read_conversations(recipe: Recipe, spec: str) -> tuple[list[list[dict]], int]:
    d = recipe.data
    loaded = load_records(d, spec)
    convs, bad = conversations_of(loaded.records, recipe.chat.field, spec, d.normalize, d.whitespace)
    return convs, bad + loaded.skipped


def tokenizer_text(conv: list[dict]) -> str:
    """What a tokenizer built from the data learns from: the plain rendering without markers."""
    heads = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
    return "\n".join(heads[m["role"]] + m["content"] for m in conv)


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    check_batching(recipe)
    if recipe.chat.template == "special" and recipe.method.name not in ("full", "partial"):
        raise UserError(f"chat.template: special adds tokens whose embeddings must train; method "
                        f"{recipe.method.name} freezes them: use chat.template: plain, or method full/partial")
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    d = recipe.data
    convs, skipped = read_conversations(recipe, d.source)
    val_convs = None
    if d.validation:
        val_convs, vskipped = read_conversations(recipe, d.validation)
        skipped += vskipped
    if not convs:
        raise UserError(f"{d.source}: no usable conversations (records need a {recipe.chat.field!r} list of "
                        f"{{role, content}} messages)")
    if skipped:
        log(f"note: skipped {skipped} malformed records")
    train, val = split_items(d, convs, val_convs)

    base = load_base(recipe.model, [tokenizer_text(c) for c in train], run_dir, resume, d.max_length,
                     recipe.train.seed)
    template = make_template(recipe.chat.template, base.tokenizer, base.framing)
    added = install(template, base.tokenizer, base.model)
    if added:
        log(f"added {added} chat tokens to the vocabulary ({', '.join(template.added_tokens)}); embeddings resized")
        if recipe.method.name == "partial" and not base.model.get_input_embeddings().weight.requires_grad:
            log("warning: method partial without 'embeddings' leaves the new chat tokens' embeddings untrained")

    train_rows, st = encode_conversations(base.tokenizer, template, train, d.max_length)
    val_rows, vst = encode_conversations(base.tokenizer, template, val, d.max_length)
    report_fit("training conversations", st, d.max_length)
    report_fit("validation conversations", vst, d.max_length)
    stats = {"skipped_records": skipped, "train_samples": len(train_rows), "validation_samples": len(val_rows),
             "chat_template": template.name, "added_tokens": added, "train_fit": st.as_dict(),
             "validation_fit": vst.as_dict(), "trained_tokens": st.trained_tokens}

    done = train_masked(recipe, run_dir, base, train_rows, val_rows, stats, resume, progress)
    if done is None:  # not rank 0 of a multi-process run
        return {}
    model, report, saved = done
    save_template(template, run_dir, jinja=False)  # chat.json: the run folder answers for its model
    for folder in (saved, run_dir / "tokenizer"):
        if (folder / "tokenizer_config.json").is_file():
            save_template(template, folder)

    if recipe.sample.prompts:
        chat = ChatModel(model, base.tokenizer, base.framing, template)
        s = sample_settings(recipe)
        samples = [{"prompt": p, "text": reply(chat, [{"role": "user", "content": p}], s)}
                   for p in recipe.sample.prompts]
        write_json(run_dir / "samples.json", samples)
    return report
