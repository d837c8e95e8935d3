"""task: preference (DPO, ORPO): losses against hand-derived values and TRL's implementation, pair
framing (response tokens only, padding never counted), the reference model, and training runs that
learn to prefer the chosen responses of held-out pairs."""

import collections
import contextlib
import copy
import importlib.util
import json
import math
import random
import types

import pytest
import torch

from conftest import GPT2_BPE, ZH_TEXT, need
from gpt2tune.data.preference import Pair, Side, collate_pairs, items_of
from gpt2tune.errors import UserError
from gpt2tune.train.preference import PreferenceLoss, dpo_loss, log1mexp, orpo_loss

sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


# -- losses by hand -----------------------------------------------------------------------------


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: (pc-rc) - (pr-rr) = 1 - (-0.5) = 1.5; pair 2: 1 - (-1) = 2
    assert losses.tolist() == pytest.approx([-math.log(sigmoid(0.75)), -math.log(sigmoid(1.0))], abs=1e-6)
    assert cr.tolist() == pytest.approx([0.5, 0.5]) and rj.tolist() == pytest.approx([-0.25, -0.5])


def test_orpo_loss_by_hand():
    # mean per-token log-probs: chosen log 0.5, rejected log 0.2 -> odds 1 and 0.25
    mc, mr = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, cr, rj = orpo_loss(torch.tensor(2.0), mc, mr, lam=0.1)
    assert float(loss) == pytest.approx(2.0 - 0.1 * math.log(sigmoid(math.log(1.0 / 0.25))), abs=1e-6)
    assert float(cr) == pytest.approx(0.1 * math.log(0.5)) and float(rj) == pytest.approx(0.1 * math.log(0.2))
    x = torch.tensor([-1e-6, -0.3, -0.7, -5.0, -40.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(-torch.expm1(x)), rtol=1e-10)


class TableModel(torch.nn.Module):
    """Logits from a fixed table: at every position, next-token probabilities `probs` (vocab 4)."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(logits=self.logits.expand(*input_ids.shape, 4).clone())


def test_pair_losses_count_response_tokens_only():
    """Sequences with known per-token probabilities: p(1)=0.5, p(2)=0.25, p(3)=0.125 everywhere.
    Prompt tokens (3s) and padding must not count."""
    model = TableModel([0.125, 0.5, 0.25, 0.125])
    chosen = Side([3, 3, 3, 1, 1], [-100, -100, -100, 1, 1])  # response: two tokens of p 0.5
    rejected = Side([3, 3, 3, 2, 2, 2], [-100, -100, -100, 2, 2, 2])  # three tokens of p 0.25
    batch = collate_pairs([Pair(chosen, rejected, ref=(-3.0, -2.0))], pad_id=3)
    lc, lr_ = 2 * math.log(0.5), 3 * math.log(0.25)
    loss, n, correct = PreferenceLoss("dpo", 0.1)(model, batch)
    assert n == 1 and int(correct) == 1
    assert float(loss) == pytest.approx(-math.log(sigmoid(0.1 * ((lc + 3.0) - (lr_ + 2.0)))), abs=1e-6)
    mc, mr = lc / 2, lr_ / 3
    log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
    loss, _, _ = PreferenceLoss("orpo", 0.1)(model, batch)
    assert float(loss) == pytest.approx(-mc - 0.1 * math.log(sigmoid(log_odds)), abs=1e-6)
    # ORPO with the NLL on the whole chosen row (TRL): prompt tokens 2 and 3 (p 0.125) count too
    loss, _, _ = PreferenceLoss("orpo", 0.1, nll_on="sequence")(model, batch)
    nll = -(2 * math.log(0.125) + lc) / 4
    assert float(loss) == pytest.approx(nll - 0.1 * math.log(sigmoid(log_odds)), abs=1e-6)


def _tiny_gpt2(seed=0, vocab=50):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def _random_pairs(spec, seed=1, vocab=50):
    g = torch.Generator().manual_seed(seed)

    def side(p, r):
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        return Side(ids, [-100] * p + ids[p:])

    return [Pair(side(p, a), side(p, b), ref=ref) for p, a, b, ref in spec]


PAIRS = [(3, 4, 6, (-20.0, -23.5)), (5, 2, 5, (-9.0, -17.0)), (2, 7, 3, (-30.0, -12.0))]


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_padding_never_counts(kind):
    """A pair's loss is the same alone and beside a longer pair (its padding, in a real GPT-2)."""
    model = _tiny_gpt2()
    short, long_ = _random_pairs([(2, 2, 3, (-5.0, -6.0)), (6, 9, 9, (-30.0, -31.0))])
    fn = PreferenceLoss(kind, 0.1, nll_on="response")
    with torch.no_grad():
        alone = fn.stats(model, collate_pairs([short], 0))
        both = fn.stats(model, collate_pairs([short, long_], 0))
    assert float(both["pair_losses"][0]) == pytest.approx(float(alone["pair_losses"][0]), abs=1e-5)
    assert float(both["logps"][0]) == pytest.approx(float(alone["logps"][0]), abs=1e-4)
    assert float(both["logps"][2]) == pytest.approx(float(alone["logps"][1]), abs=1e-4)


# -- against TRL's implementation -------------------------------------------------------------

has_trl = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not has_trl, reason="trl is not installed (pip install -c constraints.txt trl)")


