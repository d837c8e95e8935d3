"""Chat and completion rows through the corpus cache: streamed, encoded on several processes into
memory-mapped ids and loss masks, equal row for row to the rows encoded in memory, reused while
nothing changes, and trained on exactly as the in-memory rows are."""

import json
import random

import pytest

from conftest import GPT2_BPE, need, write_recipe

CHAT = """
task: chat
chat: {{template: {template}}}
model: {{init: scratch, size: nano, tokenizer: {tok}, n_positions: 64, dropout: 0.0}}
data: {{source: "jsonl:{src}", {validation} val_fraction: 0.25, max_length: 40, {limit} cache: {cache},
        cache_dir: "{cache_dir}", num_proc: {procs}}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 4, max_steps: 6, log_every: 1, seed: 1, num_threads: 1}}
output: {{dir: "{out}"}}
"""

COMPLETION = """
task: completion
completion: {{template: "{{document}}\\nTL;DR: {{title}}"}}
model: {{init: scratch, size: nano, tokenizer: {tok}, n_positions: 64, dropout: 0.0}}
data: {{source: "jsonl:{src}", {validation} val_fraction: 0.25, max_length: 40, {limit} cache: {cache},
        cache_dir: "{cache_dir}", num_proc: {procs}}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 4, max_steps: 6, log_every: 1, seed: 1, num_threads: 1}}
output: {{dir: "{out}"}}
"""

WORDS = "the a sum of two numbers is found by adding them together once upon time there was".split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(n: int, seed: int) -> list:
    """Chats of every kind the fitting handles: short, long (earliest turns dropped, prompts or answers
    cut), without an answer, malformed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.random()
        if k < 0.05:
            out.append({"other": "no messages"})
            continue
        if k < 0.1:
            out.append({"messages": [{"role": "narrator", "content": "bad role"}]})
            continue
        msgs = [{"role": "system", "content": "You add."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 2, 4])):
            msgs += [{"role": "user", "content": _text(rng, rng.choice([2, 5, 30]))},
                     {"role": "assistant", "content": _text(rng, rng.choice([1, 3, 45]))}]
        if k < 0.15:
            msgs = msgs[:1] if msgs[0]["role"] == "user" else msgs[:2]  # no assistant turn
        out.append({"messages": msgs})
    return out


def documents(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rec = {"document": _text(rng, rng.choice([3, 10, 60])), "title": _text(rng, rng.choice([1, 4, 50]))}
        if rng.random() < 0.08:
            rec["title"] = " "
        out.append(rec)
    return out


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def recipe_of(tmp_path, task, name, cache=True, validation=False, limit=0, procs=2, template="plain", src=None):
    from gpt2tune.recipe import load_recipe

    make = conversations if task == "chat" else documents
    src = src or jsonl(tmp_path / f"{task}.jsonl", make(170, 0))
    val = f'validation: "jsonl:{jsonl(tmp_path / f"{task}-val.jsonl", make(30, 1))}",' if validation else ""
    text = (CHAT if task == "chat" else COMPLETION).format(
        template=template, tok=GPT2_BPE, src=src, validation=val, limit=f"limit: {limit}," if limit else "", cache=str(cache).lower(),
        cache_dir=tmp_path / "cache", procs=procs, out=tmp_path / name)
    path = write_recipe(tmp_path / f"{name}.yaml", text)
    return path, load_recipe(path)


def rows_of(recipe):
    """The recipe's rows as its task builds them (the template installed in a fresh tokenizer)."""
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer
    from gpt2tune.tasks import chat, completion

    tok = load_tokenizer(GPT2_BPE)
    fr = framing_of(tok)
    if recipe.task == "chat":
        return chat.Source(recipe, chat.chat_task(recipe)).rows(tok, chat.setup(recipe, tok, fr)[2], progress=False)
    from gpt2tune.chat.prompt import parse_template

    pt = parse_template(recipe.completion.template)
    src = completion.Source(recipe, completion.completion_task(recipe, pt))
    return src.rows(tok, completion.setup(pt, tok, fr, recipe.data.max_length), progress=False)


def plain(rows):
    return [(list(r.ids), list(r.labels)) for r in rows]


