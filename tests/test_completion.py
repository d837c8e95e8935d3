"""Task `completion`: prompt->completion templates, loss on the completion only, long prompts cut
while the completion stays whole, and `gpt2tune generate RUN --template`."""

import csv
import json
import random

import pytest

from conftest import write_recipe
from gpt2tune.chat.masking import FitStats, encode_segments
from gpt2tune.chat.prompt import encode_pair, find_prompt_template, parse_template, values_of
from gpt2tune.data.dataset import IGNORE
from gpt2tune.errors import UserError

TLDR = "{document}\nTL;DR: {title}"
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket", "violin", "garden"]


def test_template_splits_prompt_and_completion():
    pt = parse_template(TLDR)
    assert pt.prompt_fields == ("document",) and pt.completion_field == "title"
    v = {"document": "My cat sleeps all day.", "title": "Lazy cat"}
    # the space before the completion belongs to it: the prompt ends in "TL;DR:" as at inference
    assert pt.prompt(v) == "My cat sleeps all day.\nTL;DR:" and pt.completion(v) == " Lazy cat"
    assert pt.prompt_for("A post.") == "A post.\nTL;DR:"
    two = parse_template("Q: {question} ({topic})\nA:{answer}.")
    assert two.prompt_fields == ("question", "topic") and two.completion({"answer": "yes"}) == "yes."
    assert two.prompt_for('{"question": "why", "topic": "sky"}') == "Q: why (sky)\nA:"
    with pytest.raises(UserError, match="JSON object"):
        two.prompt_for("why")
    assert parse_template("{{literal}} {a}:{b}").prompt({"a": "x"}) == "{literal} x:"
    for bad, msg in [("{title}", "two placeholders"), ("{a} {b} {b}", "only once"), ("{a:>10} {b}", "format"),
                     ("{} {b}", "name a field"), ("{a", "braces"), ("", "non-empty")]:
        with pytest.raises(UserError, match=msg):
            parse_template(bad)


@pytest.fixture(scope="module")
def gpt2ish_tok(tmp_path_factory):
    from gpt2tune.model.tokenizer import build_tokenizer

    texts = [f"{' '.join(random.Random(i).sample(WORDS, 5))}\nTL;DR: {WORDS[i % 12]}" for i in range(200)]
    return build_tokenizer(texts, tmp_path_factory.mktemp("tok"), 300)


def test_loss_only_on_the_completion_and_its_end_marker(gpt2ish_tok):
    tok = gpt2ish_tok
    pt = parse_template(TLDR)
    v = {"document": "apple river stone\ncloud tiger", "title": "piano lemon"}
    segs = pt.segments(v, "<|endoftext|>", "<|endoftext|>")
    row = encode_segments(tok, segs)
    text = "<|endoftext|>apple river stone\ncloud tiger\nTL;DR: piano lemon<|endoftext|>"
    assert "".join(s[0] for s in segs) == text
    assert row.ids == tok(text, add_special_tokens=False)["input_ids"]
    trained = [i for i, l in zip(row.ids, row.labels) if l != IGNORE]
    masked = [i for i, l in zip(row.ids, row.labels) if l == IGNORE]
    assert tok.decode(trained) == " piano lemon<|endoftext|>"
    assert tok.decode(masked) == "<|endoftext|>apple river stone\ncloud tiger\nTL;DR:"
    n = len(masked)  # the trained tokens form one span at the end
    assert all(l == IGNORE for l in row.labels[:n]) and all(l != IGNORE for l in row.labels[n:])


def test_long_documents_are_cut_at_their_end_keeping_the_whole_title(gpt2ish_tok):
    tok = gpt2ish_tok
    pt = parse_template(TLDR)
    v = {"document": " ".join(WORDS * 20), "title": "rocket violin garden"}
    st = FitStats()
    row = encode_pair(tok, pt, v, "<|endoftext|>", "<|endoftext|>", 48, st)
    text = tok.decode(row.ids)
    assert len(row) <= 48 and st.prompt_cut == 1 and st.samples == 1
    assert text.startswith("<|endoftext|>apple river stone") and text.endswith("\nTL;DR: rocket violin garden<|endoftext|>")
    assert tok.decode([i for i, l in zip(row.ids, row.labels) if l != IGNORE]) == " rocket violin garden<|endoftext|>"
    # a completion longer than max_length: cut at its end, still trained
    st = FitStats()
    row = encode_pair(tok, pt, {"document": "apple", "title": " ".join(WORDS * 10)}, "<|endoftext|>", "<|endoftext|>", 32, st)
    assert len(row) == 32 and st.answer_cut == 1 and row.trained > 20