def _accelerator():
    ident = lambda x: x  # noqa: E731
    return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=ident, gather=ident,
                                 unwrap_model=ident)


@needs_trl
@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5])
def test_dpo_equals_trl(rpo_alpha):
    """TRL's DPOTrainer loss (loss_type sigmoid, precomputed reference log-probs) on the same model and
    batch: the same loss, rewards, reward accuracy and margin. With rpo_alpha: TRL's loss types
    [sigmoid, sft] weighted [1, rpo_alpha] (the NLL of the chosen completions: RPO)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_gpt2()
    pairs = _random_pairs(PAIRS)
    batch = collate_pairs(pairs, pad_id=0)
    ours = PreferenceLoss("dpo", 0.1, rpo_alpha=rpo_alpha)
    loss, n, correct = ours(model, batch)
    ev = ours.evaluate(model, [batch], lambda b: b, contextlib.nullcontext)

    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    fake = types.SimpleNamespace(
        model=theirs, accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=["sigmoid", "sft"] if rpo_alpha else ["sigmoid"],
        loss_weights=[1.0, rpo_alpha] if rpo_alpha else [1.0], beta=0.1, use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    B = len(pairs)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["response_labels"] != -100).long(),
              "ref_chosen_logps": batch["ref_logps"][:B], "ref_rejected_logps": batch["ref_logps"][B:]}
    trl_loss = DPOTrainer._compute_loss(fake, theirs, inputs, False)
    m = fake._metrics["eval"]
    assert float(loss.detach()) == pytest.approx(float(trl_loss), abs=1e-6)
    assert ev["loss"] == pytest.approx(float(trl_loss), abs=1e-6)
    assert ev["reward_accuracy"] == pytest.approx(m["rewards/accuracies"][0])
    assert ev["reward_margin"] == pytest.approx(m["rewards/margins"][0], abs=1e-6)
    assert ev["chosen_reward"] == pytest.approx(m["rewards/chosen"][0], abs=1e-6)
    assert ev["chosen_logps"] == pytest.approx(m["logps/chosen"][0], abs=1e-4)


@needs_trl
@pytest.mark.parametrize("nll_on", ["sequence", "response"])
def test_orpo_equals_trl(nll_on):
    """TRL's ORPOTrainer on the same model and batch. TRL's NLL term covers the whole chosen row
    (prompt included): equal with orpo_nll sequence; with response (the default) the odds-ratio part
    is TRL's and the NLL is over the response tokens."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = _tiny_gpt2()
    pairs = _random_pairs(PAIRS)
    batch = collate_pairs(pairs, pad_id=0)
    loss, n, correct = PreferenceLoss("orpo", 0.1, nll_on=nll_on)(model, batch)

    fake = types.SimpleNamespace(beta=0.1, is_encoder_decoder=False, padding_value=0, accelerator=_accelerator(),
                                 aux_loss_enabled=False, concatenated_inputs=ORPOTrainer.concatenated_inputs,
                                 get_batch_logps=ORPOTrainer.get_batch_logps)
    fake.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(fake, c, r)
    fake.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(fake, m, b)
    B = len(pairs)
    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["response_labels"]}
    ob = {f"{side}_{k}": v[sl] for side, sl in (("chosen", slice(0, B)), ("rejected", slice(B, None))) for k, v in rows.items()}
    trl_loss, metrics = ORPOTrainer.get_batch_loss_metrics(fake, model, ob)
    if nll_on == "sequence":
        assert float(loss.detach()) == pytest.approx(float(trl_loss), abs=1e-5)
    else:
        lp = torch.log_softmax(model(input_ids=batch["input_ids"][:B]).logits[:, :-1].float(), -1)
        tgt = batch["response_labels"][:B, 1:]
        mask = tgt != -100
        nll = -(lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
        assert float(loss.detach()) == pytest.approx(float(trl_loss) - metrics["nll_loss"] + float(nll), abs=1e-5)
    assert int(correct) / B == pytest.approx(metrics["rewards/accuracies"])


# -- data --------------------------------------------------------------------------------------


def test_record_forms():
    msgs = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
    recs = [
        {"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6"},
        # UltraFeedback: the prompt string repeats the user's turn; the shared prefix is the prompt
        {"prompt": "add 2 and 3", "chosen": msgs(("user", "add 2 and 3"), ("assistant", "5")),
         "rejected": msgs(("user", "add 2 and 3"), ("assistant", "6"))},
        # TRL's explicit form: prompt messages, answers only
        {"prompt": msgs(("system", "Be terse."), ("user", "hi")), "chosen": msgs(("assistant", "Hello.")),
         "rejected": msgs(("assistant", "Go away."))},
        {"prompt": "same", "chosen": " x", "rejected": " x"},  # nothing to prefer: skipped
    ]
    items, skipped = items_of(recs, "jsonl:x.jsonl")
    assert skipped == 1 and len(items) == 3
    assert (items[0].prompt, items[0].chosen, items[0].rejected) == ("Q: 2+3=", " 5", " 6")
    assert items[1].prompt == msgs(("user", "add 2 and 3")) and items[1].chosen == msgs(("assistant", "5"))
    assert items[2].prompt == msgs(("system", "Be terse."), ("user", "hi"))
    assert items[2].rejected == msgs(("assistant", "Go away."))


def test_bad_record_names_file_and_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n\n{"prompt": "a", "chosen": " b"}\n',
                 encoding="utf-8")
    from gpt2tune.data.sources import load_source

    with pytest.raises(UserError) as e:
        items_of(load_source(f"jsonl:{f}").records, f"jsonl:{f}")
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: no field 'rejected'") and "\n" not in msg
    f.write_text('{"prompt": "a", "chosen": " b", "rejected": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"pairs.jsonl:1: 'chosen' and 'rejected' must both be strings"):
        items_of(load_source(f"jsonl:{f}").records, f"jsonl:{f}")


@pytest.fixture(scope="module")
def gpt2_tok():
    from gpt2tune.model.tokenizer import load_tokenizer

    return load_tokenizer(need(GPT2_BPE))


def _labelled(tok, side):
    return tok.decode([i for i, l in zip(side.ids, side.labels) if l != -100])


def test_only_responses_are_labelled(gpt2_tok):
    from gpt2tune.chat.preference import encode_pairs
    from gpt2tune.chat.template import make_template
    from gpt2tune.model.tokenizer import framing_of

    tok = gpt2_tok
    recs = [{"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6, I think"},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
                        {"role": "user", "content": "Bye"}],
             "chosen": [{"role": "assistant", "content": "Bye."}], "rejected": [{"role": "assistant", "content": "No."}]}]
    items, _ = items_of(recs, "x")
    tpl = make_template("plain", tok, framing_of(tok))
    rows, st = encode_pairs(tok, items, tpl, "<|endoftext|>", "<|endoftext|>", 64)
    text, chat = rows
    assert tok.decode(text.chosen.ids) == "<|endoftext|>Q: 2+3= 5<|endoftext|>"
    assert _labelled(tok, text.chosen) == " 5<|endoftext|>"
    assert _labelled(tok, text.rejected) == " 6, I think<|endoftext|>"
    # the prompt's earlier assistant turn is context, not trained
    assert tok.decode(chat.chosen.ids) == ("<|endoftext|>User: Hi\nAssistant: Hey.<|endoftext|>\nUser: Bye\n"
                                           "Assistant: Bye.<|endoftext|>\n")
    assert _labelled(tok, chat.chosen) == " Bye.<|endoftext|>"
    assert _labelled(tok, chat.rejected) == " No.<|endoftext|>"
    assert st.response_tokens == sum(s.trained for p in rows for s in (p.chosen, p.rejected))


