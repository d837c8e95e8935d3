"""Conversations read from data records.

A record holds a list of messages under a field (default `messages`), each
`{"role": "system"|"user"|"assistant", "content": "..."}` as in ultrachat_200k and the
OpenAI chat format. ShareGPT-style `{"from": "human"|"gpt"|"system", "value": "..."}` is
accepted too. Malformed records are counted and skipped, never fatal.
"""

from __future__ import annotations

from typing import Optional

from gpt2tune.chat.template import ROLES
from gpt2tune.data.clean import clean_text
from gpt2tune.errors import UserError

ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "prompter": "user"}


def check_messages(messages) -> list[dict]:
    """Validate a conversation given by a user or a client; raise UserError naming the problem."""
    if not isinstance(messages, list):
        raise UserError("messages must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def conversation_of(record: dict, field: str, normalize: str = "nfc", whitespace: bool = False) -> Optional[list[dict]]:
    """The cleaned messages of one record, or None when the record is malformed."""
    raw = record.get(field)
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for m in raw:
        if not isinstance(m, dict):
            return None
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ALIASES.get(role, role)
        if role not in ROLES or not isinstance(content, str):
            return None
        content = clean_text(content, normalize, whitespace).strip()
        if not content:
            continue  # an empty turn carries nothing
        out.append({"role": role, "content": content})
    return out or None


def conversations_of(records: list[dict], field: str, spec: str, normalize: str = "nfc",
                     whitespace: bool = False, check: bool = True) -> tuple[list[list[dict]], int]:
    """All conversations of a source (or of a chunk of it); the number of malformed records skipped.
    `check`: the records are the source's first, where a missing field is an error."""
    if check and records and not any(field in r for r in records[:100]):
        have = ", ".join(map(str, records[0].keys()))
        raise UserError(f"{spec}: no field {field!r} holding messages; available: {have} (set chat.field)")
    out, skipped = [], 0
    for r in records:
        conv = conversation_of(r, field, normalize, whitespace)
        if conv is None:
            skipped += 1
        else:
            out.append(conv)
    return out, skipped