def test_records_need_the_template_fields():
    pt = parse_template(TLDR)
    vals, skipped = values_of([{"document": "a", "title": "b"}, {"document": "", "title": "x"}, {"document": "c"},
                               {"document": 3, "title": "n"}], pt, "jsonl:x")
    assert vals == [{"document": "a", "title": "b"}, {"document": "3", "title": "n"}] and skipped == 2
    with pytest.raises(UserError, match="'title'.*available: document, summary"):
        values_of([{"document": "a", "summary": "b"}], pt, "jsonl:x")


RECIPE = """
task: completion
completion: {{template: "{{document}}\\nTL;DR: {{title}}"}}
model: {{init: scratch, size: nano, tokenizer: from-data, vocab_size: 300, n_positions: 64, dropout: 0.0}}
data: {{source: "csv:{src}", val_fraction: 0.1, max_length: 48}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 16, max_steps: {steps}, log_every: 50, seed: 3, warmup_steps: 20,
         num_threads: 1}}
sample: {{prompts: ["apple river stone cloud"], max_new_tokens: 4}}
output: {{dir: "{out}"}}
"""


def _doc(rng) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return " ".join(words), words[1]  # the title is the document's second word


def test_completion_run_and_generate_with_template(tmp_path, run_cli):
    rng = random.Random(0)
    src = tmp_path / "posts.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["document", "title"])
        for _ in range(400):
            w.writerow(_doc(rng))
        w.writerow(["", "no document"])  # skipped
    out = tmp_path / "run"
    r = write_recipe(tmp_path / "tldr.yaml", RECIPE.format(src=src, steps=600, out=out))
    code, _, err = run_cli("train", r, "--no-progress")
    assert code == 0, err
    assert "skipped 1 records" in err
    for f in ("completion.json", "model/completion.json", "samples.json"):
        assert (out / f).is_file(), f
    assert find_prompt_template(out).template == TLDR
    ev = json.loads((out / "eval.json").read_text())
    assert ev["validation"]["loss"] < ev["validation_at_start"]["loss"] / 2
    sample = json.loads((out / "samples.json").read_text())[0]
    assert sample["text"].startswith("apple river stone cloud\nTL;DR:")

    held = [_doc(random.Random(1000 + i)) for i in range(12)]
    prompts = tmp_path / "docs.txt"
    prompts.write_text("\n".join(d for d, _ in held) + "\n", encoding="utf-8")
    code, stdout, err = run_cli("generate", out, "--template", "--prompts-file", prompts, "--greedy",
                                "--max-new-tokens", "4", "--json")
    assert code == 0, err
    got = json.loads(stdout)
    assert [g["prompt"] for g in got] == [d + "\nTL;DR:" for d, _ in held]
    correct = sum(g["completion"].strip() == t for g, (_, t) in zip(got, held))
    assert correct >= 6, [g["completion"] for g in got]  # chance: 1 in 12 words; seen: 10 of 12
    code, stdout, err = run_cli("generate", out, "--template", "--prompt", held[0][0], "--greedy",
                                "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith(held[0][0] + "\nTL;DR: ")

    # --template on a folder without a saved template
    (out / "completion.json").unlink()
    (out / "model" / "completion.json").unlink()
    code, _, err = run_cli("generate", out, "--template", "--prompt", "x")
    assert code == 2 and "no completion template" in err


def test_shipped_tldr_recipe(tmp_path):
    from gpt2tune.recipe import load_recipe

    rec = load_recipe("recipes/tldr.yaml", ["data.source=jsonl:mine.jsonl"])
    assert rec.task == "completion" and parse_template(rec.completion.template).completion_field == "title"
