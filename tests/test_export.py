import json

import pytest
import torch

from conftest import ZH_TEXT, write_recipe

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data}}
data: {{source: "text:{src}", val_fraction: 0.2, max_length: 40}}
method: {{name: {method}}}
train: {{precision: fp32, lr: 1.0e-2, batch_size: 4, max_steps: 6, log_every: 3, seed: 5}}
output: {{dir: "{out}"}}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished nano runs for a few methods (trained once for the module)."""
    from gpt2tune.cli import main

    root = tmp_path_factory.mktemp("export_runs")
    src = root / "poems.txt"
    src.write_text("\n".join(ZH_TEXT * 10), encoding="utf-8")
    out = {}
    for method in ("full", "lora", "adapter", "prompt-tuning"):
        r = write_recipe(root / f"{method}.yaml", RECIPE.format(src=src, out=root / method, method=method))
        assert main(["train", str(r), "--no-progress"]) == 0
        out[method] = root / method
    return out


def ids_for(tok):
    return torch.tensor([tok("[CLS]白日依山盡，黃河", add_special_tokens=False)["input_ids"]])


def run_logits(run, x):
    from gpt2tune.method.io import load_run

    model, _, _ = load_run(run)
    with torch.no_grad():
        return model(input_ids=x).logits


def test_merged_lora_export_is_a_plain_transformers_model(runs, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    out = tmp_path / "merged"
    code, stdout, err = run_cli("export", runs["lora"], "--output", out, "--merge")
    assert code == 0, err
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "README.md"):
        assert (out / f).is_file(), f
    assert not (out / "adapter").exists() and not (out / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(plain).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in n for n, _ in plain.named_parameters())
    x = ids_for(tok)
    with torch.no_grad():
        merged = plain(input_ids=x).logits
    assert torch.allclose(merged, run_logits(runs["lora"], x), atol=1e-5)
    # the merge changed the weights: the base alone gives other logits
    base = AutoModelForCausalLM.from_pretrained(str(runs["lora"] / "base")).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=x).logits, merged, atol=1e-4)
    assert isinstance(pipeline("text-generation", model=str(out))("白日", max_new_tokens=4)[0]["generated_text"], str)
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "**lora**" in card and "poems.txt" in card
    ev = json.loads((runs["lora"] / "eval.json").read_text())
    assert f"{ev['validation']['perplexity']:.4g}" in card


def test_unmerged_export_is_base_plus_peft_adapter(runs, tmp_path, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sep"
    code, _, err = run_cli("export", runs["lora"], "--output", out)
    assert code == 0, err
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(out))
    x = ids_for(tok)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(out)), str(out / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, run_logits(runs["lora"], x), atol=1e-6)
    assert "library_name: peft" in (out / "README.md").read_text()
    # the export folder is self-contained for gpt2tune too
    code, stdout, err = run_cli("generate", out, "--prompt", "白日", "--seed", "1", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["text"].startswith("白日")


@pytest.mark.parametrize("method", ["adapter", "prompt-tuning"])
def test_unmergeable_methods_say_so_and_export_separately(method, runs, tmp_path, run_cli):
    out = tmp_path / "x"
    code, _, err = run_cli("export", runs[method], "--output", out, "--merge")
    assert code == 2 and f"method {method} cannot be merged" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, _, err = run_cli("export", runs[method], "--output", out)
    assert code == 0, err
    from gpt2tune.method.io import load_run

    _, tok, _ = load_run(out)
    x = ids_for(tok)
    assert torch.equal(run_logits(out, x), run_logits(runs[method], x))


def test_full_run_export_and_overwrite_guard(runs, tmp_path, run_cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    assert run_cli("export", runs["full"], "--output", out)[0] == 0
    x = ids_for(AutoTokenizer.from_pretrained(str(out)))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=x).logits
    assert torch.equal(logits, run_logits(runs["full"], x))
    code, _, err = run_cli("export", runs["full"], "--output", out)
    assert code == 2 and "--overwrite" in err
    assert run_cli("export", runs["full"], "--output", out, "--overwrite")[0] == 0
    code, _, err = run_cli("export", tmp_path / "nothing-here", "--output", tmp_path / "o2")
    assert code == 2 and "nothing-here" in err
