import json

import pytest
import torch

from conftest import TANG_MINI, need
from gpt2tune.errors import UserError
from gpt2tune.generate.decode import Decoder, decode, generate_ids
from gpt2tune.generate.loops import find_loop
from gpt2tune.generate.sampling import Sampling
from gpt2tune.generate.text import generate_texts, stream_texts, suppressed_ids

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def _cjk_gap(text: str) -> bool:
    """A space next to a Chinese character or full-width punctuation (Latin words may keep theirs)."""
    from gpt2tune.data.poetry import is_cjk

    wide = lambda ch: is_cjk(ch) or ch in "，。！？；："  # noqa: E731
    return any(ch == " " and (wide(text[i - 1]) or wide(text[i + 1])) for i, ch in enumerate(text[1:-1], 1))


@pytest.fixture(scope="module")
def tiny(tiny_zh_model):
    from gpt2tune.method.io import load_run

    return load_run(tiny_zh_model)


def _hf(model, prompts, pad, **kw):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(ids, attention_mask=mask, pad_token_id=pad, **kw)
    return [row[width:].tolist() for row in out]


def _strip(row, eos, pad):
    return row[: row.index(eos)] if eos in row else row


def _prompts(tok, fr, texts):
    return [[fr.bos] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_equals_transformers_generate_token_for_token(tiny):
    model, tok, fr = tiny
    prompts = _prompts(tok, fr, ["白日", "床前明月光，疑", "春"])
    # batched with left padding, and one at a time: the same tokens as transformers, with our
    # static-cache forward ("auto") and with transformers' own forward ("hf")
    hf = _hf(model, prompts, fr.pad, do_sample=False, max_new_tokens=30, eos_token_id=fr.eos)
    for runner in ("auto", "hf"):
        ours = decode(model, prompts, fr.eos, Sampling(max_new_tokens=30, greedy=True), runner=runner)
        for r, h in zip(ours, hf):
            assert r.ids == _strip(h, fr.eos, fr.pad), runner
    for p, r in zip(prompts, ours):
        assert r.ids == _strip(_hf(model, [p], fr.pad, do_sample=False, max_new_tokens=30, eos_token_id=fr.eos)[0],
                               fr.eos, fr.pad)
    # our default never emits special tokens: the same as transformers with suppress_tokens
    sup = suppressed_ids(tok, model)
    ours = decode(model, prompts, fr.eos, Sampling(max_new_tokens=30, greedy=True), suppress_ids=sup)
    hf = _hf(model, prompts, fr.pad, do_sample=False, max_new_tokens=30, eos_token_id=fr.eos,
             suppress_tokens=[i for i in sup if i != fr.eos])
    assert [r.ids for r in ours] == [_strip(h, fr.eos, fr.pad) for h in hf]


def test_greedy_equals_transformers_on_the_pretrained_tang_model():
    from gpt2tune.method.io import load_run

    model, tok, fr = load_run(need(TANG_MINI))
    prompts = _prompts(tok, fr, ["白日", "月落烏啼霜滿天，"])
    ours = decode(model, prompts, fr.eos, Sampling(max_new_tokens=40, greedy=True))
    hf = _hf(model, prompts, fr.pad, do_sample=False, max_new_tokens=40, eos_token_id=fr.eos)
    assert [r.ids for r in ours] == [_strip(h, fr.eos, fr.pad) for h in hf]
    assert all(r.finish == "eos" for r in ours)


def test_penalties_and_beam_search_match_transformers(tiny):
    model, tok, fr = tiny
    p = _prompts(tok, fr, ["白日依"])
    for kw in [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.2, no_repeat_ngram_size=3)]:
        ours = decode(model, p, fr.eos, Sampling(max_new_tokens=25, greedy=True, **kw))
        hf = _hf(model, p, fr.pad, do_sample=False, max_new_tokens=25, eos_token_id=fr.eos, **kw)
        assert ours[0].ids == _strip(hf[0], fr.eos, fr.pad), kw
    ngram = decode(model, p, fr.eos, Sampling(max_new_tokens=40, greedy=True, no_repeat_ngram_size=2))[0].ids
    seq = p[0] + ngram
    pairs = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
    assert len(pairs) == len(set(pairs))
    for k, n, lp in [(3, 2, 1.0), (4, 1, 0.0)]:
        ours = decode(model, p, fr.eos, Sampling(max_new_tokens=20, num_beams=k, num_return_sequences=n, length_penalty=lp))
        hf = model.generate(torch.tensor(p), do_sample=False, num_beams=k, num_return_sequences=n, max_new_tokens=20,
                            eos_token_id=fr.eos, pad_token_id=fr.pad, length_penalty=lp, output_scores=True,
                            return_dict_in_generate=True)
        for r, row, sc in zip(ours, hf.sequences.tolist(), hf.sequences_scores.tolist()):
            assert r.ids == _strip(row[len(p[0]):], fr.eos, fr.pad)
            assert r.score == pytest.approx(sc, abs=1e-4)


