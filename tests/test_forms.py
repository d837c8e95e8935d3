import json

import pytest

from conftest import BERT_ZH, GPT2_BPE, POEMS, TANG_MINI, need, write_recipe
from gpt2tune.data.poetry import FORMS
from gpt2tune.errors import UserError
from gpt2tune.evaluate import classical
from gpt2tune.evaluate.poems import parse_poem, poem_metrics
from gpt2tune.evaluate.prosody import LEVEL
from gpt2tune.generate.forms import FormSpec, form_spec, poem_prefix
from gpt2tune.generate.sampling import Sampling
from gpt2tune.generate.text import generate_texts

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "chinese-poetry:{src}", val_fraction: 0.05, max_length: 80}}
train: {{precision: fp32, lr: 3.0e-3, batch_size: 16, max_steps: 30, eval_every: 30, save_every: 30,
         log_every: 10, seed: 1, warmup_steps: 5}}
output: {{dir: "{out}"}}
"""


@pytest.fixture(scope="module")
def poem_run(tmp_path_factory):
    """A tiny scratch GPT-2 trained briefly on one file of ../shared Tang poems."""
    from gpt2tune.cli import main

    src = need(POEMS) / "poet.tang.0.json"
    d = tmp_path_factory.mktemp("poem_run")
    r = write_recipe(d / "r.yaml", RECIPE.format(src=src, out=d / "run"))
    assert main(["train", str(r), "--no-progress"]) == 0
    return d / "run"


def _load(path):
    from gpt2tune.method.io import load_run

    return load_run(path)


def _models(poem_run):
    yield "scratch-trained", _load(poem_run)
    yield "tang-mini", _load(need(TANG_MINI))


SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "<|endoftext|>"]


def _check(texts, spec: FormSpec, prompts):
    assert len(texts) == 50 * len(prompts)
    for i, t in enumerate(texts):
        lines = parse_poem(t, spec.rows, spec.cols)
        assert lines is not None, t
        assert t.startswith(poem_prefix(spec, prompts[i // 50])), t
        assert " " not in t and not any(s in t for s in SPECIALS)
        for line, a in zip(lines, spec.acrostic):
            assert line[0] == a
    return poem_metrics(texts, spec.rows, spec.cols)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_is_exact_for_any_prompt_length_with_and_without_acrostic(poem_run, form):
    for name, (model, tok, fr) in _models(poem_run):
        for acrostic, prompts in (("", ["", "白", "白日依"]), ("春夏秋冬", ["", "春", "春風又"])):
            spec = form_spec(form, acrostic=acrostic)
            s = Sampling(top_k=40, seed=3, num_return_sequences=50)
            samples, _ = generate_texts(model, tok, fr, prompts, s, form=spec, batch_size=3)
            m = _check([x.text for x in samples], spec, prompts)
            assert m.form_compliance == 1.0, (name, form, acrostic)
            assert all(x.finish == "eos" for x in samples)


def test_rhyme_and_no_repeat_chars_hold_by_the_metric(poem_run):
    for name, (model, tok, fr) in _models(poem_run):
        for form, acrostic in (("qiyan-lvshi", ""), ("wuyan-lvshi", "春夏秋冬"), ("qiyan-jueju", "")):
            spec = form_spec(form, acrostic=acrostic, rhyme=True, no_repeat=True)
            samples, _ = generate_texts(model, tok, fr, [""], Sampling(top_k=40, seed=5, num_return_sequences=50),
                                        form=spec)
            m = _check([x.text for x in samples], spec, [""])
            assert m.form_compliance == 1.0 and m.rhyme_rate == 1.0, (name, form)
            assert m.repeated_char_rate == 0.0
        # classical rhyme: even lines end on level-tone characters of line 2's 平水韻 group
        spec = form_spec("qiyan-lvshi", rhyme=True, prosody="classical")
        samples, _ = generate_texts(model, tok, fr, [""], Sampling(top_k=40, seed=5, num_return_sequences=50),
                                    form=spec)
        texts = [x.text for x in samples]
        assert poem_metrics(texts, 8, 7, "classical").rhyme_rate == 1.0, name
        for t in texts:
            ends = [line[-1] for line in parse_poem(t, 8, 7)[1::2]]
            groups = [{r.group for r in classical.info(ch).readings if r.tone == LEVEL} for ch in ends]
            assert set.intersection(*groups), (name, t)
        # without the constraint the same model rarely rhymes: the constraint, not the model, does it
        spec = form_spec("qiyan-lvshi")
        samples, _ = generate_texts(model, tok, fr, [""], Sampling(top_k=40, seed=5, num_return_sequences=50), form=spec)
        assert poem_metrics([x.text for x in samples], 8, 7).rhyme_rate < 0.6


def test_random_model_with_the_bert_vocabulary_still_writes_exact_forms(tmp_path):
    """A random model would emit [UNK], Latin, digits and punctuation anywhere: the mask stops all of it."""
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer

    tok = load_tokenizer(need(BERT_ZH))
    fr = framing_of(tok)
    model = build_scratch("nano", len(tok), fr, n_positions=128, seed=1).eval()
    spec = form_spec(rows=3, cols=4, acrostic="山水", rhyme=False, no_repeat=True)
    samples, _ = generate_texts(model, tok, fr, ["", "山"], Sampling(seed=0, num_return_sequences=50), form=spec)
    m = _check([x.text for x in samples], spec, ["", "山"])
    assert m.form_compliance == 1.0 and m.repeated_char_rate == 0.0
    greedy, _ = generate_texts(model, tok, fr, ["天"], Sampling(greedy=True), form=form_spec("wuyan-jueju"))
    assert parse_poem(greedy[0].text, 4, 5)


def test_prompt_is_parsed_as_the_start_of_the_poem():
    spec = form_spec("wuyan-jueju")
    assert poem_prefix(spec, "白日依山盡黃河") == "白日依山盡，黃河"
    assert poem_prefix(spec, "白日依山盡，黃河入海流。欲") == "白日依山盡，黃河入海流。欲"
    assert poem_prefix(spec, "白日依山盡,") == "白日依山盡，"
    for bad in ["白日，", "白日依山盡。", "hello", "白日依山盡黃河入海流欲窮千里目更上一層樓再"]:
        with pytest.raises(UserError):
            poem_prefix(spec, bad)


def test_form_options_are_validated():
    assert form_spec() is None
    assert form_spec("qiyan-lvshi") == FormSpec(8, 7)
    assert form_spec(rows=3, cols=4) == FormSpec(3, 4)
    for kw in [dict(form="qiyan-lvshi", rows=8), dict(rows=3), dict(form="haiku"), dict(acrostic="春"),
               dict(form="wuyan-jueju", acrostic="春夏秋冬春"), dict(form="wuyan-jueju", acrostic="ab"),
               dict(rows=2, cols=5, rhyme=True), dict(form="wuyan-jueju", acrostic="春春", no_repeat=True)]:
        with pytest.raises(UserError):
            form_spec(**kw)


def test_acrostic_must_agree_with_the_prompt(tiny_zh_model):
    model, tok, fr = _load(tiny_zh_model)
    spec = form_spec("wuyan-jueju", acrostic="白黃")
    with pytest.raises(UserError, match="acrostic"):
        generate_texts(model, tok, fr, ["春"], Sampling(), form=spec)
    with pytest.raises(UserError, match="not a single token"):
        generate_texts(model, tok, fr, [""], Sampling(), form=form_spec("wuyan-jueju", acrostic="鑫"))


def test_byte_level_bpe_gets_a_clear_error(tmp_path, run_cli, capfd):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer

    tok = load_tokenizer(need(GPT2_BPE))
    model = build_scratch("nano", len(tok), framing_of(tok), n_positions=64, seed=0)
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    capfd.readouterr()
    code, out, err = run_cli("generate", tmp_path / "m", "--form", "wuyan-jueju")
    assert code == 2 and "one token" in err and "byte-level BPE" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_forms_json_and_eval_poems(tiny_zh_model, run_cli):
    code, out, err = run_cli("generate", tiny_zh_model, "--form", "wuyan-jueju", "--acrostic", "白黃欲更", "--rhyme",
                             "-n", "4", "--seed", "1", "--json")
    assert code == 0, err
    samples = json.loads(out)
    assert len(samples) == 4
    for smp in samples:
        lines = parse_poem(smp["text"], 4, 5)
        assert lines and [l[0] for l in lines] == list("白黃欲更")
    assert poem_metrics([x["text"] for x in samples], 4, 5, "classical").rhyme_rate == 1.0  # --prosody's default
    code, out, err = run_cli("generate", tiny_zh_model, "--rows", "2", "--cols", "3", "--prompt", "白日", "--seed", "2")
    assert code == 0 and parse_poem(out.strip(), 2, 3) and out.startswith("白日")
    code, out, err = run_cli("eval-poems", tiny_zh_model, "--form", "wuyan-jueju", "-n", "6", "--seed", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["constrained"]["form_compliance"] == 1.0 and res["samples"] == 6
    assert res["unconstrained"]["form_compliance"] < 1.0  # an untrained model does not write poems by itself
    assert "tone_conformity" in res["unconstrained"] and "pypinyin" in res["note"]
    code, out, err = run_cli("eval-poems", tiny_zh_model, "-n", "3")
    assert code == 2 and "verse form" in err
    code, out, err = run_cli("eval-poems", tiny_zh_model, "--form", "wuyan-jueju", "-n", "4", "--rhyme", "--seed", "0")
    assert code == 0 and "form compliance" in out and "100.0%" in out
