"""generate --best-of N --rank-by METRIC: N samples per returned one, the best kept."""

import json

import pytest
import torch

from gpt2tune.generate.best_of import keep_best, poem_score
from gpt2tune.generate.text import Sample


def test_poem_score_puts_form_first():
    good = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。"
    broken = "白日依山盡黃河入海流欲窮千里目更上一層樓"
    assert poem_score(good, 4, 5, "form") == 1.0 and poem_score(broken, 4, 5, "form") == 0.0
    assert poem_score(good, 4, 5) > 10 > poem_score(broken, 4, 5)
    repeated = "白日白日白，白日白日白。白日白日白，白日白日白。"
    assert poem_score(repeated, 4, 5, "repetition") < poem_score(good, 4, 5, "repetition")


def test_keep_best_per_prompt_in_order():
    s = [Sample(i // 3, "p", f"t{i}", f"t{i}", 1, "eos") for i in range(6)]
    kept = keep_best(s, [0.1, 0.5, 0.5, -1.0, 2.0, 0.0], 2)
    assert [x.text for x in kept] == ["t1", "t2", "t4", "t5"]  # ties keep the sampling order
    assert kept[0].score == 0.5


def test_best_of_logprob_picks_the_likeliest_sample(tiny_zh_model, run_cli):
    """The same seed samples the same 4 continuations with -n 4; --best-of 4 returns the one whose
    completion has the highest mean log-probability, computed here by a plain forward."""
    from gpt2tune.method.io import load_run

    args = [tiny_zh_model, "--prompt", "白日", "--max-new-tokens", "8", "--seed", "5", "--json"]
    code, out, err = run_cli("generate", *args, "-n", "4")
    assert code == 0, err
    all4 = json.loads(out)
    code, out, err = run_cli("generate", *args, "--best-of", "4", "--rank-by", "logprob")
    assert code == 0, err
    (best,) = json.loads(out)
    model, tok, framing = load_run(tiny_zh_model)

    def plain(sample):
        head = [framing.bos] + tok(sample["prompt"], add_special_tokens=False)["input_ids"]
        body = tok(sample["completion"], add_special_tokens=False)["input_ids"]
        ids = head + body + ([framing.eos] if sample["finish_reason"] == "eos" else [])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        return float(lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))[len(head) - 1:].mean())

    scores = [plain(x) for x in all4]
    assert len(set(x["text"] for x in all4)) > 1
    assert best["text"] == all4[max(range(4), key=scores.__getitem__)]["text"]
    assert best["score"] == pytest.approx(max(scores), abs=1e-3)


def test_best_of_errors(tiny_zh_model, run_cli):
    code, _, err = run_cli("generate", tiny_zh_model, "--best-of", "3", "--rank-by", "rhyme")
    assert code == 2 and "give a verse form" in err
    code, _, err = run_cli("generate", tiny_zh_model, "--best-of", "3", "--greedy")
    assert code == 2 and "not with --stream, --greedy or beam search" in err
    code, _, err = run_cli("generate", tiny_zh_model, "--rank-by", "logprob")
    assert code == 2 and "--rank-by ranks the samples of --best-of N" in err
