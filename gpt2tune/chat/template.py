"""Chat templates: how a conversation becomes the text a model is trained on.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`.
Two templates are built in (recipe `chat.template`):

plain (default; any GPT-2 tokenizer, no new tokens)::

    <|endoftext|>System: You are terse.
    User: add 2 and 3
    Assistant: 5<|endoftext|>
    User: and 4 and 4?
    Assistant: 8<|endoftext|>

  Each system/user turn is `Role: content` and a newline; an assistant turn is
  `Assistant:`, then ` content<end>` (the trained part, its leading space included),
  then a newline. `<|endoftext|>` stands for the tokenizer's begin/end markers
  (`[CLS]`/`[SEP]` for BERT-style Chinese vocabularies). A reply is generated after
  `Assistant:` and ends at the end marker.

special (adds `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` to the vocabulary; the
model's embeddings are resized and the new rows trained)::

    <|endoftext|><|system|>
    You are terse.<|end|>
    <|user|>
    add 2 and 3<|end|>
    <|assistant|>
    5<|end|>

The template is saved with the model as a Jinja chat template (`chat_template` in
`tokenizer_config.json`, and `chat_template.jinja`), so `tokenizer.apply_chat_template`
in plain `transformers` renders exactly the string gpt2tune trains on; the assistant
parts are inside `{% generation %}` blocks, so `return_assistant_tokens_mask=True` gives
the same loss mask. (BERT-style vocabularies drop spaces, so there the space after
`Assistant:` belongs to the prompt: same text, same tokens, same mask.) The template's fields are also saved as `chat.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError

ROLES = ("system", "user", "assistant")
TEMPLATES = ("plain", "special")
SPECIAL_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
META_FILE = "chat.json"
JINJA_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplate:
    """A role-prefixed chat format.

    Rendering: `bos`, then per message `heads[role]`; system/user continue with
    `content + tail`; assistant continues with `lead + content + end` (the trained
    span) and `sep`. The generation prompt is `heads["assistant"]`; a reply ends at `end`.
    """

    name: str
    bos: str
    heads: dict = field(default_factory=dict)
    tail: str = "\n"
    lead: str = " "
    end: str = ""
    sep: str = "\n"
    added_tokens: tuple = ()

    # -- rendering ------------------------------------------------------------
    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool, bool]]:
        """The rendered text as (piece, trained, content) triples: `trained` marks assistant answers
        and their end marker; `content` marks what the messages said, where a special-token string is
        text, never a marker (a message cannot open a system turn; see `masking.encode_segments`)."""
        out: list[tuple[str, bool, bool]] = [(self.bos, False, False)]
        for m in messages:
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise UserError(f"unknown chat role {role!r}; roles are {', '.join(ROLES)}")
            if role == "assistant":
                out += [(self.heads[role], False, False), (self.lead, True, False), (content, True, True),
                        (self.end, True, False), (self.sep, False, False)]
            else:
                out += [(self.heads[role], False, False), (content, False, True), (self.tail, False, False)]
        if add_generation_prompt:
            out.append((self.heads["assistant"], False, False))
        return [s for s in out if s[0]]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(s[0] for s in self.segments(messages, add_generation_prompt))

    def clean_reply(self, text: str) -> str:
        """A generated reply as message content: without the template's leading space."""
        if self.lead and text.startswith(self.lead):
            text = text[len(self.lead):]
        return text.strip()

    # -- Jinja ----------------------------------------------------------------
    def jinja(self) -> str:
        """The same format as a Hugging Face chat template (rendered with trim_blocks/lstrip_blocks)."""
        q = _jinja_str
        roles = "', '".join(ROLES)
        lines = [
            "{#- gpt2tune chat template '" + self.name + "' (see gpt2tune/chat/template.py) -#}",
            "{{- " + q(self.bos) + " -}}",
            "{%- for message in messages -%}",
            "  {%- if message['role'] == 'assistant' -%}",
            "    {{- " + q(self.heads["assistant"]) + " -}}",
            "    {%- generation -%}{{- " + q(self.lead) + " + message['content'] + " + q(self.end)
            + " -}}{%- endgeneration -%}",
            "    {{- " + q(self.sep) + " -}}",
            "  {%- elif message['role'] == 'user' -%}",
            "    {{- " + q(self.heads["user"]) + " + message['content'] + " + q(self.tail) + " -}}",
            "  {%- elif message['role'] == 'system' -%}",
            "    {{- " + q(self.heads["system"]) + " + message['content'] + " + q(self.tail) + " -}}",
            "  {%- else -%}",
            "    {{- raise_exception('unknown chat role ' + message['role'] + '; roles are " + roles + "') -}}",
            "  {%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            "  {{- " + q(self.heads["assistant"]) + " -}}",
            "{%- endif -%}",
        ]
        return "\n".join(lines) + "\n"

    # -- persistence -----------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["added_tokens"] = list(self.added_tokens)
        return {"format": 1, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "ChatTemplate":
        d = dict(d)
        d.pop("format", None)
        try:
            t = cls(**{**d, "added_tokens": tuple(d.get("added_tokens", ()))})
        except TypeError as err:
            raise UserError(f"unreadable chat template description: {err}") from None
        if set(t.heads) != set(ROLES):
            raise UserError(f"chat template heads must name the roles {', '.join(ROLES)}")
        return t


def _jinja_str(s: str) -> str:
    """A Jinja string literal (Python-style escapes, which Jinja's lexer decodes)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def marker_text(tok, token_id: Optional[int]) -> str:
    """The text of a special token (empty for None): what a template writes for it."""
    return tok.convert_ids_to_tokens(token_id) if token_id is not None else ""


def make_template(name: str, tok, framing) -> ChatTemplate:
    """The built-in template `name` for this tokenizer (its begin/end markers)."""
    bos = marker_text(tok, framing.bos)
    if name == "plain":
        # GPT-2 BPE glues a space to the next word: the answer's first token is " 5", so the
        # space is generated (and trained); WordPiece drops spaces, so there it ends the prompt.
        head, lead = ("Assistant: ", "") if framing.bert_style else ("Assistant:", " ")
        return ChatTemplate("plain", bos, {"system": "System: ", "user": "User: ", "assistant": head},
                            tail="\n", lead=lead, end=marker_text(tok, framing.eos), sep="\n")
    if name == "special":
        heads = {r: f"<|{r}|>\n" for r in ROLES}
        return ChatTemplate("special", bos, heads, tail="<|end|>\n", lead="", end="<|end|>", sep="\n",
                            added_tokens=tuple(SPECIAL_TOKENS))
    raise UserError(f"unknown chat template {name!r}; valid: {', '.join(TEMPLATES)}")


def install(template: ChatTemplate, tok, model=None) -> int:
    """Add the template's special tokens to the tokenizer (resizing the model's embeddings)
    and set its Jinja chat template. Returns how many tokens were added."""
    added = 0
    if template.added_tokens:
        added = tok.add_special_tokens({"extra_special_tokens": list(template.added_tokens)},
                                       replace_extra_special_tokens=False)
        if model is not None and len(tok) > model.get_input_embeddings().weight.size(0):
            model.resize_token_embeddings(len(tok))
    tok.chat_template = template.jinja()
    return added


def end_id(template: ChatTemplate, tok, framing) -> int:
    """The token id that ends a reply: the template's end marker (the tokenizer's end marker
    for the plain template)."""
    if template.end:
        i = tok.convert_tokens_to_ids(template.end)
        if i is not None and i != tok.unk_token_id:
            return i
    return framing.eos


def save_template(template: ChatTemplate, folder: str | Path, jinja: bool = True) -> None:
    """Write chat.json and (jinja) put the Jinja template into tokenizer_config.json and chat_template.jinja."""
    folder = Path(folder)
    (folder / META_FILE).write_text(json.dumps(template.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    if not jinja:
        return
    text = template.jinja()
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = text
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / JINJA_FILE).write_text(text, encoding="utf-8")


def load_template(folder: str | Path) -> Optional[ChatTemplate]:
    """The template saved in a model folder (chat.json), or None."""
    p = Path(folder) / META_FILE
    if not p.is_file():
        return None
    try:
        return ChatTemplate.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise UserError(f"{p} is not valid JSON: {err.msg}") from None
