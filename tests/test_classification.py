import json
import random

import pytest
import torch

from conftest import GPT2_BPE, SMS, need, write_recipe
from gpt2tune.errors import UserError

POS = ["good", "great", "lovely", "superb", "nice", "happy", "excellent", "fine"]
NEG = ["bad", "awful", "terrible", "poor", "sad", "horrible", "nasty", "ugly"]
FILL = ["the", "movie", "was", "really", "quite", "a", "plot", "and", "actors", "film", "story", "very"]


def synthetic(n=120, seed=0):
    """An easy two-class task: a sentiment word hidden among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILL, rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label == "pos" else NEG))
        rows.append((label, " ".join(words)))
    return rows


def write_tsv(path, rows):
    path.write_text("".join(f"{l}\t{t}\n" for l, t in rows), encoding="utf-8")
    return path


RECIPE = """
task: classification
model: {{init: scratch, size: nano, tokenizer: from-data, vocab_size: 300, n_positions: 64, dropout: 0.0}}
data: {{source: "tsv:{src}", columns: [label, text], max_length: 32, seed: 3}}
classification: {{balance: undersample, split: [0.6, 0.2, 0.2], pretrain_steps: {pre}}}
{method}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 8, epochs: {epochs}, log_every: 5, seed: 5, warmup_steps: 3,
         num_threads: 1}}
output: {{dir: "{out}"}}
"""


def make_recipe(tmp_path, name, src, epochs=6, pre=0, method="method: {name: full}"):
    return write_recipe(tmp_path / f"{name}.yaml",
                        RECIPE.format(src=src, out=tmp_path / name, epochs=epochs, pre=pre, method=method))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained end to end through the CLI (pretraining stage included)."""
    from gpt2tune.cli import main

    tmp = tmp_path_factory.mktemp("clf")
    src = write_tsv(tmp / "sent.tsv", synthetic(160))
    recipe = make_recipe(tmp, "run", src, epochs=8, pre=20)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    return tmp / "run"


def tiny_classifier(pad_id=0, vocab=50, seed=0):
    from transformers import GPT2Config

    from gpt2tune.classify.model import GPT2Classifier

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3,
                     pad_token_id=pad_id, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2Classifier(cfg).eval()


# --------------------------------------------------------------------------- pooling


def test_last_token_index_left_and_right_padding():
    from gpt2tune.classify.model import last_token_index

    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    # virtual tokens prepended to the hidden states (prompt tuning) shift the index
    assert last_token_index(right, length=8).tolist() == [5, 7, 3]
    # prefix tuning: the mask also covers prefix positions that are not among the hidden states
    prefixed = torch.cat([torch.ones(3, 4, dtype=torch.long), right], dim=1)
    assert last_token_index(prefixed, length=5).tolist() == [2, 4, 0]


