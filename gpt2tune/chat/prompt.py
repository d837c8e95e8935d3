"""Prompt->completion templates, e.g. `"{document}\\nTL;DR: {title}"`.

Placeholders name record fields (JSONL keys, CSV columns). The last placeholder is the
completion, everything before it the prompt: a sample is `[bos] prompt completion [eos]`
and only `completion [eos]` is trained. Spaces just before the completion placeholder
belong to the completion (`"TL;DR: {title}"` makes the prompt end in `TL;DR:` and the
completion start with a space), as GPT-2's tokenizer attaches a space to the next word;
a bare prompt is then completed exactly as in training. Use `{{` and `}}` for literal braces.

The template is saved with the model as `completion.json`; `gpt2tune generate RUN
--template --prompt TEXT` fills the prompt part with TEXT.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2tune.chat.masking import FitStats, Masked, cut_to_fit, encode_segments
from gpt2tune.errors import UserError
from gpt2tune.model.tokenizer import encode_text

META_FILE = "completion.json"


@dataclass(frozen=True)
class PromptTemplate:
    template: str
    prompt_parts: tuple  # ((literal, field or None), ...)
    completion_parts: tuple
    prompt_fields: tuple
    completion_field: str

    @property
    def fields(self) -> tuple:
        return self.prompt_fields + (self.completion_field,)

    def prompt(self, values: dict) -> str:
        return _fill(self.prompt_parts, values)

    def completion(self, values: dict) -> str:
        return _fill(self.completion_parts, values)

    def prompt_for(self, text: str) -> str:
        """The prompt for a bare input: TEXT fills the only prompt field; with several prompt
        fields TEXT must be a JSON object naming them."""
        if len(self.prompt_fields) == 1:
            return self.prompt({self.prompt_fields[0]: text})
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, dict) or any(not isinstance(values.get(f), str) for f in self.prompt_fields):
            raise UserError(f"the template {self.template!r} has several prompt fields: give the prompt as a JSON "
                            f"object with string values for {', '.join(self.prompt_fields)}")
        return self.prompt(values)

    def segments(self, values: dict, bos: str, eos: str) -> list[tuple[str, bool, bool]]:
        """(piece, trained, content) triples: the template's literals and markers, and the records'
        field values (content: special-token strings in them stay text, see `masking.encode_segments`)."""
        out = [(bos, False, False)]
        for trained, parts in ((False, self.prompt_parts), (True, self.completion_parts)):
            for lit, f in parts:
                out += [(lit, trained, False)] + ([(str(values[f]), trained, True)] if f is not None else [])
        out.append((eos, True, False))
        return [s for s in out if s[0]]

    def to_dict(self) -> dict:
        return {"format": 1, "template": self.template, "prompt_fields": list(self.prompt_fields),
                "completion_field": self.completion_field}


def _fill(parts: tuple, values: dict) -> str:
    return "".join(lit + (str(values[f]) if f is not None else "") for lit, f in parts)


def parse_template(template: str) -> PromptTemplate:
    """Check a template and split it into prompt and completion; UserError when malformed."""
    if not isinstance(template, str) or not template:
        raise UserError("completion.template must be a non-empty string such as \"{document}\\nTL;DR: {title}\"")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(f"completion.template {template!r}: {err} (use {{{{ and }}}} for literal braces)") from None
    parts = []
    for lit, name, spec, conv in parsed:
        if name is not None:
            if not name.strip() or name.isdigit():
                raise UserError(f"completion.template {template!r}: every placeholder must name a field, "
                                f"like {{document}} (got {{{name}}})")
            if spec or conv:
                raise UserError(f"completion.template {template!r}: placeholders take no format specs ({{{name}}})")
        parts.append((lit, name))
    names = [n for _, n in parts if n is not None]
    if len(names) < 2:
        raise UserError(f"completion.template {template!r} needs at least two placeholders: the prompt field(s) "
                        "and, last, the completion field, e.g. \"{document}\\nTL;DR: {title}\"")
    completion = names[-1]
    if names.count(completion) > 1:
        raise UserError(f"completion.template {template!r}: the completion field {{{completion}}} may appear only once, last")
    k = max(i for i, (_, n) in enumerate(parts) if n == completion)
    lit_before = parts[k][0]
    moved = lit_before[len(lit_before.rstrip(" ")):]
    prompt_parts = tuple(parts[:k]) + ((lit_before[: len(lit_before) - len(moved)], None),)
    completion_parts = ((moved, completion),) + tuple(parts[k + 1:])
    prompt_fields = tuple(dict.fromkeys(n for _, n in parts[:k] if n is not None))
    return PromptTemplate(template, prompt_parts, completion_parts, prompt_fields, completion)


def values_of(records: list[dict], pt: PromptTemplate, spec: str, check: bool = True) -> tuple[list[dict], int]:
    """The template fields of every record (as strings); records missing one are skipped. `check`: the
    records are the source's first, where a field no record has is an error."""
    if check and records:
        have = set().union(*(r.keys() for r in records[:100]))
        missing = [f for f in pt.fields if f not in have]
        if missing:
            raise UserError(f"{spec}: no field/column {missing[0]!r} used by completion.template; "
                            f"available: {', '.join(map(str, records[0].keys()))}")
    out, skipped = [], 0
    for r in records:
        vals = {}
        for f in pt.fields:
            v = r.get(f)
            if isinstance(v, (list, dict)) or v is None:
                break
            v = str(v)
            if not v.strip():
                break
            vals[f] = v
        else:
            out.append(vals)
            continue
        skipped += 1
    return out, skipped


def encode_pair(tok, pt: PromptTemplate, values: dict, bos: str, eos: str, max_length: int,
                st: Optional[FitStats] = None) -> Optional[Masked]:
    """One training row; a long sample has its longest prompt field cut at the end (the
    template's text after it, such as `TL;DR:`, stays) and keeps its whole completion."""
    st = st if st is not None else FitStats()
    values = dict(values)
    row = encode_segments(tok, pt.segments(values, bos, eos))
    shortened = False
    for _ in range(6):
        excess = len(row) - max_length
        if excess <= 0 or not pt.prompt_fields:
            break
        f = max(pt.prompt_fields, key=lambda name: len(values[name]))
        n = len(encode_text(tok, values[f]))
        if n <= excess:
            break
        keep = int(len(values[f]) * (n - excess - 1) / n)
        if keep <= 0 or keep >= len(values[f]):
            break
        values[f] = values[f][:keep]
        shortened = True
        row = encode_segments(tok, pt.segments(values, bos, eos))
    if len(row) > max_length:
        bos_len = len(tok(bos, add_special_tokens=False)["input_ids"]) if bos else 0
        row = cut_to_fit(row, bos_len, max_length, st)
    elif shortened:
        st.prompt_cut += 1
    return st.accept(row)


def save_prompt_template(pt: PromptTemplate, folder: str | Path) -> None:
    Path(folder, META_FILE).write_text(json.dumps(pt.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def find_prompt_template(run_or_model: str | Path) -> PromptTemplate:
    """The template a completion run saved: in RUN, RUN/model or RUN/adapter, or a model folder."""
    p = Path(run_or_model)
    for d in (p, p / "model", p / "adapter"):
        f = d / META_FILE
        if f.is_file():
            try:
                return parse_template(json.loads(f.read_text(encoding="utf-8"))["template"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{f} is not a valid completion template file") from None
    raise UserError(f"{p} has no completion template ({META_FILE}); --template works with runs of the "
                    f"'completion' task")