def test_sampling_options_seed_and_lengths(tiny):
    model, tok, fr = tiny
    p = _prompts(tok, fr, ["白日", "春"])
    s = Sampling(max_new_tokens=12, top_k=20, top_p=0.9, temperature=0.8, seed=7, num_return_sequences=3)
    a, b = decode(model, p, fr.eos, s), decode(model, p, fr.eos, s)
    assert [r.ids for r in a] == [r.ids for r in b] and len(a) == 6
    assert [r.prompt_index for r in a] == [0, 0, 0, 1, 1, 1]
    c = decode(model, p, fr.eos, Sampling(max_new_tokens=12, top_k=20, seed=8, num_return_sequences=3))
    assert [r.ids for r in a] != [r.ids for r in c]
    top1 = decode(model, p, fr.eos, Sampling(max_new_tokens=12, top_k=1, seed=1))
    greedy = decode(model, p, fr.eos, Sampling(max_new_tokens=12, greedy=True))
    assert [r.ids for r in top1] == [r.ids for r in greedy]
    assert all(len(r.ids) <= 12 for r in a)
    # min_new_tokens: the end marker is masked until then
    long = decode(model, p, fr.eos, Sampling(max_new_tokens=15, min_new_tokens=15, temperature=5.0, seed=0,
                                              num_return_sequences=4))
    assert all(len(r.ids) == 15 and r.finish == "length" for r in long)
    # the old one-prompt API still works
    assert generate_ids(model, p[0], fr.eos, Sampling(max_new_tokens=12, greedy=True)) == [greedy[0].ids]
    for bad in [dict(max_new_tokens=0), dict(temperature=0), dict(top_p=1.5), dict(num_beams=2, num_return_sequences=3),
                dict(min_new_tokens=99), dict(stop=[""])]:
        with pytest.raises(ValueError):
            decode(model, p, fr.eos, Sampling(**bad))


def test_texts_have_no_spaces_or_specials_and_stop_strings_cut(tiny):
    model, tok, fr = tiny
    samples, stats = generate_texts(model, tok, fr, ["白日", "", "床前"], Sampling(max_new_tokens=40, seed=3,
                                                                                   num_return_sequences=5))
    assert len(samples) == 15 and stats["tokens_per_s"] > 0 and stats["new_tokens"] > 0
    for x in samples:
        assert x.text == x.prompt + x.completion
        assert not _cjk_gap(x.text) and not any(sp in x.text for sp in SPECIALS)
    stopped, _ = generate_texts(model, tok, fr, ["白日"], Sampling(max_new_tokens=60, min_new_tokens=60, seed=1,
                                                                 num_return_sequences=6, stop=["，", "。"]))
    for x in stopped:
        assert "，" not in x.completion and "。" not in x.completion
    assert any(x.finish == "stop" for x in stopped)
    with pytest.raises(UserError):
        generate_texts(model, tok, fr, ["白" * 200], Sampling())  # longer than the context (128)


@pytest.mark.parametrize("stops", [["山", "河"], ["山", "河", "a long stop string that holds text back"]])
def test_stream_deltas_build_the_same_samples(tiny, stops):
    model, tok, fr = tiny
    s = Sampling(max_new_tokens=30, seed=4, num_return_sequences=2, stop=stops)
    events = list(stream_texts(model, tok, fr, ["白日", "春"], s))
    assert events[0] == {"type": "start", "heads": ["白日", "春"]}
    done = events[-1]
    assert done["type"] == "done" and len(done["samples"]) == 4
    for i, smp in enumerate(done["samples"]):
        text = "".join(e["text"] for e in events if e["type"] == "delta" and e["sample"] == i)
        assert text == smp.completion and "山" not in text and "河" not in text
    assert any(smp.finish == "stop" and smp.completion for smp in done["samples"])
    batch, _ = generate_texts(model, tok, fr, ["白日", "春"], s)
    assert [x.text for x in batch] == [x.text for x in done["samples"]]


