"""Load what a run saved, whatever the method: a run folder means RUN/model (or RUN/adapter)."""

from __future__ import annotations

from pathlib import Path

from gpt2tune.errors import UserError
from gpt2tune.model.build import load_pretrained
from gpt2tune.model.resolve import resolve_model_dir
from gpt2tune.model.tokenizer import framing_of, load_tokenizer


def model_folder(path: str | Path) -> Path:
    """A run folder means its model/; anything else is a model folder or hub id."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"{p} is neither a run folder with a finished model/ nor a model folder")
    return resolve_model_dir(str(path))


def load_run(path: str | Path):
    """(model, tokenizer, framing) ready for inference, from a run folder, model folder or hub id."""
    folder = model_folder(path)
    tok = load_tokenizer(folder)
    framing = framing_of(tok)
    model = load_pretrained(folder, framing, len(tok))
    model.eval()
    return model, tok, framing
