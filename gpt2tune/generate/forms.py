"""Classical verse forms enforced token by token: exact lines, acrostic, rhyme, no repeated characters.

A poem of R lines of C characters is a fixed sequence of R*(C+1) slots, then the end marker:
line i holds C characters followed by "，" (odd i) or "。" (even i, counted from 1). Slots are
counted from the start of the poem, so a prompt of any length is first parsed as a poem prefix
(its punctuation may be left out; it is put back). At every step the constraint allows, per row:
- a punctuation slot or the end: exactly that token;
- a character slot: only tokens that are a single CJK character (no punctuation, [UNK], Latin,
  digits or special tokens), and with `acrostic` the given character at the start of line i;
- `rhyme`: the last character of line 2 must belong to a rhyme class that still has enough
  characters left, and the last characters of lines 4, 6, ... share its class. `prosody`
  "classical": the class is the character's level-tone (平聲) group of the 平水韻 rhyme book
  (`evaluate.classical`; regulated verse rhymes in level tones; a character without a level reading
  cannot end an even line); "modern": its pypinyin final (`evaluate.prosody`);
- `no_repeat`: no character twice in the poem (acrostic characters of later lines and the last
  members of the rhyme class are kept in reserve so the poem can always be finished).

This needs a tokenizer that writes every Chinese character as one token (BERT-style character
vocabularies such as uer/gpt2-chinese, or any other where that holds); others get a `UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gpt2tune.data.poetry import FORMS, is_cjk
from gpt2tune.errors import UserError
from gpt2tune.evaluate.prosody import LEVEL, analyse

PROSODY = ("classical", "modern")

COMMA, STOP = "，", "。"
PUNCT_IN_PROMPT = {",": COMMA, "，": COMMA, ".": STOP, "。": STOP}
# common characters (simplified and traditional) a character-level tokenizer writes as one token each
PROBE = "白日依山盡黃河入海流的一是不了人我在有他這这中大來来上國国個个到說说們们為为子和你地出道也時时年"


@dataclass(frozen=True)
class FormSpec:
    rows: int
    cols: int
    acrostic: str = ""
    rhyme: bool = False
    no_repeat: bool = False
    prosody: str = "modern"  # what `rhyme` means: see the module's docstring

    @property
    def slots(self) -> int:
        return self.rows * (self.cols + 1)


def form_spec(form: Optional[str] = None, rows: Optional[int] = None, cols: Optional[int] = None,
              acrostic: Optional[str] = None, rhyme: bool = False, no_repeat: bool = False,
              prosody: str = "modern") -> Optional[FormSpec]:
    """Validate form options (CLI, server); None when no form is asked for."""
    if prosody not in PROSODY:
        raise UserError(f"unknown prosody {prosody!r}; valid: {', '.join(PROSODY)}")
    if form is not None and (rows is not None or cols is not None):
        raise UserError("give either --form or --rows/--cols, not both")
    if form is not None:
        if form not in FORMS:
            raise UserError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
        rows, cols = FORMS[form]
    elif rows is not None or cols is not None:
        if rows is None or cols is None:
            raise UserError("--rows and --cols go together")
        if not (1 <= rows <= 64 and 1 <= cols <= 64):
            raise UserError("--rows and --cols must be between 1 and 64")
    else:
        if acrostic or rhyme or no_repeat:
            raise UserError("--acrostic, --rhyme and --no-repeat-chars need a verse form (--form or --rows/--cols)")
        return None
    acrostic = (acrostic or "").strip()
    if acrostic:
        if not all(is_cjk(ch) for ch in acrostic):
            raise UserError(f"--acrostic must be Chinese characters only, got {acrostic!r}")
        if len(acrostic) > rows:
            raise UserError(f"--acrostic has {len(acrostic)} characters but the form has {rows} lines")
        if no_repeat and len(set(acrostic)) < len(acrostic):
            raise UserError("--acrostic repeats a character, which --no-repeat-chars forbids")
    if rhyme and rows < 4:
        raise UserError("--rhyme needs at least 4 lines (lines 4, 6, ... rhyme with line 2)")
    if rhyme and acrostic and cols < 2:
        raise UserError("--rhyme with --acrostic needs at least 2 characters per line")
    return FormSpec(rows, cols, acrostic, rhyme, no_repeat, prosody)


def rhyme_keys(chars: list[str], prosody: str) -> list[Optional[str]]:
    """The rhyme class of each character (None: it cannot rhyme), as `FormSpec.prosody` defines it."""
    if prosody == "modern":
        return [key for key, _ in analyse(chars)]
    from gpt2tune.evaluate.classical import info

    return [min((r.group for r in info(ch).readings if r.tone == LEVEL), default=None) for ch in chars]


class CharVocab:
    """The tokenizer's single-character CJK tokens, punctuation ids and rhyme classes."""

    def __init__(self, tok, vocab_size: int, prosody: str = "modern"):
        split = [ch for ch in PROBE if len(tok(ch, add_special_tokens=False)["input_ids"]) > 1]
        if split:
            n = len(tok(split[0], add_special_tokens=False)["input_ids"])
            raise UserError(f"verse forms need a tokenizer that writes every Chinese character as one token; this one "
                            f"splits {len(split)} of {len(PROBE)} common characters (e.g. {split[0]} -> {n} tokens), "
                            "as GPT-2's byte-level BPE does. Use a character vocabulary (e.g. uer/gpt2-chinese-*)")
        specials = set(tok.all_special_ids)
        self.char_to_id: dict[str, int] = {}
        n_tok = min(len(tok), vocab_size)
        for i, t in enumerate(tok.convert_ids_to_tokens(list(range(n_tok)))):
            if i in specials or t is None:
                continue
            ch = t if len(t) == 1 else (tok.convert_tokens_to_string([t]) if len(t) in (3, 4) else "")
            if len(ch) == 1 and (ch in PUNCT_IN_PROMPT.values() or is_cjk(ch)) and ch not in self.char_to_id:
                self.char_to_id[ch] = i
        missing = [p for p in (COMMA, STOP) if p not in self.char_to_id]
        if missing:
            raise UserError(f"the tokenizer has no single token for {' and '.join(missing)}: verse forms cannot be enforced")
        self.comma, self.stop = self.char_to_id[COMMA], self.char_to_id[STOP]
        self.id_to_char = {i: ch for ch, i in self.char_to_id.items()}
        chars = [ch for ch in self.char_to_id if is_cjk(ch)]
        if not chars:
            raise UserError("the tokenizer has no Chinese characters: verse forms cannot be enforced")
        self.vocab = vocab_size
        self.cjk = torch.zeros(vocab_size, dtype=torch.bool)
        self.cjk[torch.tensor([self.char_to_id[c] for c in chars])] = True
        self.n_chars = len(chars)
        keys = {}
        self.class_of = torch.full((vocab_size,), -1, dtype=torch.long)
        for ch, key in zip(chars, rhyme_keys(chars, prosody)):
            if key is not None:
                self.class_of[self.char_to_id[ch]] = keys.setdefault(key, len(keys))
        self.class_names = list(keys)
        self.classes = torch.zeros(max(1, len(keys)), vocab_size, dtype=torch.bool)
        has = self.class_of >= 0
        self.classes[self.class_of[has], torch.nonzero(has).squeeze(-1)] = True

    def id_of(self, ch: str, what: str) -> int:
        i = self.char_to_id.get(ch)
        if i is None:
            raise UserError(f"{what} character {ch!r} is not a single token of this tokenizer's vocabulary")
        return i