def test_prompts_in_one_left_padded_batch_equal_one_at_a_time(tiny):
    model, tok, fr = tiny
    prompts = ["白日依山盡，黃河", "春", "", "千山鳥飛絕"]
    s = Sampling(max_new_tokens=20, greedy=True, repetition_penalty=1.3)
    together, _ = generate_texts(model, tok, fr, prompts, s, batch_size=4)
    alone = [generate_texts(model, tok, fr, [p], s)[0][0] for p in prompts]
    assert [x.text for x in together] == [x.text for x in alone]
    assert [x.prompt_index for x in generate_texts(model, tok, fr, prompts, s, batch_size=3)[0]] == [0, 1, 2, 3]


def test_find_loop():
    assert find_loop([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]) is None
    loop = find_loop([9, 8] + [1, 2, 3, 4] * 5)
    assert (loop.period, loop.start, loop.span, loop.repeats) == (4, 2, 20, 5.0)
    assert find_loop([5] * 20).period == 1
    assert find_loop([1, 2, 3] * 2) is None  # too short to call a loop
    assert find_loop([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1]).period == 3


def test_cli_generate_json_stream_prompts_file_and_loops(tiny_zh_model, run_cli, tmp_path):
    code, out, err = run_cli("generate", tiny_zh_model, "--prompt", "白日", "-n", "3", "--seed", "1", "--json")
    assert code == 0, err
    samples = json.loads(out)
    assert len(samples) == 3 and all(x["text"].startswith("白日") and not _cjk_gap(x["text"]) for x in samples)
    assert "tokens/s" in err
    # a random model decoded greedily for long repeats itself: the loop is reported
    code, out, err = run_cli("generate", tiny_zh_model, "--prompt", "白日", "--greedy", "--max-new-tokens", "80", "--json")
    (x,) = json.loads(out)
    loop = x["repetition_loop"]
    assert loop and loop["repeats"] >= 3 and loop["unit"] and "repetition loop" in err
    assert x["text"].endswith(loop["unit"] * 2) or loop["period"] > 1
    pf = tmp_path / "prompts.txt"
    pf.write_text("白日\n\n春風\n床前明月光，\n", encoding="utf-8")
    code, out, err = run_cli("generate", tiny_zh_model, "--prompts-file", pf, "--greedy", "--json", "--batch-size", "2")
    assert code == 0, err
    assert [x["prompt"] for x in json.loads(out)] == ["白日", "春風", "床前明月光，"]
    code, out, err = run_cli("generate", tiny_zh_model, "--prompt", "白日", "--stream", "--seed", "2",
                             "--max-new-tokens", "10")
    assert code == 0 and out.startswith("白日") and not _cjk_gap(out.strip())
    code, out, err = run_cli("generate", tiny_zh_model, "--prompt", "白日", "--stream", "--json", "-n", "2",
                             "--seed", "2", "--max-new-tokens", "10")
    lines = [json.loads(l) for l in out.splitlines()]
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "done" and len(lines[-1]["samples"]) == 2
    code, out, err = run_cli("generate", tiny_zh_model, "--prompt", "白日", "--num-beams", "3", "-n", "2", "--json")
    assert code == 0 and len(json.loads(out)) == 2
    for bad, msg in [(["--stream", "-n", "2"], "--json"), (["--num-beams", "2", "--stream"], "beam"),
                     (["--top-p", "0"], "top"), (["--prompts-file", tmp_path / "none.txt"], "not found"),
                     (["--rhyme"], "verse form")]:
        code, out, err = run_cli("generate", tiny_zh_model, *bad)
        assert code == 2 and msg in err, (bad, err)


