"""Text in, text out: frame the prompt like a training sample, decode without specials."""

from __future__ import annotations

from pathlib import Path

from gpt2tune.errors import UserError
from gpt2tune.generate.sampling import Sampling, generate_ids
from gpt2tune.model.build import load_pretrained
from gpt2tune.model.resolve import resolve_model_dir
from gpt2tune.model.tokenizer import decode, framing_of, load_tokenizer


def model_folder(path: str | Path) -> Path:
    """A run folder means its model/; anything else is a model folder or hub id."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"{p} is neither a run folder with a finished model/ nor a model folder")
    return resolve_model_dir(str(path))


def load_for_inference(path: str | Path):
    folder = model_folder(path)
    tok = load_tokenizer(folder)
    framing = framing_of(tok)
    model = load_pretrained(folder, framing, len(tok))
    model.eval()
    return model, tok, framing


def complete(model, tok, framing, prompt: str, s: Sampling) -> list[str]:
    ids = ([framing.bos] if framing.bos is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("empty prompt and the tokenizer has no begin marker to start from")
    try:
        outs = generate_ids(model, ids, framing.eos, s, suppress_ids=tok.all_special_ids)
    except ValueError as err:
        raise UserError(str(err)) from None
    return [prompt + decode(tok, o) for o in outs]