_VOCABS: dict = {}


def char_vocab(tok, vocab_size: int, prosody: str = "modern") -> CharVocab:
    key = (id(tok), vocab_size, prosody)
    if key not in _VOCABS:
        _VOCABS[key] = CharVocab(tok, vocab_size, prosody)
    return _VOCABS[key]


def poem_prefix(spec: FormSpec, prompt: str) -> str:
    """The prompt as the start of a poem of this form, punctuation restored; UserError if it cannot be."""
    out, col, line = [], 0, 0
    for ch in prompt.strip():
        if ch.isspace():
            continue
        want = COMMA if line % 2 == 0 else STOP
        if ch in PUNCT_IN_PROMPT:
            if col != spec.cols or PUNCT_IN_PROMPT[ch] != want:
                raise UserError(f"the prompt {prompt!r} does not fit the form ({spec.rows} lines of {spec.cols} "
                                f"characters, '，' after odd lines and '。' after even lines)")
            out.append(want)
            col, line = 0, line + 1
            continue
        if not is_cjk(ch):
            raise UserError(f"a verse-form prompt may only hold Chinese characters and ，。 (got {ch!r})")
        if line >= spec.rows:
            raise UserError(f"the prompt {prompt!r} is longer than the whole poem")
        if col == spec.cols:
            out.append(want)
            col, line = 0, line + 1
            if line >= spec.rows:
                raise UserError(f"the prompt {prompt!r} is longer than the whole poem")
        out.append(ch)
        col += 1
    return "".join(out)


