"""Export a run as a standalone Hugging Face model folder (`gpt2tune export`).

- full / partial runs: the model, as `transformers` loads it.
- lora / ia3 with `merge=True`: the adapter merged into the base weights - a plain model.
- other adapter runs (or no merge): the base model's files, with the adapter in adapter/
  (peft's format for peft methods, so `PeftModel.from_pretrained(base, DIR/adapter)` works;
  gpt2tune's for bottleneck adapters), and adapter/rebuild.json pointing at the base in DIR.

Every export has the tokenizer, generation_config.json and a README.md model card. The tokenizer is
saved by `save_tokenizer`, so plain `transformers` frames and decodes Chinese character vocabularies
as gpt2tune does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpt2tune.errors import UserError
from gpt2tune.export.card import model_card
from gpt2tune.method import REBUILD, method_names
from gpt2tune.method import method as method_named
from gpt2tune.method.io import base_folder, load_trained
from gpt2tune.method.via_peft import unwrap
from gpt2tune.model.build import load_pretrained
from gpt2tune.model.quiet import quiet_transformers
from gpt2tune.model.tokenizer import save_tokenizer


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--output {out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {out} cannot be created: {err.strerror}") from None


def export_run(run: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False) -> dict:
    """Write the export folder; return what was written ({"layout", "method", "folder"})."""
    run, out = Path(run), Path(out)
    loaded = load_trained(run)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise UserError("--output must be outside the run folder")
    method = loaded.method
    if loaded.adapter is not None and merge and not method_named(method).mergeable:
        mergeable = sorted(n for n in method_names() if method_named(n).mergeable)
        raise UserError(f"method {method} cannot be merged into the base weights (only {', '.join(mergeable)} "
                        f"can); export without --merge to get the base model plus adapter/")
    _prepare(out, overwrite)
    with quiet_transformers():
        if loaded.adapter is None:
            model, layout = loaded.model, "model"
            model.save_pretrained(str(out))
        elif merge:
            model, layout = unwrap(loaded.model).merge_and_unload(), "merged"
            model.save_pretrained(str(out))
        else:
            model, layout = _export_base_and_adapter(loaded, out), "base+adapter"
        model.generation_config.save_pretrained(str(out))  # first: save_tokenizer adds to it
        save_tokenizer(loaded.tokenizer, out, generation=not hasattr(model, "score"))
    (out / "README.md").write_text(model_card(run, out, method, layout), encoding="utf-8")
    return {"layout": layout, "method": method, "folder": str(out)}


def _export_base_and_adapter(loaded, out: Path):
    base = load_pretrained(base_folder(loaded.adapter, loaded.info), loaded.framing, len(loaded.tokenizer))
    base.save_pretrained(str(out))
    dest = out / "adapter"
    dest.mkdir()
    for f in loaded.adapter.iterdir():
        if f.is_file() and f.name not in (REBUILD, "README.md"):
            shutil.copy2(f, dest / f.name)
    info = dict(loaded.info, base={"name": loaded.info.get("base", {}).get("name"), "folder": ".."}, tokenizer="..")
    (dest / REBUILD).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return base
