"""Task `chat`: fine-tune on conversations with the loss on the assistant's turns only.

Data: records with a `messages` list (chat.field) of {role, content}; JSONL files or
`hf:HuggingFaceH4/ultrachat_200k:train_sft`. The chat template (chat.template) is saved
with the model; `gpt2tune chat RUN` talks to the result.
"""

from __future__ import annotations

from functools import partial

from gpt2tune.chat.masking import encode_conversation
from gpt2tune.chat.messages import conversations_of
from gpt2tune.chat.reply import ChatModel, reply
from gpt2tune.chat.template import install, make_template, save_template
from gpt2tune.errors import UserError
from gpt2tune.recipe import Recipe
from gpt2tune.tasks.cached import tokenizer_of
from gpt2tune.tasks.common import load_base, log, prepare_run_dir, sample_settings, write_json
from gpt2tune.tasks.masked import MaskedTask, Rows, Source, check_batching, report_rows, train_masked
from gpt2tune.train import distributed as dist
from gpt2tune.train.device import pick_device


def chat_task(recipe: Recipe) -> MaskedTask:
    d, c = recipe.data, recipe.chat
    return MaskedTask("chat", c.model_dump(mode="json"),
                      lambda records, spec, check: conversations_of(records, c.field, spec, d.normalize, d.whitespace,
                                                                    check),
                      tokenizer_text,
                      f"{{spec}}: no usable conversations (records need a {c.field!r} list of {{{{role, content}}}} "
                      f"messages)")


def tokenizer_text(conv: list[dict]) -> str:
    """What a tokenizer built from the data learns from: the plain rendering without markers."""
    heads = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
    return "\n".join(heads[m["role"]] + m["content"] for m in conv)


def setup(recipe: Recipe, tok, framing, model=None):
    """The chat template installed in the tokenizer (and the model's embeddings): (template, added
    tokens, encode(conversation, FitStats) -> row)."""
    template = make_template(recipe.chat.template, tok, framing)
    added = install(template, tok, model)
    return template, added, partial(_encode, tok, template, recipe.data.max_length)


def _encode(tok, template, max_length: int, conv: list[dict], st):
    return encode_conversation(tok, template, conv, max_length, st)


def prepare(recipe: Recipe, progress: bool = True) -> Rows:
    """The cached rows of a chat recipe, built when missing (gpt2tune data prepare)."""
    from gpt2tune.model.tokenizer import framing_of

    tok = tokenizer_of(recipe.model)
    return Source(recipe, chat_task(recipe)).rows(tok, setup(recipe, tok, framing_of(tok))[2], progress)


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    check_batching(recipe)
    if recipe.chat.template == "special" and recipe.method.name not in ("full", "partial"):
        raise UserError(f"chat.template: special adds tokens whose embeddings must train; method "
                        f"{recipe.method.name} freezes them: use chat.template: plain, or method full/partial")
    dist.init(pick_device(recipe.train.device).type)
    run_dir = prepare_run_dir(recipe.output.dir, resume, overwrite)
    d = recipe.data
    source = Source(recipe, chat_task(recipe))
    base = load_base(recipe.model, source.tokenizer_texts(), run_dir, resume, d.max_length, recipe.train.seed)
    template, added, encode = setup(recipe, base.tokenizer, base.framing, base.model)
    if added:
        log(f"added {added} chat tokens to the vocabulary ({', '.join(template.added_tokens)}); embeddings resized")
        if recipe.method.name == "partial" and not base.model.get_input_embeddings().weight.requires_grad:
            log("warning: method partial without 'embeddings' leaves the new chat tokens' embeddings untrained")

    rows = source.rows(base.tokenizer, encode, progress)
    stats = {**report_rows(rows, "conversations", "malformed records", d.max_length),
             "chat_template": template.name, "added_tokens": added}
    train_rows, val_rows = rows.train, rows.val

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
