import copy
import json
import shutil

import pytest
import torch

from conftest import ZH_TEXT, write_recipe
from gpt2tune.data.dataset import tokenize_texts
from gpt2tune.errors import UserError
from gpt2tune.method import apply_method, save_trained
from gpt2tune.method.config import METHODS
from gpt2tune.method.io import load_run
from gpt2tune.model.build import load_pretrained
from gpt2tune.model.tokenizer import framing_of, load_tokenizer
from gpt2tune.recipe import TrainSection
from gpt2tune.tasks.common import describe_params
from gpt2tune.train.loop import Data, Trainer

ALL = list(METHODS)
PEFT = ["lora", "prompt-tuning", "prefix-tuning", "ia3", "adapter"]


def load_tiny(folder):
    tok = load_tokenizer(folder)
    fr = framing_of(tok)
    return load_pretrained(folder, fr, len(tok)), tok, fr


def train_few(model, tok, fr, tmp_path, steps=4, lr=1e-2):
    ids, _ = tokenize_texts(tok, ZH_TEXT * 4, fr.bos, fr.eos, 40, False)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = TrainSection(device="cpu", precision="fp32", lr=lr, batch_size=4, max_steps=steps, log_every=1, seed=3)
    trainer = Trainer(model, Data(ids, ids[:4], fr.pad), cfg, tmp_path, progress=False, log=lambda m: None)
    return trainer.fit()


def batch(tok, fr):
    rows = [[fr.bos] + tok(t, add_special_tokens=False)["input_ids"][:12] for t in ZH_TEXT[:2]]
    return torch.tensor(rows)


