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
  `rhyme_group` fixes the class from the start (a 平水韻 level group such as 東 / 上平一東, or a
  modern final such as "ang");
- `tones` ("strict" or "standard"): every character slot takes a character whose tone fits one of
  the standard tone patterns of regulated verse (`evaluate.patterns`) still open for the row:
  `pattern` names one, else all four are open and the first line written (or prompted) picks it.
  Characters of unknown tone are not used. With `rhyme`, a first line that ends level rhymes too
  (it then fixes the class). A prompt's or acrostic's character whose tone fits no open pattern
  keeps its place and the pattern is relaxed there (一三五不論; the 孤平 remedy still applies);
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
from gpt2tune.evaluate import patterns as tp
from gpt2tune.evaluate.prosody import LEVEL, OBLIQUE, analyse

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
    prosody: str = "modern"  # what `rhyme` (and `tones`) mean: see the module's docstring
    tones: Optional[str] = None  # None, "strict" or "standard"
    pattern: Optional[str] = None  # one of evaluate.patterns.PATTERN_NAMES; None: picked while writing
    rhyme_group: Optional[str] = None  # the rhyme class, fixed (needs `rhyme`)

    @property
    def slots(self) -> int:
        return self.rows * (self.cols + 1)

    def build(self, tok, vocab_size: int, prompts: list[str], eos_id: Optional[int]) -> "FormConstraint":
        """The constraint of this form for `prompts` (a `generate.constraints.ConstraintSpec`)."""
        return FormConstraint(tok, vocab_size, self, prompts, eos_id)


def form_spec(form: Optional[str] = None, rows: Optional[int] = None, cols: Optional[int] = None,
              acrostic: Optional[str] = None, rhyme: bool = False, no_repeat: bool = False,
              prosody: str = "modern", tones: Optional[str] = None, pattern: Optional[str] = None,
              rhyme_group: Optional[str] = None) -> Optional[FormSpec]:
    """Validate form options (CLI, server); None when no form is asked for."""
    if prosody not in PROSODY:
        raise UserError(f"unknown prosody {prosody!r}; valid: {', '.join(PROSODY)}")
    if tones is not None and tones not in tp.STRICTNESS:
        raise UserError(f"unknown --tones {tones!r}; valid: {', '.join(tp.STRICTNESS)}")
    if pattern is not None and pattern not in tp.PATTERN_NAMES:
        raise UserError(f"unknown --pattern {pattern!r}; valid: {', '.join(tp.PATTERN_NAMES)}")
    if pattern is not None and tones is None:
        raise UserError("--pattern chooses the tone pattern of --tones: give --tones strict or --tones standard")
    rhyme_group = (rhyme_group or "").strip() or None
    if rhyme_group is not None and not rhyme:
        raise UserError("--rhyme-group fixes the rhyme of --rhyme: give --rhyme too")
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
        if acrostic or rhyme or no_repeat or tones:
            raise UserError("--acrostic, --rhyme, --tones and --no-repeat-chars need a verse form (--form or --rows/--cols)")
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
    if tones is not None:
        why = tp.supported(rows, cols)
        if why:
            raise UserError(f"--tones: {why}")
    return FormSpec(rows, cols, acrostic, rhyme, no_repeat, prosody, tones, pattern, rhyme_group)


def form_notes(spec: FormSpec) -> list[str]:
    """What the user should know about how the options combine (printed, not an error)."""
    notes = []
    if spec.tones == "strict" and spec.acrostic:
        notes.append("--tones strict with --acrostic: a line start takes the acrostic's character even where its tone "
                     "fits no open pattern (the pattern is relaxed there, as 一三五不論 allows)")
    return notes