@pytest.mark.parametrize("task,validation,limit,template", [
    ("chat", False, 0, "plain"), ("chat", True, 60, "special"), ("completion", False, 50, "plain"),
    ("completion", True, 0, "plain")])
def test_cached_rows_equal_the_rows_encoded_in_memory(tmp_path, monkeypatch, task, validation, limit, template):
    need(GPT2_BPE)
    from gpt2tune.chat.masking import MaskedStore
    from gpt2tune.data import corpus

    monkeypatch.setattr(corpus, "ROW_CHUNK", 7)  # many chunks, a split inside several of them, on 2 workers
    _, mem = recipe_of(tmp_path, task, "mem", cache=False, validation=validation, limit=limit, template=template)
    _, cac = recipe_of(tmp_path, task, "cac", validation=validation, limit=limit, template=template)
    want, got = rows_of(mem), rows_of(cac)
    assert isinstance(got.train, MaskedStore) and isinstance(got.val, MaskedStore) and not got.cache["hit"]
    assert plain(got.train) == plain(want.train) and plain(got.val) == plain(want.val)
    assert len(want.train) > 20 and len(want.val) > 5
    assert got.train_fit.as_dict() == want.train_fit.as_dict() and got.val_fit.as_dict() == want.val_fit.as_dict()
    assert got.skipped == want.skipped > 0
    fit = want.train_fit
    assert (fit.dropped_turns or fit.prompt_cut) and fit.answer_cut and fit.skipped  # the data exercises the fitting
    again = rows_of(cac)
    assert again.cache == {**got.cache, "hit": True} and plain(again.train) == plain(want.train)


def test_entry_key_follows_the_template_the_settings_and_the_file(tmp_path):
    need(GPT2_BPE)
    _, r = recipe_of(tmp_path, "chat", "a")
    first = rows_of(r).cache["entry"]
    _, special = recipe_of(tmp_path, "chat", "b", template="special")
    assert rows_of(special).cache["entry"] != first  # added tokens, another template: other rows
    from gpt2tune.recipe import load_recipe

    path, _ = recipe_of(tmp_path, "chat", "c")
    shorter = load_recipe(path, ["data.max_length=32"])
    assert rows_of(shorter).cache["entry"] != first
    path_c, comp = recipe_of(tmp_path, "completion", "d")
    other = load_recipe(path_c, ['completion.template={document} Summary: {title}'])
    assert rows_of(comp).cache["entry"] != rows_of(other).cache["entry"]  # the task's settings are in the key
    src = tmp_path / "chat.jsonl"
    src.write_text(src.read_text(encoding="utf-8") + json.dumps({"messages": [
        {"role": "user", "content": "one more"}, {"role": "assistant", "content": "answer"}]}) + "\n", encoding="utf-8")
    again = rows_of(load_recipe(path))
    assert again.cache["entry"] != first and not again.cache["hit"]


def test_training_from_the_cache_equals_training_in_memory(tmp_path, run_cli):
    """`data prepare` builds the entry; a run then reads it (cache hit) and trains exactly as a run
    that encodes in memory: the same loss at every step."""
    need(GPT2_BPE)
    cached_recipe, _ = recipe_of(tmp_path, "chat", "cached", procs=2)
    mem_recipe, _ = recipe_of(tmp_path, "chat", "memory", cache=False)
    code, out, err = run_cli("data", "prepare", cached_recipe, "--json", "--no-progress")
    assert code == 0, err
    info = json.loads(out)
    assert info["built"] and info["train_documents"] > 20 and info["trained_tokens"] > 0
    for recipe in (cached_recipe, mem_recipe):
        code, _, err = run_cli("train", recipe, "--no-progress")
        assert code == 0, err
    data = json.loads((tmp_path / "cached" / "data.json").read_text())
    assert data["cache"] == {"entry": info["entry"], "hit": True}
    mem = json.loads((tmp_path / "memory" / "data.json").read_text())
    assert {k: v for k, v in data.items() if k != "cache"} == mem

    def losses(run):
        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]

    assert len(losses("cached")) >= 6 and losses("cached") == losses("memory")