def test_pooling_uses_the_last_real_token_with_left_or_right_padding():
    """Padded rows give the logits of the unpadded text, even when the pad id is a real token."""
    from gpt2tune.data.labels import Example, collate_examples

    pad = 7  # GPT-2 BPE style: the pad id is also used inside texts (here: as the first token)
    model = tiny_classifier(pad_id=pad)
    seqs = [[7, 3, 4, 5, 6, 8], [7, 9, 10], [7, 11, 12, 13]]
    rows = [Example(s, 0) for s in seqs]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits for s in seqs])
        for left in (False, True):
            batch = collate_examples(rows, pad, left=left)
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.allclose(got, alone, atol=1e-5), f"left={left}"
        # pooling on a pad position instead (the seed's position -1) would give other logits
        batch = collate_examples(rows, pad)
        h = model.transformer(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        assert not torch.allclose(model.score(h[:, -1]), alone, atol=1e-3)


def test_pooling_agrees_with_transformers_on_right_padding():
    from transformers import GPT2ForSequenceClassification

    from gpt2tune.data.labels import Example, collate_examples

    pad = 0
    ours = tiny_classifier(pad_id=pad)
    plain = GPT2ForSequenceClassification(ours.config).eval()
    plain.load_state_dict(ours.state_dict())
    batch = collate_examples([Example([5, 6, 7, 8, 9], 0), Example([5, 6], 1), Example([3, 2, 1], 2)], pad)
    with torch.no_grad():
        a = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_encode_keeps_gpt2_bpe_texts_free_of_the_pad_id():
    """With GPT-2 BPE (pad = <|endoftext|>) no marker is added and a literal marker in a text stays text,
    so transformers' 'rightmost non-pad id' is our last real token."""
    from transformers import GPT2Tokenizer

    from gpt2tune.classify.predict import encode

    tok = GPT2Tokenizer.from_pretrained(str(need(GPT2_BPE)))
    rows, cut = encode(tok, ["Every effort moves you", "a <|endoftext|> b", "x " * 50], 20)
    assert rows[0] == [6109, 3626, 6100, 345]
    assert all(50256 not in r for r in rows)
    assert cut == 1 and len(rows[2]) == 20


# --------------------------------------------------------------------------- data


def test_sms_tsv_with_stray_quotes_loads_every_row():
    from types import SimpleNamespace

    from gpt2tune.data.labels import read_labeled

    path = need(SMS)
    cfg = SimpleNamespace(field="text", columns=["label", "text"], header=False, text_mode="auto",
                          normalize="nfc", whitespace=True, min_chars=1, max_chars=None,
                          poetry=SimpleNamespace(include_title=False, form=None, simplified=False))
    data = read_labeled(cfg, f"tsv:{path}")
    assert len(data) == 5574
    assert data.counts() == {"ham": 4827, "spam": 747}
    assert sum('"' in t for t in data.texts) > 0


def test_undersample_and_stratified_split_are_seeded_and_stratified():
    from gpt2tune.data.labels import Labeled, stratified_split, undersample

    labels = ["a"] * 300 + ["b"] * 100 + ["c"] * 50
    data = Labeled([f"t{i}" for i in range(len(labels))], labels)
    bal = undersample(data, seed=1)
    assert bal.counts() == {"a": 50, "b": 50, "c": 50}
    assert undersample(data, seed=1).texts == bal.texts and undersample(data, seed=2).texts != bal.texts
    tr, va, te = stratified_split(bal.labels, [0.7, 0.1, 0.2], seed=123)
    assert sorted(tr + va + te) == list(range(150))
    for part, per_class in ((tr, 35), (va, 5), (te, 10)):
        assert sorted(bal.subset(part).counts().values()) == [per_class] * 3
    assert stratified_split(bal.labels, [0.7, 0.1, 0.2], seed=123) == (tr, va, te)
    with pytest.raises(UserError, match="add up to 1"):
        stratified_split(bal.labels, [0.7, 0.2, 0.2], seed=1)


def test_unseen_label_and_single_class_are_clear_errors(tmp_path, run_cli):
    src = write_tsv(tmp_path / "train.tsv", synthetic(40))
    test = write_tsv(tmp_path / "test.tsv", [("neutral", "so so film"), ("pos", "good film")])
    recipe = make_recipe(tmp_path, "unseen", src)
    code, _, err = run_cli("train", recipe, "--set", f"classification.test=tsv:{test}")
    assert code == 2 and "never seen in training: 'neutral'" in err and len(err.strip().splitlines()) == 1

    one = write_tsv(tmp_path / "one.tsv", [("pos", f"good film {i}") for i in range(20)])
    code, _, err = run_cli("train", make_recipe(tmp_path, "single", one))
    assert code == 2 and "single class ('pos')" in err and len(err.strip().splitlines()) == 1

    missing = tmp_path / "nolabel.jsonl"
    missing.write_text('{"text": "hi", "y": "a"}\n', encoding="utf-8")
    code, _, err = run_cli("train", make_recipe(tmp_path, "nolabel", src), "--set", f"data.source=jsonl:{missing}")
    assert code == 2 and "'label'" in err and "available: text, y" in err


def test_metrics_of_a_known_confusion_matrix():
    from gpt2tune.classify.metrics import classification_report

    true = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 1, 1, 0, 2, 2]
    r = classification_report(true, pred, ["a", "b", "c"], [0.5] * 8)
    assert r["confusion_matrix"]["rows_true_columns_predicted"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert r["accuracy"] == 6 / 8 and r["errors"] == 2
    assert r["per_class"]["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert r["per_class"]["b"]["precision"] == 0.5 and r["per_class"]["b"]["recall"] == 0.5
    assert r["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert r["loss"] == pytest.approx(0.6931, abs=1e-4)


# --------------------------------------------------------------------------- end to end


def test_training_writes_metrics_plots_and_a_working_classifier(trained):
    ev = json.loads((trained / "eval.json").read_text())
    assert set(ev) >= {"test", "validation", "train"} and ev["labels"] == ["neg", "pos"]
    for split, n in (("train", 96), ("validation", 32), ("test", 32)):
        r = ev[split]
        assert r["examples"] == n
        assert set(r["per_class"]) == {"neg", "pos"} and 0 <= r["macro_f1"] <= 1
        assert sum(map(sum, r["confusion_matrix"]["rows_true_columns_predicted"])) == n
    assert ev["test"]["accuracy"] >= 0.8 and ev["train"]["accuracy"] >= 0.9
    assert ev["pretrain"]["steps"] == 20 and ev["method"] == "full"
    for f in ["plots/loss.png", "plots/accuracy.png", "plots/confusion-matrix.png", "model/model.safetensors",
              "pretrain/transformer.safetensors", "recipe.yaml", "data.json"]:
        assert (trained / f).is_file(), f
    recs = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in recs if r["split"] == "validation"]
    assert len(val_steps) == 9  # at the start and after each of the 8 epochs
    # the validation rows (what early stopping watches) agree with eval.json's separate prediction pass
    last = [r for r in recs if r["split"] == "validation"][-1]
    for k in ("accuracy", "macro_f1", "loss"):
        assert last[k] == pytest.approx(ev["validation"][k], rel=1e-4), k
    cfg = json.loads((trained / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}


def test_export_loads_in_plain_transformers_with_equal_logits(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2ForSequenceClassification, pipeline

    from gpt2tune.classify.predict import load_classifier, predict

    ours, tok = load_classifier(trained)
    plain = AutoModelForSequenceClassification.from_pretrained(str(trained / "model")).eval()
    assert type(plain) is GPT2ForSequenceClassification
    plain_tok = AutoTokenizer.from_pretrained(str(trained / "model"))
    texts = ["the movie was good", "awful", "really quite a nasty film and the actors were very bad"]
    plain_tok.pad_token = plain_tok.pad_token or plain_tok.eos_token
    batch = plain_tok(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        a = ours(**batch).logits
        b = plain(**batch).logits
    assert torch.allclose(a, b, atol=1e-6)
    preds = predict(ours, tok, texts)
    assert [p["label"] for p in preds] == [plain.config.id2label[i] for i in b.argmax(-1).tolist()]
    pipe = pipeline("text-classification", model=plain, tokenizer=plain_tok)
    for text, p in zip(texts, preds):
        got = pipe(text)[0]
        assert got["label"] == p["label"] and got["score"] == pytest.approx(p["probability"], abs=1e-5)


def test_classify_json_is_stable_and_parseable(trained, tmp_path, run_cli):
    lines = tmp_path / "texts.txt"
    lines.write_text("the film was great\n\nso bad and ugly\nnice story\n", encoding="utf-8")
    args = ("classify", trained, "--text", "a lovely movie", "--file", lines, "--batch-size", "2", "--json")
    code, out, err = run_cli(*args)
    assert code == 0, err
    code2, out2, _ = run_cli(*args)
    assert code2 == 0 and out2 == out
    got = json.loads(out)
    assert [g["text"] for g in got] == ["a lovely movie", "the film was great", "so bad and ugly", "nice story"]
    for g in got:
        assert list(g) == ["text", "label", "probability", "probabilities"]
        assert list(g["probabilities"]) == ["neg", "pos"]
        assert g["label"] in ("neg", "pos") and g["probability"] == max(g["probabilities"].values())
        assert sum(g["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    # batching does not change the result
    code, out1, _ = run_cli("classify", trained, "--file", lines, "--batch-size", "1", "--json")
    for one, many in zip(json.loads(out1), got[1:]):
        assert one["label"] == many["label"] and one["probability"] == pytest.approx(many["probability"], abs=1e-5)
    code, human, _ = run_cli("classify", trained, "--text", "a lovely movie")
    label, prob, text = human.strip().split(None, 2)
    assert label == got[0]["label"] and float(prob) == pytest.approx(got[0]["probability"], abs=1e-4)
    assert text == "a lovely movie"


def test_classify_bad_input_errors(trained, tmp_path, run_cli):
    code, _, err = run_cli("classify", trained)
    assert code == 2 and "--text" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    code, _, err = run_cli("classify", trained, "--file", empty)
    assert code == 2 and "empty" in err
    lm_run = tmp_path / "lm"
    (lm_run / "model").mkdir(parents=True)
    (lm_run / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run_cli("classify", lm_run, "--text", "hi")
    assert code == 2 and "not a GPT-2 classifier" in err


def test_default_method_is_last_block_norm_and_head(tmp_path, run_cli):
    from gpt2tune.recipe import load_recipe

    src = write_tsv(tmp_path / "s.tsv", synthetic(40))
    recipe = make_recipe(tmp_path, "default", src, epochs=1, method="")
    code, _, err = run_cli("train", recipe, "--no-progress")
    assert code == 0, err
    ev = json.loads((tmp_path / "default" / "eval.json").read_text())
    assert ev["method"] == "partial"
    saved = load_recipe(tmp_path / "default" / "recipe.yaml")
    assert saved.method.name == "partial" and saved.method.layers == "top:1"
    # nano: 2 blocks; trainable = block 1 + ln_f + score
    from gpt2tune.classify.model import classifier_from_lm
    from gpt2tune.method import apply_method
    from gpt2tune.method.config import PartialMethod
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing

    lm = build_scratch("nano", 40, Framing(0, 0, 0, False), n_positions=16)
    m = apply_method(classifier_from_lm(lm, {0: "a", 1: "b"}, 0), PartialMethod())
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "score.weight" in names and "transformer.ln_f.weight" in names
    assert all(n.startswith(("transformer.h.1.", "transformer.ln_f.", "score.")) for n in names)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt-tuning", "prefix-tuning", "adapter", "partial"])
def test_every_method_trains_a_classifier_that_classify_loads(tmp_path, run_cli, method):
    from gpt2tune.classify.predict import load_classifier, predict

    src = write_tsv(tmp_path / "s.tsv", synthetic(40))
    recipe = make_recipe(tmp_path, "m", src, epochs=1, method=f"method: {{name: {method}}}")
    code, _, err = run_cli("train", recipe, "--no-progress")
    assert code == 0, err
    ev = json.loads((tmp_path / "m" / "eval.json").read_text())
    assert ev["method"] == method and ev["test"]["examples"] == 8
    # the reloaded run predicts what training measured on the test split (the split the saved recipe
    # cuts): the same accuracy, confusion matrix and loss, through `gpt2tune classify` and `predict`
    from gpt2tune.classify.metrics import classification_report
    from gpt2tune.recipe import load_recipe
    from gpt2tune.tasks.classification import load_splits

    saved = load_recipe(tmp_path / "m" / "recipe.yaml")
    test = load_splits(saved.data, saved.classification).test
    assert len(test.texts) == ev["test"]["examples"]
    lines = tmp_path / "test.txt"
    lines.write_text("".join(t + "\n" for t in test.texts), encoding="utf-8")
    code, out, err = run_cli("classify", tmp_path / "m", "--file", lines, "--json")
    assert code == 0, err
    names = ev["labels"]
    true = [names.index(y) for y in test.labels]
    model, tok = load_classifier(tmp_path / "m")
    for preds, tol in ((json.loads(out), 1e-5), (predict(model, tok, test.texts), 1e-6)):  # CLI: 6 decimals
        assert len(preds) == len(test.texts)
        rep = classification_report(true, [names.index(p["label"]) for p in preds], names,
                                    [p["probabilities"][y] for p, y in zip(preds, test.labels)])
        assert rep["accuracy"] == ev["test"]["accuracy"]
        assert rep["confusion_matrix"] == ev["test"]["confusion_matrix"]
        assert rep["loss"] == pytest.approx(ev["test"]["loss"], abs=tol)
    texts = ["a good film", "the film was bad and ugly", "nice"]
    got = predict(model, tok, texts)
    # batching with padding gives the single-text probabilities (pooling on the last real token)
    one = [predict(model, tok, [t])[0]["probability"] for t in texts]
    assert [g["probability"] for g in got] == pytest.approx(one, abs=1e-5)


def test_sms_spam_recipe_is_valid_and_its_source_replaceable():
    from conftest import ROOT

    from gpt2tune.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "sms-spam.yaml")
    assert r.task == "classification" and r.data.source.startswith("tsv:") and r.data.columns == ["label", "text"]
    assert r.classification.balance == "undersample" and r.classification.split == [0.7, 0.1, 0.2] and r.data.seed == 123
    assert r.model.init == "scratch" and r.method.name == "full"
    r = load_recipe(ROOT / "recipes" / "sms-spam.yaml", ["data.source=csv:other.csv", "classification.balance=none"])
    assert r.data.source == "csv:other.csv" and r.classification.balance == "none"