@pytest.mark.parametrize("name", ALL)
def test_method_trains_exactly_its_parameters(name, tiny_zh_model, tmp_path):
    base, tok, fr = load_tiny(tiny_zh_model)
    base_total = sum(p.numel() for p in base.parameters())  # parameters() yields tied weights once
    model = apply_method(base, METHODS[name](), tokenizer=tok, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable

    params = describe_params(model)
    unique = {id(p): p for p in model.parameters()}.values()
    assert params["trainable"] == sum(p.numel() for p in unique if p.requires_grad)
    assert params["total"] == sum(p.numel() for p in unique)
    assert params["percent"] == pytest.approx(100 * params["trainable"] / params["total"])
    if name == "full":
        assert params["total"] == params["trainable"] == base_total
    elif name in PEFT:
        # the base is all frozen and counted once (tied head + embeddings): total = base + method's own
        assert params["total"] == base_total + params["trainable"]
        assert params["percent"] < 20

    res = train_few(model, tok, fr, tmp_path)
    assert res.steps == 4
    after = dict(model.named_parameters())
    for n, old in before.items():
        if n in trainable:
            assert not torch.equal(old, after[n].detach()), f"{name}: trainable {n} did not change"
        else:
            assert torch.equal(old, after[n].detach()), f"{name}: frozen {n} changed"


def test_lora_outputs_equal_the_merged_model(tiny_zh_model, tmp_path):
    from gpt2tune.method.config import LoraMethod

    base, tok, fr = load_tiny(tiny_zh_model)
    model = apply_method(base, LoraMethod(rank=4, target_modules=["c_attn", "c_proj", "c_fc"]), seed=2)
    train_few(model, tok, fr, tmp_path, steps=3)
    model.eval()
    x = batch(tok, fr)
    with torch.no_grad():
        with_adapter = model(input_ids=x).logits
        with model.disable_adapter():
            without = model(input_ids=x).logits
        merged = copy.deepcopy(model).merge_and_unload()
        assert type(merged).__name__ == "GPT2LMHeadModel"
        assert torch.allclose(merged(input_ids=x).logits, with_adapter, atol=1e-5)
    assert not torch.allclose(with_adapter, without, atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("name", PEFT)
def test_peft_run_saves_only_the_adapter_and_reloads_same_logits(name, tiny_zh_model, tmp_path):
    base, tok, fr = load_tiny(tiny_zh_model)
    model = apply_method(base, METHODS[name](),
                         tokenizer=tok, seed=1)
    train_few(model, tok, fr, tmp_path / "train")
    run = tmp_path / "run"
    run.mkdir()
    assert save_trained(model, tok, run, METHODS[name]()) == "adapter"
    assert not (run / "model").exists() and not (run / "base").exists()  # a pretrained base is referenced
    info = json.loads((run / "adapter" / "rebuild.json").read_text())
    assert info["base"]["path"] == str(tiny_zh_model.resolve()) and info["method"]["name"] == name
    weights = list((run / "adapter").glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size < 200_000  # the base (~0.5 MB) is not in there

    model.eval()
    x = batch(tok, fr)
    loaded, tok2, fr2 = load_run(run, merge=False)
    assert fr2 == fr and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    merged, _, _ = load_run(run)  # LoRA / IA3 fold into the base for inference: a plain GPT-2
    from gpt2tune.generate.fast import fast_supported

    assert (fast_supported(merged) is None) == (name in ("lora", "ia3", "adapter"))  # prompts keep a wrapper
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    if name in ("lora", "ia3", "adapter"):
        from gpt2tune.generate.runner import make_runner

        assert type(make_runner(merged, 16)).__name__ == "FastRunner"


@pytest.mark.parametrize("name", ["lora", "prompt-tuning", "prefix-tuning", "ia3"])
def test_peft_adapters_load_with_plain_peft(name, tiny_zh_model, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    base, tok, fr = load_tiny(tiny_zh_model)
    cfg = METHODS[name]()
    model = apply_method(base, cfg, tokenizer=tok, seed=1)
    train_few(model, tok, fr, tmp_path / "train", steps=2)
    save_trained(model, tok, tmp_path, cfg)
    model.eval()
    x = batch(tok, fr)
    plain = PeftModel.from_pretrained(load_tiny(tiny_zh_model)[0], str(tmp_path / "adapter")).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()  # base from adapter_config
    with torch.no_grad():
        ours = model(input_ids=x).logits
        assert torch.allclose(plain(input_ids=x).logits, ours, atol=1e-6)
        assert torch.allclose(auto(input_ids=x).logits, ours, atol=1e-6)


@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning", "adapter", "lora"])
def test_cached_decoding_matches_full_recomputation(name, tiny_zh_model, tmp_path):
    from gpt2tune.generate.decode import generate_ids
    from gpt2tune.generate.sampling import Sampling

    base, tok, fr = load_tiny(tiny_zh_model)
    model = apply_method(base, METHODS[name](), tokenizer=tok, seed=1)
    train_few(model, tok, fr, tmp_path, steps=3, lr=3e-2)
    model.eval()
    seq = batch(tok, fr)[:1]
    n0 = 4
    with torch.no_grad():
        full = model(input_ids=seq).logits[0, -seq.size(1):]  # prompt tuning also returns the virtual positions
        for with_positions in (True, False):  # a decoding loop may or may not pass position ids
            out = model(input_ids=seq[:, :n0], use_cache=True)
            past, logits = out.past_key_values, [out.logits[0, -1]]
            for i in range(n0, seq.size(1)):
                pos = torch.tensor([[i]]) if with_positions else None
                out = model(input_ids=seq[:, i:i + 1], past_key_values=past, position_ids=pos, use_cache=True)
                past = out.past_key_values
                logits.append(out.logits[0, -1])
            assert torch.allclose(torch.stack(logits), full[n0 - 1:], atol=1e-4), (name, with_positions)
        prompt = seq[0, :3].tolist()
        new = generate_ids(model, prompt, None, Sampling(max_new_tokens=6, greedy=True))[0]
        ids = list(prompt)
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert prompt + new == ids


def test_prompt_tuning_init_text_and_context(tiny_zh_model):
    from gpt2tune.method.config import PromptTuningMethod

    base, tok, fr = load_tiny(tiny_zh_model)
    emb = base.get_input_embeddings().weight.detach().clone()
    model = apply_method(base, PromptTuningMethod(num_virtual_tokens=5, init_text="白日"), tokenizer=tok)
    ids = tok("白日", add_special_tokens=False)["input_ids"]
    prompt = model.peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(prompt[0], emb[ids[0]]) and torch.equal(prompt[2], emb[ids[0]])
    assert torch.equal(prompt[1], emb[ids[1]])
    assert model.config.n_positions == base.config.n_positions - 5
    with pytest.raises(UserError, match="virtual tokens do not fit"):
        apply_method(load_tiny(tiny_zh_model)[0], PromptTuningMethod(num_virtual_tokens=128))


def test_adapter_starts_as_identity_and_detaches(tiny_zh_model):
    from gpt2tune.method.adapter import remove_adapters
    from gpt2tune.method.config import AdapterMethod

    base, tok, fr = load_tiny(tiny_zh_model)
    x = batch(tok, fr)
    base.eval()
    with torch.no_grad():
        ref = base(input_ids=x).logits
        model = apply_method(base, AdapterMethod(bottleneck=8, placement=["mlp"]), seed=0)
        assert torch.equal(model(input_ids=x).logits, ref)  # up-projection starts at zero
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(names) == 2 * 4 and all(".mlp.c_proj.adapter." in n for n in names)  # Pfeiffer: after MLP
        for n, p in model.named_parameters():
            if n.endswith("adapter.up.weight"):
                p.add_(0.1)
        changed = model(input_ids=x).logits
        assert not torch.allclose(changed, ref)
        copy_ = copy.deepcopy(model)  # hooks keep working on copies
        assert torch.equal(copy_(input_ids=x).logits, changed)
        plain = remove_adapters(copy_)
        assert torch.equal(plain(input_ids=x).logits, ref)
        assert not any(".adapter." in n for n in plain.state_dict())
        assert torch.equal(model(input_ids=x).logits, changed)  # the original keeps its adapters


def test_bad_method_settings_are_user_errors(tiny_zh_model, tmp_path):
    from gpt2tune.recipe import recipe_from_dict

    with pytest.raises(UserError, match="unknown GPT-2 module 'q_proj'"):
        recipe_from_dict({"data": {"source": "text:x"}}, ["method.name=lora", "method.target_modules=[q_proj]"])
    with pytest.raises(UserError, match="not among target_modules"):
        recipe_from_dict({"data": {"source": "text:x"}, "method": {"name": "ia3", "target_modules": ["c_attn"]}})
    with pytest.raises(UserError, match="valid fields of method"):
        recipe_from_dict({"data": {"source": "text:x"}, "method": {"name": "adapter", "rank": 4}})
    r = recipe_from_dict({"data": {"source": "text:x"}}, ["method.name=prompt-tuning", "method.num_virtual_tokens=7"])
    assert r.method.num_virtual_tokens == 7


RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
method: {{name: {method}}}
train: {{precision: fp32, lr: 1.0e-2, batch_size: 4, max_steps: {steps}, save_every: 5, log_every: 5, seed: 7}}
output: {{dir: "{out}"}}
"""


def _cli_run(tmp_path, run_cli, method, name, steps=10, extra=()):
    src = tmp_path / "poems.txt"
    src.write_text("\n".join(ZH_TEXT * 10), encoding="utf-8")
    out = tmp_path / name
    r = write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(src=src, out=out, steps=steps, method=method))
    code, _, err = run_cli("train", r, "--no-progress", *extra)
    assert code == 0, err
    return out, r, err


@pytest.mark.parametrize("method", ["prompt-tuning", "adapter"])
def test_scratch_peft_run_via_cli_generates(method, tmp_path, run_cli):
    out, _, err = _cli_run(tmp_path, run_cli, method, "run")
    assert "trainable (" in err
    assert not (out / "model").exists()
    assert (out / "adapter" / "rebuild.json").is_file() and (out / "base" / "config.json").is_file()
    code, stdout, err = run_cli("generate", out, "--prompt", "白日", "--seed", "1", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["text"].startswith("白日")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["validation"]["loss"] < ev["validation_at_start"]["loss"]


def test_resume_with_a_peft_model_is_bit_identical(tmp_path, run_cli):
    from safetensors.torch import load_file

    full, _, _ = _cli_run(tmp_path, run_cli, "lora", "full", steps=10)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-5", part / "checkpoints" / "step-5")
    shutil.copytree(full / "tokenizer", part / "tokenizer")
    ck = load_file(str(part / "checkpoints" / "step-5" / "model.safetensors"))
    assert ck and all(".lora_" in k for k in ck)  # only the trainable (LoRA) tensors, by name
    src = tmp_path / "poems.txt"
    r = write_recipe(tmp_path / "part.yaml", RECIPE.format(src=src, out=part, steps=10, method="lora"))
    code, _, err = run_cli("train", r, "--resume", "--no-progress")
    assert code == 0, err
    assert "resumed from" in err
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_method_config_has_a_registered_implementation():
    from gpt2tune.method import method, method_names

    assert sorted(method_names()) == sorted(METHODS)
    own = {n for n in METHODS if method(n).own_tensors}
    assert own == set(PEFT)  # saved as RUN/adapter/ over a frozen base; the others save RUN/model/
    assert {n for n in METHODS if method(n).mergeable} == {"lora", "ia3"}
    with pytest.raises(UserError, match="unknown method 'bitfit'; known: adapter, full"):
        method("bitfit")


def test_a_new_method_needs_only_its_registration(tiny_zh_model, tmp_path, monkeypatch):
    """A method registered from outside (bias terms only, BitFit-like) trains and saves through the
    same calls as the built-in ones, with no other code edited."""
    from types import SimpleNamespace

    from gpt2tune.method import registry

    def bias_only(model, cfg, tokenizer=None, seed=0):
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
        return model

    from gpt2tune.method import method_names

    method_names()  # the built-in methods registered first, so that the copy below holds them
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the registration ends with the test
    registry.register(registry.Method("bitfit", bias_only))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.Method("bitfit", bias_only))
    base, tok, fr = load_tiny(tiny_zh_model)
    cfg = SimpleNamespace(name="bitfit")
    model = apply_method(base, cfg)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    train_few(model, tok, fr, tmp_path / "train")
    assert save_trained(model, tok, tmp_path, cfg) == "model"
    again, _, _ = load_run(tmp_path)
    ids = batch(tok, fr)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model.eval()(ids).logits, atol=1e-5)


def test_rebuild_json_with_a_wrong_format_is_a_user_error(tiny_zh_model, tmp_path):
    base, tok, fr = load_tiny(tiny_zh_model)
    model = apply_method(base, METHODS["lora"](), tokenizer=tok, seed=1)
    save_trained(model, tok, tmp_path, METHODS["lora"]())
    rebuild = tmp_path / "adapter" / "rebuild.json"
    info = json.loads(rebuild.read_text())
    rebuild.write_text(json.dumps({**info, "format": "gpt2tune-adapter"}))
    with pytest.raises(UserError, match="rebuild.json: unknown adapter format 'gpt2tune-adapter' for method 'lora'"):
        load_run(tmp_path)
    rebuild.write_text(json.dumps({**info, "method": {"name": "bitfit"}}))
    with pytest.raises(UserError, match="rebuild.json: unknown method 'bitfit'"):
        load_run(tmp_path)
