"""A short model card (README.md) for an exported folder: base, data, method, metrics, usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml


def _read(path: Path, kind: str) -> Optional[dict]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def model_card(run: Path, out: Path, method: str, layout: str) -> str:
    recipe = _read(run / "recipe.yaml", "yaml") or {}
    ev = _read(run / "eval.json", "json") or {}
    data = _read(run / "data.json", "json") or {}
    model_cfg = recipe.get("model", {}) or {}
    method_cfg = recipe.get("method") or {"name": method}
    base = model_cfg.get("name") or (f"a {model_cfg.get('size')} GPT-2 trained from scratch"
                                     if model_cfg.get("init") == "scratch" else "unknown")
    lib = "peft" if layout == "base+adapter" and method != "adapter" else "transformers"
    lines = ["---", f"library_name: {lib}", "pipeline_tag: text-generation",
             f"tags: [gpt2tune, gpt2, {method}]", "---", "", f"# {out.resolve().name}", "",
             f"A GPT-2 model fine-tuned with [gpt2tune](https://pypi.org/project/gpt2tune/) "
             f"(method **{method}**) from {base}."]
    d = recipe.get("data") or {}
    if d:
        lines += ["", "## Data", "", f"- source: `{d.get('source')}`"]
        if data:
            lines.append(f"- {data.get('train_samples', '?')} training samples, "
                         f"{data.get('validation_samples', '?')} validation samples")
        lines.append(f"- at most {d.get('max_length')} tokens per sample")
    lines += ["", "## Method", "", "```json", json.dumps(method_cfg, ensure_ascii=False), "```"]
    params = ev.get("parameters")
    if params:
        lines.append(f"{params['trainable']:,} of {params['total']:,} parameters trained ({params['percent']:.2f}%).")
    t = recipe.get("train") or {}
    if t:
        lines.append(f"Learning rate {t.get('lr')}, batch size {t.get('batch_size')}, "
                     f"{ev.get('steps', t.get('max_steps'))} steps, seed {t.get('seed')}.")
    val, start = ev.get("validation") or {}, ev.get("validation_at_start") or {}
    if val:
        lines += ["", "## Metrics (validation)", "", "| | loss | perplexity |", "|---|---|---|"]
        if start:
            lines.append(f"| before fine-tuning | {_fmt(start.get('loss'))} | {_fmt(start.get('perplexity'))} |")
        lines.append(f"| after fine-tuning | {_fmt(val.get('loss'))} | {_fmt(val.get('perplexity'))} |")
    lines += ["", "## Use", "", "```python"]
    if layout == "base+adapter" and method != "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'tok = AutoTokenizer.from_pretrained("DIR")',
                  'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("DIR"), "DIR/adapter")']
    elif layout == "base+adapter":
        lines += ["# bottleneck adapters are gpt2tune's own format: load with gpt2tune", "# $ gpt2tune generate DIR",
                  "from gpt2tune.method.io import load_run", 'model, tok, framing = load_run("DIR")']
    else:
        lines += ["from transformers import pipeline", "",
                  'generate = pipeline("text-generation", model="DIR")']
    lines += ["```", "", "(`DIR`: this folder or its hub id.)", ""]
    return "\n".join(lines)