def tone_sets(chars: list[str], prosody: str) -> list[frozenset]:
    """The tones each character can take (empty: unknown), as `FormSpec.prosody` defines them."""
    if prosody == "modern":
        return [frozenset() if t is None else frozenset((t,)) for _, t in analyse(chars)]
    from gpt2tune.evaluate.classical import info

    return [info(ch).tones for ch in chars]


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
        self.prosody, self._chars = prosody, chars
        self._tones = None

    def _load_tones(self) -> None:
        self.level = torch.zeros(self.vocab, dtype=torch.bool)
        self.oblique = torch.zeros(self.vocab, dtype=torch.bool)
        self.tones_of: dict[int, frozenset] = {}
        for ch, ts in zip(self._chars, tone_sets(self._chars, self.prosody)):
            i = self.char_to_id[ch]
            self.tones_of[i] = ts
            self.level[i] = LEVEL in ts
            self.oblique[i] = OBLIQUE in ts
        self._tones = True

    def tone_mask(self, tones: frozenset) -> torch.Tensor:
        """Characters with a reading of one of `tones`."""
        if self._tones is None:
            self._load_tones()
        m = torch.zeros(self.vocab, dtype=torch.bool)
        if LEVEL in tones:
            m |= self.level
        if OBLIQUE in tones:
            m |= self.oblique
        return m

    def tones(self, i: int) -> frozenset:
        if self._tones is None:
            self._load_tones()
        return self.tones_of.get(i, frozenset())

    def rhyme_class(self, name: str) -> int:
        """The class index of a rhyme-group name (上平一東, 一東, 東 or 东; a modern final: ang)."""
        cands = {name}
        if self.prosody == "classical":
            import zhconv

            cands.add(zhconv.convert(name, "zh-hant"))
        hits = [k for k, c in enumerate(self.class_names) if any(c == x or (len(x) < len(c) and c.endswith(x)) for x in cands)]
        if len(hits) != 1:
            known = "、".join(c[-1] if self.prosody == "classical" else c for c in self.class_names[:40])
            what = "matches several groups" if hits else "is not a rhyme group of this vocabulary"
            level = " (regulated verse rhymes in level tones: 上平/下平 groups)" if self.prosody == "classical" else ""
            raise UserError(f"--rhyme-group {name!r} {what}{level}; e.g. {known}")
        return hits[0]

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


class ToneState:
    """Per-row tone-pattern state: the patterns still open and the tones of the current line."""

    def __init__(self, spec: FormSpec, v: CharVocab):
        self.pats = tp.patterns(spec.rows, spec.cols, [spec.pattern] if spec.pattern else None)
        self.rhymed = [tp.PATTERN_NAMES[p.name][1] for p in self.pats]
        self.strictness, self.cols, self.v = spec.tones, spec.cols, v
        self._masks: dict[frozenset, torch.Tensor] = {}
        self.relaxed = 0  # given characters (prompt, acrostic) no open pattern allowed

    def start(self, n: int) -> None:
        self.alive = [list(range(len(self.pats))) for _ in range(n)]
        self.hist: list[list[frozenset]] = [[] for _ in range(n)]

    def open_tones(self, r: int, line: int, pos: int, rhymed: Optional[bool] = None) -> frozenset:
        out = frozenset()
        for k in self.alive[r]:
            if rhymed is None or self.rhymed[k] == rhymed:
                out |= tp.allowed(self.pats[k], line, pos, self.hist[r], self.strictness)
        return out

    def mask(self, tones: frozenset) -> torch.Tensor:
        if tones not in self._masks:
            self._masks[tones] = self.v.tone_mask(tones)
        return self._masks[tones]

    def step(self, r: int, slot: int, tok: int, given: bool) -> None:
        line, pos = divmod(slot, self.cols + 1)
        if pos == self.cols:
            self.hist[r] = []
            return
        ts = self.v.tones(tok)
        if ts:
            keep = [k for k in self.alive[r]
                    if ts & tp.allowed(self.pats[k], line, pos, self.hist[r], self.strictness)]
            if keep:
                self.alive[r] = keep
            elif given:
                self.relaxed += 1
        self.hist[r].append(ts)

    def reorder(self, idx: list[int]) -> None:
        self.alive = [list(self.alive[i]) for i in idx]
        self.hist = [list(self.hist[i]) for i in idx]