def test_int8_weights_from_the_cli_report_drift(tiny_zh_model, run_cli):
    for flag in (["--weights", "int8"], ["--quantize", "int8"], ["--weights", "bf16"]):
        code, out, err = run_cli("generate", tiny_zh_model, "--prompt", "白日", "--greedy", *flag)
        assert code == 0 and f"{flag[1]}: logits drift" in err and "top-1 agreement" in err and out.startswith("白日")
    peft = pytest.importorskip("peft")
    from gpt2tune.commands.generate import check_weights
    from gpt2tune.errors import UserError
    from gpt2tune.method.io import load_run

    model, tok, fr = load_run(tiny_zh_model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(UserError, match="needs a plain GPT-2 model"):
        check_weights(pm, tok, fr, "int8")


def test_static_cache_runner_gives_the_same_logits_as_transformers(tiny):
    from gpt2tune.generate.rows import left_pad
    from gpt2tune.generate.fast import FastRunner
    from gpt2tune.generate.runner import HFRunner

    model, tok, fr = tiny
    ids, mask = left_pad(_prompts(tok, fr, ["白日依山", "春", "床前明月光"]), fr.pad, "cpu")
    a, b = HFRunner(model), FastRunner(model, max_len=ids.size(1) + 8)
    with torch.inference_mode():
        la, lb = a.prefill(ids, mask), b.prefill(ids, mask)
        for step in range(6):
            assert torch.allclose(la, lb, atol=1e-4), step
            nxt = la.argmax(-1)
            if step == 3:  # drop a row, as the decoder does when a sample ends
                keep = torch.tensor([0, 2])
                a.select(keep), b.select(keep)
                nxt = nxt[keep]
            la, lb = a.step(nxt), b.step(nxt)


def test_decoder_can_be_iterated_and_stopped(tiny):
    model, tok, fr = tiny
    p = _prompts(tok, fr, ["白日"])
    dec = Decoder(model, p, fr.eos, Sampling(max_new_tokens=50, min_new_tokens=50, seed=0, num_return_sequences=2))
    for i, ev in enumerate(dec):
        assert ev.rows == ([0, 1] if i < 5 else [1])
        if i == 4:
            dec.finish(0)
    assert dec.results[0].finish == "stop" and len(dec.results[0].ids) == 5 and len(dec.results[1].ids) == 50


def test_rows_with_their_own_sampling_settings_in_one_batch(tiny):
    """Per-row settings: a greedy row gives the greedy tokens, a top-k 1 row too, a repetition
    penalty row matches its own decode, sampled rows only use tokens their top-k allows."""
    import dataclasses

    model, tok, fr = tiny
    p = _prompts(tok, fr, ["白日", "春"])
    base = Sampling(max_new_tokens=12, min_new_tokens=12, seed=0)
    greedy = decode(model, p, fr.eos, dataclasses.replace(base, greedy=True))
    pen = decode(model, p[:1], fr.eos, dataclasses.replace(base, greedy=True, repetition_penalty=2.0))
    rows = [dataclasses.replace(base, greedy=True), dataclasses.replace(base, top_k=1, temperature=0.7),
            dataclasses.replace(base, greedy=True, repetition_penalty=2.0), dataclasses.replace(base, top_p=0.5)]
    prompts = [p[0], p[1], p[0], p[1]]
    dec = Decoder(model, prompts, fr.eos, base, per_row=rows)
    for _ in dec:
        pass
    res = dec.results
    assert res[0].ids == greedy[0].ids
    assert res[1].ids == greedy[1].ids  # top-k 1 is greedy whatever the temperature
    assert res[2].ids == pen[0].ids
    assert len(res[3].ids) == 12
    with pytest.raises(ValueError, match="per_row"):
        Decoder(model, prompts, fr.eos, base, per_row=rows[:2])


def test_stop_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    """The one hold-back-then-cut used by generate, chat and serve: deltas never show text that may
    start a stop string, end just before one, and concatenate to the final text."""
    from gpt2tune.generate.detok import StopStream

    class Pieces:  # a stream whose text grows by one piece per token
        def __init__(self, pieces):
            self.pieces, self.text = pieces, ""

        def push(self, i):
            self.text += self.pieces[i]
            return self.text

    pieces = [" Hello", " wor", "ld", " EN", "D and more", " after"]
    out = StopStream(Pieces(pieces), ["END"], lstrip=True)
    got = [out.push(i) for i in range(4)]
    assert got == [("Hel", False), ("lo w", False), ("or", False), ("ld ", False)]  # the last 2 wait: "EN" may start "END"
    assert out.push(4) == ("", True) and out.hit  # "END" arrived: nothing past it is shown
    assert out.push(5) == ("", True)
    assert out.flush() == "" and out.shown == "Hello world "
    no_stop = StopStream(Pieces(pieces), ["ZZZ"])
    full = "".join(pieces)
    assert "".join(no_stop.push(i)[0] for i in range(6)) == full[:-2]  # the last two characters wait
    assert no_stop.flush(full + "!") == "er!"  # the final text decides the rest
    again = StopStream(Pieces(pieces), [])
    assert "".join(again.push(i)[0] for i in range(6)) == full and again.flush() == ""  # no stop strings: nothing waits


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_constraint_of_ones_own_steers_every_token(tiny, num_beams):
    """Any object with the `generate.constraints.Constraint` members limits decoding (sampling and
    beam search), rows leaving the batch included."""
    from gpt2tune.generate.constraints import Constraint
    from gpt2tune.generate.forms import FormConstraint

    model, tok, fr = tiny
    vocab = model.config.vocab_size

    class Alternate:  # even ids at even steps, odd ids at odd steps; an early end allowed for row 0 only
        def __init__(self, n):
            self.max_new_tokens, self.log = n, []

        def prompt_ids(self, p):
            return []

        def start(self, prompt_index):
            self.step, self.rows = 0, list(prompt_index)

        def allowed(self):
            m = torch.zeros(len(self.rows), vocab, dtype=torch.bool)
            m[:, self.step % 2::2] = True
            m[:, fr.eos] = torch.tensor([p == 0 and self.step >= 3 for p in self.rows])
            return m

        def advance(self, tokens):
            self.log.append(tokens.tolist())
            self.step += 1

        def reorder(self, index):
            self.rows = [self.rows[i] for i in index]

    assert isinstance(Alternate(1), Constraint)
    assert all(callable(getattr(FormConstraint, m)) for m in ("prompt_ids", "start", "allowed", "advance", "reorder"))
    c = Alternate(9)
    s = Sampling(max_new_tokens=40, top_k=50, temperature=1.5, seed=3, num_return_sequences=2) if num_beams == 1 \
        else Sampling(max_new_tokens=40, num_beams=num_beams, greedy=True)
    res = decode(model, _prompts(tok, fr, ["白日", "春", "月"]), fr.eos, s, constraint=c)
    assert c.log and all(len(r.ids) <= 9 for r in res)  # the constraint's budget, not Sampling's 40
    for r in res:
        assert all(t % 2 == i % 2 for i, t in enumerate(r.ids)), r.ids
        if r.prompt_index:  # no end marker allowed: the whole budget
            assert r.finish == "length" and len(r.ids) == 9


def test_text_generation_takes_any_constraint_spec(tiny):
    """`generate_texts` builds the constraint from a spec (verse forms' `FormSpec` is one): here only
    the characters 山 and 水, six of them."""
    from dataclasses import dataclass

    from gpt2tune.generate.constraints import ConstraintSpec
    from gpt2tune.generate.forms import FormSpec

    model, tok, fr = tiny
    keep = [tok.convert_tokens_to_ids(ch) for ch in "山水"]

    @dataclass(frozen=True)
    class Only:
        n: int

        def build(self, tok, vocab_size, prompts, eos_id):
            return _Only(self.n, vocab_size, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts])

    class _Only:
        def __init__(self, n, vocab, ids):
            self.max_new_tokens, self.vocab, self.ids = n, vocab, ids

        def prompt_ids(self, p):
            return self.ids[p]

        def start(self, prompt_index):
            self.rows = len(prompt_index)

        def allowed(self):
            m = torch.zeros(self.rows, self.vocab, dtype=torch.bool)
            m[:, keep] = True
            return m

        def advance(self, tokens):
            pass

        def reorder(self, index):
            self.rows = len(index)

    assert isinstance(Only(6), ConstraintSpec) and isinstance(FormSpec(4, 5), ConstraintSpec)
    samples, _ = generate_texts(model, tok, fr, ["白日", "春"], Sampling(max_new_tokens=40, seed=2, top_k=5), form=Only(6))
    for smp in samples:
        assert len(smp.completion) == 6 and set(smp.completion) <= set("山水"), smp.completion
        assert smp.text == smp.prompt + smp.completion
