"""Task `chat`: chat templates, assistant-only loss masks, truncation by whole turns, the saved
Jinja template in plain transformers, a tiny model that learns to add, and `gpt2tune chat`
driven as a terminal program."""

import json
import os
import random
import shutil
import sys

import pytest
import torch

from conftest import write_recipe
from gpt2tune.chat.history import fit_messages
from gpt2tune.chat.masking import FitStats, encode_conversation, encode_segments
from gpt2tune.chat.template import install, make_template
from gpt2tune.data.dataset import IGNORE
from gpt2tune.errors import UserError

CONV = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "add 4 and 4, then tell me a story"},
    {"role": "assistant", "content": "8. Once upon a time\nthere was a sum."},
]

# ------------------------------------------------------------------ synthetic data

PAIRS = [(a, b) for a in range(10) for b in range(10)]
# held-out prompts: pairs never seen in training (their mirror image is)
HELD = [(a, b) for a, b in random.Random(0).sample(PAIRS, 100) if a < b][:15]
TRAIN_PAIRS = [p for p in PAIRS if p not in HELD]


def addition_conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You add numbers."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3])):
            a, b = rng.choice(TRAIN_PAIRS)
            msgs += [{"role": "user", "content": f"add {a} and {b}"}, {"role": "assistant", "content": str(a + b)}]
            if rng.random() < 0.3:  # "again" repeats the previous answer: only solvable with the history
                msgs += [{"role": "user", "content": "again"}, {"role": "assistant", "content": str(a + b)}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


RECIPE = """
task: chat
chat: {{template: {template}}}
model: {{init: scratch, size: nano, tokenizer: from-data, vocab_size: 300, n_positions: 128, dropout: 0.0}}
data: {{source: "jsonl:{src}", val_fraction: 0.1, max_length: {max_length}}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 16, max_steps: {steps}, log_every: 50, seed: 1, warmup_steps: 20,
         num_threads: 1}}
sample: {{prompts: ["add 2 and 3"], max_new_tokens: 4}}
output: {{dir: "{out}"}}
"""


@pytest.fixture(scope="session")
def addition_run(tmp_path_factory):
    """A nano GPT-2 trained from scratch on 600 addition chats (about 25 s on one thread)."""
    from gpt2tune.cli import main

    d = tmp_path_factory.mktemp("addition")
    src = write_jsonl(d / "add.jsonl", addition_conversations(600, 0))
    recipe = write_recipe(d / "chat.yaml", RECIPE.format(template="plain", src=src, max_length=96, steps=800,
                                                         out=d / "run"))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    return d / "run"


def _tokenizer(tmp_path, texts=None):
    from gpt2tune.model.tokenizer import build_tokenizer

    texts = texts or [m["content"] for m in CONV] * 20 + ["User: Assistant: System:"] * 20
    return build_tokenizer(texts, tmp_path / "tok", 400)


# ------------------------------------------------------------------ templates and masks


def _runs(labels):
    """Maximal runs of equal maskedness: [(trained, start, end)]."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            out.append((labels[start] != IGNORE, start, i))
            start = i
    return out


@pytest.mark.parametrize("name", ["plain", "special"])
def test_label_mask_covers_exactly_the_assistant_spans(tmp_path, name):
    from gpt2tune.model.tokenizer import framing_of

    tok = _tokenizer(tmp_path)
    fr = framing_of(tok)
    t = make_template(name, tok, fr)
    before = len(tok)
    assert install(t, tok) == (4 if name == "special" else 0) == len(tok) - before
    text = t.render(CONV)
    row = encode_segments(tok, t.segments(CONV))
    # the ids are exactly those of the rendered string
    assert row.ids == tok(text, add_special_tokens=False)["input_ids"]
    assert all(l == IGNORE or l == i for i, l in zip(row.ids, row.labels))
    # token by token: trained tokens are exactly the answers and their end marker
    answers = [m["content"] for m in CONV if m["role"] == "assistant"]
    end = "<|endoftext|>" if name == "plain" else "<|end|>"
    lead = " " if name == "plain" else ""
    trained = [tok.decode(row.ids[a:b]) for on, a, b in _runs(row.labels) if on]
    assert trained == [lead + a + end for a in answers]
    untrained = "".join(tok.decode(row.ids[a:b]) for on, a, b in _runs(row.labels) if not on)
    assert "add 2 and 3" in untrained and "You add numbers." in untrained and "5" not in untrained
    # plain transformers' own assistant mask (from the {% generation %} blocks) agrees token by token
    enc = tok.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(enc["input_ids"]) == row.ids
    assert [bool(m) for m in enc["assistant_masks"]] == [l != IGNORE for l in row.labels]
    if name == "special":
        assert "<|assistant|>" in tok.all_special_tokens


@pytest.mark.parametrize("name", ["plain", "special"])
def test_masks_with_a_chinese_character_vocabulary(zh_tokenizer_dir, name):
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer

    tok = load_tokenizer(zh_tokenizer_dir)
    fr = framing_of(tok)
    t = make_template(name, tok, fr)
    install(t, tok)
    conv = [{"role": "user", "content": "白日依山盡"}, {"role": "assistant", "content": "黃河入海流"},
            {"role": "user", "content": "床前"}, {"role": "assistant", "content": "明月光"}]
    row = encode_segments(tok, t.segments(conv))
    end = "[SEP]" if name == "plain" else "<|end|>"
    assert tok.convert_ids_to_tokens([i for i, l in zip(row.ids, row.labels) if l != IGNORE]) == \
        list("黃河入海流") + [end] + list("明月光") + [end]
    assert t.render(conv).startswith("[CLS]") and ("Assistant: 黃河入海流[SEP]" in t.render(conv)) == (name == "plain")
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(enc["input_ids"]) == row.ids
    assert [bool(m) for m in enc["assistant_masks"]] == [l != IGNORE for l in row.labels]


def test_plain_template_is_the_documented_format(tmp_path):
    from gpt2tune.model.tokenizer import framing_of

    tok = _tokenizer(tmp_path)
    t = make_template("plain", tok, framing_of(tok))
    assert t.render(CONV[:3], add_generation_prompt=False) == (
        "<|endoftext|>System: You add numbers.\nUser: add 2 and 3\nAssistant: 5<|endoftext|>\n")
    assert t.render(CONV[:2], add_generation_prompt=True).endswith("User: add 2 and 3\nAssistant:")


def test_truncation_drops_whole_earliest_turns_and_keeps_the_last_answer(tmp_path):
    from gpt2tune.model.tokenizer import framing_of

    tok = _tokenizer(tmp_path)
    t = make_template("plain", tok, framing_of(tok))
    conv = [{"role": "system", "content": "You add numbers."}]
    for k in range(12):
        conv += [{"role": "user", "content": f"turn {k}: add {k} and {k}"}, {"role": "assistant", "content": f"{2 * k} ok"}]
    full = encode_segments(tok, t.segments(conv))
    st = FitStats()
    row = encode_conversation(tok, t, conv, len(full) // 3, st)
    assert row is not None and len(row) <= len(full) // 3
    text = tok.decode(row.ids)
    assert text.startswith("<|endoftext|>System: You add numbers.\nUser: turn ")  # system kept, whole turns
    assert text.endswith("Assistant: 22 ok<|endoftext|>\n")  # the last answer is whole
    assert "turn 0:" not in text and "turn 11: add 11 and 11" in text
    assert st.dropped_turns > 0 and st.dropped_turns % 2 == 0 and st.shortened == 1
    trained = [tok.decode(row.ids[a:b]) for on, a, b in _runs(row.labels) if on]
    assert trained[-1] == " 22 ok<|endoftext|>" and all(x.endswith("ok<|endoftext|>") for x in trained)

    # one exchange too long: the question loses its start, the answer stays whole
    long_q = [{"role": "user", "content": "add " + "and " * 80 + "2 and 3"}, {"role": "assistant", "content": "5"}]
    st = FitStats()
    row = encode_conversation(tok, t, long_q, 24, st)
    assert len(row) == 24 and tok.decode(row.ids).endswith("2 and 3\nAssistant: 5<|endoftext|>\n")
    assert row.ids[0] == tok.convert_tokens_to_ids("<|endoftext|>") and st.prompt_cut == 1

    # nothing trainable: no assistant turn / answer entirely beyond max_length
    st = FitStats()
    assert encode_conversation(tok, t, [{"role": "user", "content": "hello"}], 64, st) is None
    assert st.skipped_no_answer == 1


def test_fit_messages_keeps_system_and_latest_turns():
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": str(i)} for i in range(10) for r in ("user", "assistant")] + [{"role": "user", "content": "q"}]
    kept, dropped = fit_messages(msgs, lambda ms: len(ms) <= 6)
    assert kept == [msgs[0]] + msgs[17:] and dropped == 16  # system + (user 8, answer 8, user 9, answer 9, q)
    assert fit_messages(msgs, lambda ms: len(ms) <= 1) == ([msgs[-1]], len(msgs) - 1)  # the system goes last
    assert fit_messages(msgs, lambda ms: False) == (None, 0)


def test_new_chat_tokens_get_embeddings_that_train(tmp_path):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import framing_of
    from gpt2tune.train.objective import lm_loss
    from gpt2tune.chat.masking import collate_masked

    tok = _tokenizer(tmp_path)
    fr = framing_of(tok)
    model = build_scratch("nano", len(tok), fr, n_positions=128, seed=0)
    t = make_template("special", tok, fr)
    assert install(t, tok, model) == 4
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.get_output_embeddings().weight.shape[0]
    row = encode_segments(tok, t.segments(CONV))
    loss, n, _ = lm_loss(model, collate_masked([row], fr.pad))
    loss.backward()
    grad = model.get_input_embeddings().weight.grad
    for s in ("<|user|>", "<|assistant|>", "<|end|>"):
        assert grad[tok.convert_tokens_to_ids(s)].abs().sum() > 0, s


# ------------------------------------------------------------------ trained model


def test_saved_template_renders_the_same_string_in_plain_transformers(addition_run):
    from transformers import AutoTokenizer

    from gpt2tune.chat.template import load_template

    cfg = json.loads((addition_run / "model" / "tokenizer_config.json").read_text())
    assert "{%- generation -%}" in cfg["chat_template"] and "endgeneration" in cfg["chat_template"]
    plain = AutoTokenizer.from_pretrained(str(addition_run / "model"))
    ours = load_template(addition_run / "model")
    for conv in (CONV, CONV[:2], [{"role": "user", "content": "add 1 and 1"}]):
        for gen in (False, True):
            assert plain.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == ours.render(conv, gen)
    enc = plain.apply_chat_template(CONV, tokenize=True, return_dict=True)
    assert list(enc["input_ids"]) == encode_segments(plain, ours.segments(CONV)).ids
    data = json.loads((addition_run / "data.json").read_text())
    assert data["train_fit"]["skipped_no_answer"] == 0 and data["chat_template"] == "plain"


def test_tiny_model_adds_held_out_pairs_better_than_chance(addition_run):
    from gpt2tune.chat.reply import load_chat_model, reply
    from gpt2tune.generate.sampling import Sampling

    torch.set_num_threads(1)
    chat = load_chat_model(addition_run)
    s = Sampling(max_new_tokens=4, greedy=True)
    answers = [reply(chat, [{"role": "user", "content": f"add {a} and {b}"}], s) for a, b in HELD]
    correct = sum(ans == str(a + b) for ans, (a, b) in zip(answers, HELD))
    # 19 possible sums: chance is 1/19 (0.8 of 15); a model that learned nothing gets ~0
    print(f"held-out accuracy {correct}/{len(HELD)}: {answers}")
    assert correct >= 5, answers  # seeds tried: 9-12 of 15
    ev = json.loads((addition_run / "eval.json").read_text())
    assert ev["validation"]["loss"] < ev["validation_at_start"]["loss"] / 3


def test_history_is_kept_within_the_context_window(addition_run):
    from gpt2tune.chat.reply import Reply, load_chat_model, prompt_ids
    from gpt2tune.generate.sampling import Sampling

    chat = load_chat_model(addition_run)
    assert chat.n_positions == 128
    msgs = [{"role": "system", "content": "You add numbers."}]
    for k in range(30):
        msgs += [{"role": "user", "content": f"add {k % 10} and 1"}, {"role": "assistant", "content": str(k % 10 + 1)}]
    msgs.append({"role": "user", "content": "add 3 and 4"})
    ids, kept, dropped = prompt_ids(chat, msgs, max_new_tokens=8)
    assert len(ids) <= 120 and dropped > 0 and kept[0]["role"] == "system" and kept[-1] == msgs[-1]
    assert kept[1]["role"] == "user" and kept[1:] == msgs[len(msgs) - len(kept) + 1:]
    r = Reply(chat, msgs, Sampling(max_new_tokens=8, greedy=True))
    assert "".join(r) == r.text and r.finish_reason in ("stop", "length") and r.dropped == dropped
    with pytest.raises(UserError, match="too long"):
        prompt_ids(chat, [{"role": "user", "content": "add " * 200}], max_new_tokens=8)


def test_chat_one_shot_and_errors(addition_run, run_cli, tmp_path):
    code, out, err = run_cli("chat", addition_run, "--message", "add 4 and 4", "--greedy", "--max-new-tokens", "4",
                             "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["reply"].isdigit() and res["finish_reason"] == "stop" and res["prompt_tokens"] > 5
    code, out, err = run_cli("chat", addition_run, "-m", "add 4 and 4", "--greedy", "--max-new-tokens", "4")
    assert code == 0 and out.strip() == res["reply"]
    # a model folder without chat.json is not a chat model
    plain = tmp_path / "plain"
    shutil.copytree(addition_run / "model", plain)
    (plain / "chat.json").unlink()
    code, out, err = run_cli("chat", plain, "-m", "hi")
    assert code == 2 and "not a chat model" in err
    code, out, err = run_cli("chat", addition_run, "-m", "hi", "--temperature", "0")
    assert code == 2 and "--temperature" in err


def test_chat_terminal_answers_keeps_history_resets_and_exits(addition_run):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb")
    c = pexpect.spawn(sys.executable, ["-m", "gpt2tune", "chat", str(addition_run), "--greedy", "--max-new-tokens", "4"],
                      env=env, encoding="utf-8", timeout=60)
    try:
        def say(text: str) -> str:
            c.expect_exact("you> ")
            c.sendline(text)
            c.expect(r"bot> (.*?)\r\n")
            return c.match.group(1).strip()

        first = say("add 4 and 4")
        assert first.isdigit()  # answers (streamed) with a number
        assert say("again") == first  # "again" repeats the previous answer: the history reached the model
        c.expect_exact("you> ")
        c.sendline("/history")
        c.expect(r"\((\d+) messages\)")
        assert c.match.group(1) == "4" and "[user] add 4 and 4" in c.before and "[user] again" in c.before
        c.expect_exact("you> ")
        c.sendline("/reset")
        c.expect_exact("(conversation cleared)")
        c.expect_exact("you> ")
        c.sendline("/system You add numbers.")
        c.expect_exact("(system prompt set)")
        c.expect_exact("you> ")
        c.sendline("/history")
        c.expect(r"\((\d+) messages\)")
        assert c.match.group(1) == "0" and "[system] You add numbers." in c.before and "add 4" not in c.before
        assert say("add 2 and 5").isdigit()
        c.expect_exact("you> ")
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close()
    assert c.exitstatus == 0 and c.signalstatus is None


def test_special_template_run_saves_its_tokens(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2tune.chat.reply import load_chat_model, reply
    from gpt2tune.generate.sampling import Sampling

    src = write_jsonl(tmp_path / "c.jsonl", addition_conversations(60, 3))
    r = write_recipe(tmp_path / "r.yaml", RECIPE.format(template="special", src=src, max_length=96, steps=20,
                                                         out=tmp_path / "run"))
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    assert "added 4 chat tokens" in err
    plain_tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "model"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))
    assert plain.config.vocab_size == len(plain_tok) and "<|assistant|>" in plain_tok.all_special_tokens
    text = plain_tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|endoftext|><|system|>\nYou add numbers.<|end|>\n<|user|>\nadd 2 and 3<|end|>\n<|assistant|>\n"
    chat = load_chat_model(tmp_path / "run")
    assert chat.end_id == plain_tok.convert_tokens_to_ids("<|end|>")
    assert isinstance(reply(chat, CONV[:2], Sampling(max_new_tokens=3, greedy=True)), str)
    # peft-style methods freeze the embeddings the new tokens need
    code, _, err = run_cli("train", r, "--overwrite", "--set", "method.name=lora")
    assert code == 2 and "chat.template: special" in err


def test_chat_recipe_errors(tmp_path, run_cli):
    src = write_jsonl(tmp_path / "c.jsonl", addition_conversations(20, 1) + [{"messages": "broken"},
                                                                             {"messages": [{"role": "user", "content": "hi"}]}])
    r = write_recipe(tmp_path / "r.yaml", RECIPE.format(template="plain", src=src, max_length=64, steps=2,
                                                         out=tmp_path / "run"))
    code, _, err = run_cli("train", r, "--no-progress", "--set", "data.batching=pack")
    assert code == 2 and "batching" in err
    code, _, err = run_cli("train", r, "--no-progress", "--set", "chat.field=conversation")
    assert code == 2 and "'conversation'" in err and "messages" in err
    code, _, err = run_cli("train", r, "--no-progress", "--set", "data.val_fraction=0")
    assert code == 0, err
    assert "skipped 1 malformed" in err and "warning: skipped 1 training conversations with nothing to train on" in err
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["skipped_records"] == 1 and data["train_fit"]["skipped_no_answer"] == 1


def test_shipped_chat_recipe_points_at_a_replaceable_jsonl(tmp_path, run_cli):
    from gpt2tune.recipe import load_recipe

    src = write_jsonl(tmp_path / "mine.jsonl", addition_conversations(30, 2))
    rec = load_recipe("recipes/chat.yaml", [f"data.source=jsonl:{src}"])
    assert rec.task == "chat" and rec.data.source == f"jsonl:{src}"


def test_stop_strings_and_repetition_penalty_in_replies(addition_run, run_cli):
    from gpt2tune.chat.reply import Reply, load_chat_model
    from gpt2tune.generate.sampling import Sampling

    chat = load_chat_model(addition_run)
    msgs = [{"role": "user", "content": "add 2 and 5"}]
    full = Reply(chat, msgs, Sampling(max_new_tokens=12, min_new_tokens=12, greedy=True))
    full_text = "".join(full)
    assert full_text == full.text and len(full.text) >= 3, full.text
    stop = full.text[1:3]
    r = Reply(chat, msgs, Sampling(max_new_tokens=12, min_new_tokens=12, greedy=True, stop=[stop]))
    pieces = list(r)
    want = full.text[:full.text.find(stop)]
    assert "".join(pieces) == r.text == want and r.finish_reason == "stop"
    assert stop not in "".join(pieces)
    # a long stop string holds text back; the short one that hits releases it, up to the cut
    i = next(i for i, ch in enumerate(full.text) if i >= 1 and full.text.index(ch) == i)
    r = Reply(chat, msgs, Sampling(max_new_tokens=12, min_new_tokens=12, greedy=True,
                                   stop=[full.text[i], "never in this reply"]))
    assert "".join(r) == r.text == full.text[:i].lstrip() and r.finish_reason == "stop"
    code, out, err = run_cli("chat", addition_run, "-m", "add 2 and 5", "--greedy", "--max-new-tokens", "12",
                             "--repetition-penalty", "1.5", "--stop", "zzz", "--json")
    assert code == 0, err
    code, out, err = run_cli("chat", addition_run, "-m", "hi", "--repetition-penalty", "0")
    assert code == 2 and "repetition-penalty" in err