def test_long_pairs_keep_responses_and_cut_prompts_alike(gpt2_tok):
    from gpt2tune.chat.preference import encode_pairs

    tok = gpt2_tok
    prompt = " ".join(f"word{i}" for i in range(40))
    items, _ = items_of([{"prompt": prompt, "chosen": " no", "rejected": " yes indeed"}], "x")
    (row,), st = encode_pairs(tok, items, None, "<|endoftext|>", "<|endoftext|>", 16)
    assert st.prompt_cut == 1 and max(len(row.chosen), len(row.rejected)) <= 16
    assert row.chosen.ids[0] == row.rejected.ids[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert _labelled(tok, row.chosen) == " no<|endoftext|>" and _labelled(tok, row.rejected) == " yes indeed<|endoftext|>"
    prompt_of = lambda s: [i for i, l in zip(s.ids, s.labels) if l == -100]  # noqa: E731
    assert prompt_of(row.chosen) == prompt_of(row.rejected)  # the same context for both
    assert tok.decode(prompt_of(row.chosen)).endswith("word39")


# -- the reference model -----------------------------------------------------------------------


@pytest.mark.parametrize("method", [{"name": "lora", "rank": 4, "target_modules": ["c_attn"]},
                                    {"name": "adapter", "bottleneck": 8}, {"name": "prompt-tuning"}])
def test_reference_is_the_base_with_the_adapter_off(method):
    """The reference log-probs of an adapter method are the base model's, even once the adapter has
    moved away from identity; the policy's differ."""
    from gpt2tune.method import apply_method
    from gpt2tune.recipe import recipe_from_dict
    from gpt2tune.tasks.preference import adapters_off

    base = _tiny_gpt2()
    batch = collate_pairs(_random_pairs(PAIRS), 0)
    fn = PreferenceLoss("dpo", 0.1)
    with torch.no_grad():
        want = fn.stats(base, {**batch, "ref_logps": torch.zeros(6)})["logps"]
    cfg = recipe_from_dict({"data": {"source": "text:x"}, "method": method}).method
    model = apply_method(copy.deepcopy(base), cfg, seed=0).eval()  # (new modules, such as LoRA's dropout, start in train mode)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    with torch.no_grad(), adapters_off(model):
        ref = fn.stats(model, {**batch, "ref_logps": torch.zeros(6)})["logps"]
    with torch.no_grad():
        policy = fn.stats(model, {**batch, "ref_logps": torch.zeros(6)})["logps"]
    assert torch.allclose(ref, want, atol=1e-4)
    assert not torch.allclose(policy, want, atol=1e-2)
    # and the loss computes its reference that way: at the perturbed policy, rewards = beta*(policy - base)
    no_ref = {k: v for k, v in batch.items() if k != "ref_logps"}
    s = PreferenceLoss("dpo", 0.1, reference=adapters_off).stats(model, no_ref)
    assert torch.allclose(torch.cat([s["chosen_rewards"], s["rejected_rewards"]]), 0.1 * (policy - want), atol=1e-4)


# -- training runs ----------------------------------------------------------------------------

A, B, C = "白日依山盡黃河入海流", "床前明月光疑是地上霜", "春眠不覺曉處處聞啼鳥夜來風雨聲"


def _write_pairs(path, n, seed):
    """Prompts of random characters; chosen responses from one set of characters, rejected from another."""
    rng = random.Random(seed)
    rows = [{"prompt": "".join(rng.choices(C, k=rng.randint(3, 8))), "chosen": "".join(rng.choices(A, k=4)),
             "rejected": "".join(rng.choices(B, k=4))} for _ in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    _write_pairs(d / "train.jsonl", 200, 1)
    _write_pairs(d / "val.jsonl", 40, 2)  # held-out pairs: other prompts and responses
    return d


def _recipe(model_dir, files, out, loss, method, lr, steps=30, **extra):
    from gpt2tune.recipe import recipe_from_dict

    return recipe_from_dict({
        "task": "preference", "model": {"name": str(model_dir)},
        "data": {"source": f"jsonl:{files}/train.jsonl", "validation": f"jsonl:{files}/val.jsonl", "max_length": 32},
        "method": method, "preference": {"loss": loss, "beta": 0.1, **extra},
        "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "precision": "fp32", "eval_every": 10,
                  "num_threads": 1, "seed": 3},
        "output": {"dir": str(out)}})


@pytest.mark.parametrize("loss,method,lr", [("dpo", {"name": "lora", "rank": 8}, 1e-2),
                                            ("orpo", {"name": "full"}, 3e-3)])
def test_training_prefers_chosen_on_held_out_pairs(tmp_path, tiny_zh_model, pair_files, loss, method, lr):
    from gpt2tune.tasks import run_recipe

    rep = run_recipe(_recipe(tiny_zh_model, pair_files, tmp_path / "run", loss, method, lr), progress=False)
    start, end = rep["validation_at_start"], rep["validation"]
    assert end["pairs"] == 40
    assert start["reward_accuracy"] <= 0.7 and end["reward_accuracy"] >= 0.9
    assert end["reward_margin"] > start["reward_margin"] + 0.05
    # the chosen-vs-rejected log-probability margin grows on held-out pairs
    assert end["chosen_logps"] - end["rejected_logps"] > start["chosen_logps"] - start["rejected_logps"] + 1.0
    if loss == "dpo":  # the reference is the model before training: the loss starts at log 2
        assert start["loss"] == pytest.approx(math.log(2), abs=1e-5)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "validation"]
    assert {"loss", "reward_accuracy", "reward_margin"} <= set(val[0]) and len(val) == 4
    assert json.loads((tmp_path / "run" / "data.json").read_text())["train_pairs"] == 200
    # the saved model, scored by a plain forward: held-out chosen responses are now the likelier ones
    from gpt2tune.method.io import load_run

    model, tok, _ = load_run(tmp_path / "run")
    won = 0
    for rec in map(json.loads, (pair_files / "val.jsonl").read_text(encoding="utf-8").splitlines()):
        lp = []
        for resp in (rec["chosen"], rec["rejected"]):
            p_ids = tok(rec["prompt"])["input_ids"][:-1]  # [CLS] prompt
            ids = p_ids + tok(resp, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            tok_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
            lp.append(float(tok_lp[len(p_ids) - 1:].sum()))
        won += lp[0] > lp[1]
    assert won >= 36  # of 40


def test_dpo_full_precomputes_the_reference(tmp_path, tiny_zh_model, pair_files, capfd):
    from gpt2tune.tasks import run_recipe

    r = _recipe(tiny_zh_model, pair_files, tmp_path / "run", "dpo", {"name": "full"}, 3e-3, steps=3)
    r = r.model_copy(update={"train": r.train.model_copy(update={"log_every": 1})})
    rep = run_recipe(r, progress=False)
    err = capfd.readouterr().err
    assert "reference: precompute" in err and "reference log-probs of 240 pairs" in err
    assert rep["validation_at_start"]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rep["validation"]["loss"] < math.log(2)
    # the first step's loss, in train mode, is log 2 too: dropout (0.1 in this model) is off, as in TRL
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["split"] == "train" and first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(UserError, match="preference.reference: adapter needs a method that adds weights"):
        run_recipe(_recipe(tiny_zh_model, pair_files, tmp_path / "r2", "dpo", {"name": "full"}, 3e-3,
                           reference="adapter"), progress=False)


def test_compare_preference(tmp_path, tiny_zh_model, pair_files, monkeypatch):
    """compare trains each method (here in this process) and tabulates reward accuracy and margin."""
    from gpt2tune.tasks import compare as cmp

    monkeypatch.setattr(cmp, "run_job", lambda job, path, label, log: cmp.work(job))
    r = _recipe(tiny_zh_model, pair_files, tmp_path / "runs", "dpo", {"name": "full"}, 3e-3, steps=10)
    ref = tmp_path / "reference.txt"  # forgetting: perplexity of this text before and after
    ref.write_text("\n".join(ZH_TEXT) + "\n", encoding="utf-8")
    r = r.model_copy(update={"compare": r.compare.model_copy(update={"lr": {"lora": 1e-2}, "reference": f"text:{ref}"})})
    res = cmp.compare(r, methods=["full", "lora"], output=str(tmp_path / "cmp"), progress=False)
    rows = {row["method"]: row for row in res["rows"]}
    assert rows["full"]["reward_accuracy"] > 80 and rows["lora"]["reward_accuracy"] > 80
    assert rows["lora"]["lr"] == 1e-2 and rows["full"]["reward_margin"] > 0
    assert "reward acc after %" in res["table"]
    assert rows["full"]["ref_ppl_before"] == rows["lora"]["ref_ppl_before"] > 1 and rows["lora"]["ref_ppl_after"] > 1
    assert (tmp_path / "cmp" / "comparison.png").is_file()


def test_resume_continues_exactly(tmp_path, tiny_zh_model, pair_files):
    """DPO, full fine-tuning: a run resumed from its step-3 checkpoint ends with the weights of the run
    that was never stopped (the reference log-probs are those of the model before training again)."""
    import shutil

    from safetensors.torch import load_file

    from gpt2tune.tasks import run_recipe

    def recipe(out):
        r = _recipe(tiny_zh_model, pair_files, out, "dpo", {"name": "full"}, 3e-3, steps=6)
        return r.model_copy(update={"train": r.train.model_copy(update={"save_every": 3, "eval_every": 0})})

    run_recipe(recipe(tmp_path / "a"), progress=False)
    run_recipe(recipe(tmp_path / "b"), progress=False)
    for gone in ("model", "eval.json", "checkpoints/step-6"):
        shutil.rmtree(tmp_path / "b" / gone) if (tmp_path / "b" / gone).is_dir() else (tmp_path / "b" / gone).unlink()
    run_recipe(recipe(tmp_path / "b"), resume=True, progress=False)
    a, b = (load_file(str(tmp_path / x / "model" / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
