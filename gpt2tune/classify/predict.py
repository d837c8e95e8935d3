"""Classify texts with a trained classifier: `encode` (shared with training),
`predict(model, tokenizer, texts)` and `load_classifier(RUN_OR_MODEL)`.

Texts are encoded the tokenizer's own way (`tokenizer(text)`: GPT-2 BPE adds no marker,
BERT-style vocabularies add `[CLS] ... [SEP]`), so `transformers`' own pipeline sees the
same ids, and cut to the training `max_length` (saved as the tokenizer's
`model_max_length`). Batches are right-padded and pooled on the last real token.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Optional, Sequence

import torch

from gpt2tune.data.dataset import pad_rows
from gpt2tune.errors import UserError
from gpt2tune.model.quiet import quiet_transformers
from gpt2tune.model.tokenizer import framing_of, load_tokenizer


def context_limit(model, tokenizer, max_length: Optional[int] = None) -> int:
    limit = int(getattr(model.config, "n_positions", 1024))
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        limit = tok_max
    if max_length:
        limit = min(limit, max_length)
    return limit


def encode(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text (the tokenizer's own special tokens, literal marker strings kept
    as text) cut to `max_length`; also how many were cut."""
    if not texts:
        return [], 0
    with quiet_transformers():
        enc = tokenizer(list(texts), split_special_tokens=True)["input_ids"]
        long = [i for i, ids in enumerate(enc) if len(ids) > max_length]
        if long:
            cut = tokenizer([texts[i] for i in long], split_special_tokens=True, truncation=True,
                            max_length=max_length)["input_ids"]
            for i, ids in zip(long, cut):
                enc[i] = ids
    out = []
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    for ids in enc:
        out.append(list(ids) if len(ids) else [fallback])
    return out, len(long)


def _pad_batch(rows: list[list[int]], pad_id: int, device) -> dict:
    ids, mask = pad_rows(rows, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def id2label_of(model) -> dict[int, str]:
    cfg = getattr(model, "config", None)
    m = getattr(cfg, "id2label", None) or {}
    return {int(k): str(v) for k, v in m.items()}


@torch.no_grad()
def predict_ids(model, rows: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (n, C) for encoded rows, in their order (batched by length)."""
    if not rows:
        return torch.zeros((0, len(id2label_of(model)) or 1))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probs = [None] * len(rows)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        batch = _pad_batch([rows[i] for i in chunk], pad_id, device)
        logits = model(**batch).logits.float()
        p = torch.softmax(logits, -1).cpu()
        for j, i in enumerate(chunk):
            probs[i] = p[j]
    model.train(was_training)
    return torch.stack(probs)


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: Optional[int] = None) -> list[dict]:
    """Classify `texts`. One dict per text, in order:
    `{"label": str, "probability": float, "probabilities": {label: float, ...}}`
    (probabilities in label-id order)."""
    if isinstance(texts, str):
        texts = [texts]
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    names = id2label_of(model)
    if not names:
        raise UserError("this model has no labels (id2label); is it a classification model?")
    rows, _ = encode(tokenizer, texts, context_limit(model, tokenizer, max_length))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else framing_of(tokenizer).pad
    probs = predict_ids(model, rows, pad, batch_size)
    out = []
    for p in probs:
        k = int(p.argmax())
        out.append({"label": names[k], "probability": float(p[k]),
                    "probabilities": {names[c]: float(p[c]) for c in range(p.numel())}})
    return out


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {folder / 'config.json'}: {err}") from None


def _check_classifier(folder: Path) -> None:
    cfg = _read_config(folder)
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "gpt2" or not any("SequenceClassification" in a or a == "GPT2Classifier" for a in archs):
        raise UserError(f"{folder} is not a GPT-2 classifier (architectures: {', '.join(archs) or 'none'}); "
                        f"train one with a recipe that has task: classification")


def _load_base(folder: Path):
    from gpt2tune.classify.model import GPT2Classifier

    _check_classifier(folder)
    with quiet_transformers():
        try:
            return GPT2Classifier.from_pretrained(str(folder), attn_implementation="sdpa")
        except pickle.UnpicklingError:
            raise UserError(f"refused to load {folder}: its legacy .bin weights hold more than tensors "
                            "(a pickle that could run code); use safetensors weights") from None
        except (OSError, ValueError) as err:
            raise UserError(f"could not load the classifier in {folder}: {str(err).splitlines()[0]}") from None


def load_classifier(path: str | Path):
    """(model, tokenizer) of a classification run (RUN/model, or RUN/adapter on its base) or of a
    classifier folder, in eval mode on the CPU."""
    from gpt2tune.method.io import adapter_folder, base_folder, load_method, read_rebuild

    p = Path(path)
    ad = None if (p / "model" / "config.json").is_file() else adapter_folder(p)
    if ad is None:
        folder = p / "model" if (p / "model" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise UserError(f"{p} is neither a classification run folder (with model/ or adapter/) nor a model folder")
        _check_classifier(folder)
        tok = load_tokenizer(folder)
        framing_of(tok)
        model = _load_base(folder)
    else:
        info = read_rebuild(ad)
        base_dir = base_folder(ad, info)
        tok_dir = (ad / info.get("tokenizer", "../tokenizer")).resolve()
        tok = load_tokenizer(tok_dir if tok_dir.is_dir() else base_dir)
        framing_of(tok)
        model = _load_base(base_dir)
        model = load_method(model, ad, info)
    model.eval()
    return model, tok