class FormConstraint:
    """Per-row state of poems being written (a `generate.constraints.Constraint`); see the module
    docstring. Rows are positional (the decoder's active batch); `reorder` follows rows being dropped
    or beams being reordered."""

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
        self.group = v.rhyme_class(spec.rhyme_group) if spec.rhyme_group else -1
        if self.group >= 0 and int(v.classes[self.group].sum()) < self.need_per_class + 1:
            raise UserError(f"--rhyme-group {spec.rhyme_group}: the vocabulary has too few characters of that group")
        self.tones = ToneState(spec, v) if spec.tones else None
        self.line1_end = C - 1 if (self.tones is not None and spec.rhyme) else -1  # may rhyme (首句入韻)
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
            if self.group >= 0 and int(self.v.class_of[self.v.id_of(chars[2 * C - 1], "prompt")]) != self.group:
                raise UserError(f"the prompt's line 2 does not end in the rhyme group {spec.rhyme_group}")

    def start(self, prompt_index: list[int]) -> None:
        """Begin one row per entry, each continuing prompt `prompt_index[row]`."""
        n = len(prompt_index)
        self.slot = torch.tensor([len(self.prefix_ids[p]) for p in prompt_index], dtype=torch.long)
        self.used = torch.zeros(n, self.v.vocab, dtype=torch.bool) if self.spec.no_repeat else None
        self.cls = torch.full((n,), self.group, dtype=torch.long)
        if self.tones is not None:
            self.tones.start(n)
        for r, p in enumerate(prompt_index):
            ids = self.prefix_ids[p]
            if self.used is not None and ids:
                self.used[r, torch.tensor(ids)] = True
            for slot, t in enumerate(ids):
                if slot == self.line1_end:
                    self._line1_rhyme(r, t)
                if self.tones is not None:
                    self.tones.step(r, slot, t, given=True)
            line2_end = 2 * (self.spec.cols + 1) - 2
            if self.spec.rhyme and len(ids) > line2_end:
                self.cls[r] = self.v.class_of[ids[line2_end]]

    def _line1_rhyme(self, r: int, t: int) -> None:
        """With tones and rhyme: a first line that ends on a level tone (首句入韻) fixes the rhyme class
        (called before the tone state takes the character)."""
        c = int(self.v.class_of[t])
        if self.cls[r] >= 0 or c < 0 or LEVEL not in self.v.tones(t):
            return
        if LEVEL not in self.tones.open_tones(r, 0, self.spec.cols - 1, rhymed=True):
            return
        if self.used is not None and int((self.v.classes[c] & ~self.used[r]).sum()) < self.need_per_class:
            return
        self.cls[r] = c

    def prompt_ids(self, p: int) -> list[int]:
        return self.prefix_ids[p]

    def allowed(self) -> torch.Tensor:
        v, slot = self.v, self.slot
        n = slot.numel()
        allowed = v.cjk.expand(n, -1).clone()
        if self.used is not None:
            allowed &= ~self.used
            allowed &= ~self.reserved[slot]
        if self.tones is not None:
            self._tone_mask(allowed)
        if self.spec.rhyme:
            has = self.cls >= 0
            choose = self.rhyme_choose[slot] & ~has
            follow = (self.rhyme_follow[slot] | self.rhyme_choose[slot]) & has
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

    def _tone_mask(self, allowed: torch.Tensor) -> None:
        """Keep, per row, the characters whose tone fits an open pattern (and, at the end of line 1
        with --rhyme, level characters only where they can rhyme)."""
        C, ts, v = self.spec.cols, self.tones, self.v
        for r, slot in enumerate(self.slot.tolist()):
            line, pos = divmod(slot, C + 1)
            if pos == C or slot >= self.spec.slots or self.forced[slot] >= 0:
                continue
            if slot != self.line1_end:
                allowed[r] &= ts.mask(ts.open_tones(r, line, pos))
                continue
            m = ts.mask(ts.open_tones(r, line, pos, rhymed=False))
            if LEVEL in ts.open_tones(r, line, pos, rhymed=True):
                if self.cls[r] >= 0:
                    ok = v.classes[self.cls[r]]
                else:
                    avail = v.classes & allowed[r][None, :]
                    ok = (v.classes & (avail.sum(-1) >= self.need_per_class + 1)[:, None]).any(0)
                m = m | (ts.mask(frozenset((LEVEL,))) & ok)
            allowed[r] &= m

    def advance(self, tokens: torch.Tensor) -> None:
        tokens = tokens.cpu()
        if self.used is not None:
            self.used[torch.arange(tokens.numel()), tokens] = True
        if self.tones is not None:
            toks, slots = tokens.tolist(), self.slot.tolist()
            for r, (t, slot) in enumerate(zip(toks, slots)):
                if slot >= self.spec.slots:
                    continue
                if slot == self.line1_end:
                    self._line1_rhyme(r, t)
                self.tones.step(r, slot, t, given=bool(self.forced[slot] >= 0))
        if self.spec.rhyme:
            choose = self.rhyme_choose[self.slot] & (self.cls < 0)
            if bool(choose.any()):
                self.cls[choose] = self.v.class_of[tokens[choose]]
        self.slot = (self.slot + 1).clamp_max(self.spec.slots)

    def reorder(self, index) -> None:
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        self.slot = self.slot[idx]
        self.cls = self.cls[idx]
        if self.used is not None:
            self.used = self.used[idx]
        if self.tones is not None:
            self.tones.reorder(idx.tolist())