class FormConstraint:
    """Per-row state of poems being written; see the module docstring. Rows are positional
    (the decoder's active batch); `reorder` follows rows being dropped or beams being reordered."""

    def __init__(self, tok, vocab_size: int, spec: FormSpec, prompts: list[str], eos_id: int):
        self.spec, self.eos = spec, eos_id
        self.v = v = char_vocab(tok, vocab_size, spec.prosody)
        R, C = spec.rows, spec.cols
        if spec.no_repeat and v.n_chars < R * C:
            raise UserError(f"--no-repeat-chars needs {R * C} different characters but the vocabulary has {v.n_chars}")
        S = spec.slots + 1
        # what each slot takes: a forced id (punctuation, end marker, acrostic) or -1 for a free character
        self.forced = torch.full((S,), -1, dtype=torch.long)
        self.rhyme_choose = torch.zeros(S, dtype=torch.bool)
        self.rhyme_follow = torch.zeros(S, dtype=torch.bool)
        self.reserved = torch.zeros(S, v.vocab, dtype=torch.bool)  # acrostic characters of later lines
        acro = [v.id_of(ch, "acrostic") for ch in spec.acrostic]
        for line in range(R):
            base = line * (C + 1)
            self.forced[base + C] = v.comma if line % 2 == 0 else v.stop
            if line < len(acro):
                self.forced[base] = acro[line]
                if spec.no_repeat:
                    self.reserved[:base, acro[line]] = True
            if spec.rhyme and line % 2 == 1:
                (self.rhyme_choose if line == 1 else self.rhyme_follow)[base + C - 1] = True
        self.forced[S - 1] = eos_id
        # rhyme slots still to come after each slot (counting the slot itself)
        self.rhyme_left = torch.flip(torch.cumsum(torch.flip((self.rhyme_choose | self.rhyme_follow).long(), [0]), 0), [0])
        self.need_per_class = (R // 2) if spec.no_repeat else 1
        if spec.rhyme and int((v.classes.sum(-1) >= self.need_per_class).sum()) == 0:
            raise UserError("no rhyme class of this vocabulary has enough characters for --rhyme")
        self.prefixes = [poem_prefix(spec, p) for p in prompts]
        self.prefix_ids = [[v.id_of(ch, "prompt") for ch in pre] for pre in self.prefixes]
        for pre in self.prefixes:
            self._check_prefix(pre)
        self.max_new_tokens = max(S - len(ids) for ids in self.prefix_ids)

    def _check_prefix(self, pre: str) -> None:
        spec, C = self.spec, self.spec.cols
        chars = [ch for ch in pre if is_cjk(ch)]
        for line, a in enumerate(spec.acrostic):
            if line * C < len(chars) and chars[line * C] != a:
                raise UserError(f"the prompt's line {line + 1} starts with {chars[line * C]!r}, not the acrostic's {a!r}")
        if spec.no_repeat and len(set(chars)) < len(chars):
            raise UserError("the prompt repeats a character, which --no-repeat-chars forbids")
        if spec.rhyme and len(chars) >= 2 * C:
            keys = rhyme_keys([chars[(line + 1) * C - 1] for line in range(1, len(chars) // C, 2)], spec.prosody)
            if keys[0] is None or any(k != keys[0] for k in keys):
                raise UserError("the prompt's even lines do not rhyme (or line 2's last character has no known reading)")

    def start(self, prompt_index: list[int]) -> None:
        """Begin one row per entry, each continuing prompt `prompt_index[row]`."""
        n = len(prompt_index)
        self.slot = torch.tensor([len(self.prefix_ids[p]) for p in prompt_index], dtype=torch.long)
        self.used = torch.zeros(n, self.v.vocab, dtype=torch.bool) if self.spec.no_repeat else None
        self.cls = torch.full((n,), -1, dtype=torch.long)
        for r, p in enumerate(prompt_index):
            ids = self.prefix_ids[p]
            if self.used is not None and ids:
                self.used[r, torch.tensor(ids)] = True
            line2_end = 2 * (self.spec.cols + 1) - 2
            if self.spec.rhyme and len(ids) > line2_end:
                self.cls[r] = self.v.class_of[ids[line2_end]]

    def prompt_ids(self, p: int) -> list[int]:
        return self.prefix_ids[p]

    def allowed(self) -> torch.Tensor:
        v, slot = self.v, self.slot
        n = slot.numel()
        allowed = v.cjk.expand(n, -1).clone()
        if self.used is not None:
            allowed &= ~self.used
            allowed &= ~self.reserved[slot]
        if self.spec.rhyme:
            choose, follow = self.rhyme_choose[slot], self.rhyme_follow[slot]
            if bool(choose.any()):
                rows = torch.nonzero(choose).squeeze(-1)
                avail = v.classes[None] & allowed[rows][:, None, :]  # [r, K, V]
                ok = avail.sum(-1) >= self.need_per_class  # [r, K]
                allowed[rows] &= (ok[:, :, None] & v.classes[None]).any(1)
            if bool(follow.any()):
                rows = torch.nonzero(follow).squeeze(-1)
                allowed[rows] &= v.classes[self.cls[rows].clamp_min(0)]
            if self.used is not None:
                other = (self.cls >= 0) & ~follow & (self.forced[slot] < 0)
                if bool(other.any()):
                    rows = torch.nonzero(other).squeeze(-1)
                    members = v.classes[self.cls[rows]]
                    left = (members & ~self.used[rows]).sum(-1)
                    short = left <= self.rhyme_left[slot[rows]]
                    if bool(short.any()):
                        r2 = rows[short]
                        allowed[r2] &= ~members[short]
        forced = self.forced[slot]
        fr = forced >= 0
        if bool(fr.any()):
            rows = torch.nonzero(fr).squeeze(-1)
            allowed[rows] = False
            allowed[rows, forced[rows]] = True
        if not bool(allowed.any(-1).all()):
            raise UserError("the verse-form constraints leave no character to choose (the vocabulary is too small "
                            "for --no-repeat-chars/--rhyme with this form)")
        return allowed

    def advance(self, tokens: torch.Tensor) -> None:
        tokens = tokens.cpu()
        if self.used is not None:
            self.used[torch.arange(tokens.numel()), tokens] = True
        if self.spec.rhyme:
            choose = self.rhyme_choose[self.slot]
            if bool(choose.any()):
                self.cls[choose] = self.v.class_of[tokens[choose]]
        self.slot = (self.slot + 1).clamp_max(self.spec.slots)

    def reorder(self, index) -> None:
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        self.slot = self.slot[idx]
        self.cls = self.cls[idx]
        if self.used is not None:
            self.used = self.used[idx]
