"""Tokenizers: load the model's own or a folder, or build one from the training data.

Two families, and the markers that frame a sample (`Framing`):
- GPT-2 byte-level BPE: `<|endoftext|>` starts and ends a sample; padding reuses it with
  attention mask 0 (and label -100).
- BERT-style Chinese character vocabularies (`uer/gpt2-chinese-*`): `[CLS] ... [SEP]`,
  padding `[PAD]`; generation stops at `[SEP]`.

`save_tokenizer` writes a model folder's tokenizer; for a model that continues text, a BERT-style
vocabulary is saved so that plain `transformers` frames prompts and decodes as gpt2tune does.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2tune.data.poetry import is_cjk
from gpt2tune.errors import UserError
from gpt2tune.model.quiet import quiet_transformers

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Framing:
    bos: Optional[int]
    eos: int
    pad: int
    bert_style: bool


def framing_of(tok) -> Framing:
    """Which ids start, end and pad a sample for this tokenizer (sets a pad token if missing)."""
    if getattr(tok, "cls_token_id", None) is not None and getattr(tok, "sep_token_id", None) is not None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.sep_token_id
        return Framing(tok.cls_token_id, tok.sep_token_id, pad, True)
    eos = tok.eos_token_id
    if eos is None:
        ids = tok.convert_tokens_to_ids(EOT)
        if ids is None or ids == tok.unk_token_id:
            raise UserError("the tokenizer has no end-of-text token (eos_token or [SEP]); cannot frame samples")
        tok.eos_token = EOT
        eos = ids
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    return Framing(bos, eos, tok.pad_token_id, False)


def load_tokenizer(folder: str | Path):
    """Load a tokenizer from a folder: tokenizer.json / tokenizer_config.json, GPT-2 BPE files, or a BERT vocab.txt."""
    from transformers import AutoTokenizer, BertTokenizer, GPT2Tokenizer

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise UserError(f"tokenizer folder not found: {p}")
    with quiet_transformers():
        try:
            if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(str(p))
            if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                return GPT2Tokenizer.from_pretrained(str(p))
            if (p / "vocab.txt").is_file():
                return BertTokenizer.from_pretrained(str(p))
        except (OSError, ValueError) as err:
            raise UserError(f"could not load the tokenizer in {p}: {str(err).splitlines()[0]}") from None
    raise UserError(f"{p} holds no tokenizer (tokenizer.json, vocab.json+merges.txt or vocab.txt)")


def is_chinese(texts: list[str], sample: int = 2000) -> bool:
    chars = [ch for t in texts[:sample] for ch in t if not ch.isspace()]
    return bool(chars) and sum(is_cjk(ch) for ch in chars) / len(chars) > 0.3


def build_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 8000):
    """Build a tokenizer from training texts and save it in `out_dir`.

    Chinese text gets a character vocabulary in BertTokenizer format (as the uer models
    use); anything else a byte-level BPE trained with the `tokenizers` library.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not texts:
        raise UserError("cannot build a tokenizer from no training text")
    if is_chinese(texts):
        from transformers import BertTokenizer

        counts = Counter(ch for t in texts for ch in t.lower() if not ch.isspace())
        base = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
        vocab = list(BERT_SPECIALS)
        seen = set(vocab)
        for ch, _ in counts.most_common():
            if ch not in seen:
                vocab.append(ch)
                seen.add(ch)
        for ch in base:  # letters/digits inside words, so Latin text never becomes [UNK]
            for piece in (ch, "##" + ch):
                if piece not in seen:
                    vocab.append(piece)
                    seen.add(piece)
        (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        with quiet_transformers():
            tok = BertTokenizer.from_pretrained(str(out))
    else:
        from tokenizers import ByteLevelBPETokenizer
        from transformers import GPT2Tokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
        bpe.save_model(str(out))
        with quiet_transformers():
            tok = GPT2Tokenizer.from_pretrained(str(out))
    framing_of(tok)
    tok.save_pretrained(str(out))
    return tok


_CJK_GAP = re.compile(
    r"(?<=[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]) "
    r"|(?<=\S) (?=[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])"
)


def encode_text(tok, text: str) -> list[int]:
    """The ids of user text (a training sample, a prompt, a message): a special-token string in it
    (`<|endoftext|>`, `[SEP]`, `<|user|>`) is text like any other, never the control token itself."""
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def prompt_ids(tok, framing, text: str) -> list[int]:
    """A prompt as the model saw its samples begin: the begin marker (if any), then the text."""
    return ([framing.bos] if framing.bos is not None else []) + (encode_text(tok, text) if text else [])


def decode(tok, ids, skip_special: bool = True) -> str:
    """Decode ids to text: no special tokens, and no spaces between Chinese characters
    (BERT-style decoding puts a space between every token)."""
    text = tok.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
    if getattr(tok, "cls_token_id", None) is not None and not joins_cjk(tok):  # WordPiece spaces everywhere
        text = _CJK_GAP.sub("", text)
    return text


def joins_cjk(tok) -> bool:
    """Whether the tokenizer's own decoder already drops `_CJK_GAP` (a `generation_format` folder): a
    second pass is not a no-op (an empty vocabulary entry leaves a double space, and each pass drops one)."""
    dec = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    if dec is None:
        return False
    state = json.loads(dec.__getstate__())
    return any(d.get("type") == "Replace" and d.get("pattern") == {"Regex": _CJK_GAP.pattern}
               for d in state.get("decoders", []))


def _bert_style(tok) -> bool:
    return getattr(tok, "cls_token_id", None) is not None and getattr(tok, "sep_token_id", None) is not None


def save_tokenizer(tok, folder: str | Path, generation: bool = True) -> None:
    """Save `tok` in `folder` (as `save_pretrained`); with `generation` (the folder's model continues
    text) a BERT-style vocabulary then goes through `generation_format`, since `BertTokenizer` ends
    every prompt with `[SEP]` and decodes Chinese with a space between characters.
    A classifier's tokenizer is saved unchanged: it was trained on `[CLS] ... [SEP]`."""
    folder = Path(folder)
    with quiet_transformers():
        tok.save_pretrained(str(folder))
    if generation and _bert_style(tok):
        generation_format(folder, tok)


def generation_format(folder: str | Path, tok) -> bool:
    """Make the WordPiece tokenizer saved in `folder` (`tok`'s) work in plain `transformers` as in gpt2tune.

    - post-processor `[CLS] $A`: `tokenizer(prompt)` gives gpt2tune's prompt ids (`[bos] + text`),
      without the `[SEP]` that tells the model the text has ended;
    - decoder WordPiece -> Fuse -> Replace(`_CJK_GAP`, ""): the joined text loses the spaces next to
      Chinese characters and punctuation exactly as `decode` removes them (English words keep theirs);
    - `tokenizer_class: PreTrainedTokenizerFast`: `BertTokenizer` rebuilds its decoder and `[CLS] ... [SEP]`
      post-processor from the vocabulary, ignoring tokenizer.json's; no `token_type_ids` (GPT-2 would
      add them to the embeddings);
    - generation_config.json (if the model's is there already) gets `suppress_tokens`: `[PAD]`, `[UNK]`,
      `[CLS]`, `[MASK]`, which gpt2tune never generates either (a model that learned `[UNK]` would
      otherwise write it, invisibly, and go on differently).
    Idempotent; returns whether the folder was rewritten (False: no WordPiece tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, processors

    folder = Path(folder)
    tj, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (tj.is_file() and cfg_path.is_file()):
        return False
    data = json.loads(tj.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "WordPiece":
        return False
    old = data.get("decoder") or {}
    wordpiece = next((d for d in [old, *old.get("decoders", [])] if d.get("type") == "WordPiece"), {})
    backend = Tokenizer.from_file(str(tj))
    backend.decoder = decoders.Sequence([
        decoders.WordPiece(prefix=wordpiece.get("prefix", model.get("continuing_subword_prefix", "##")),
                           cleanup=wordpiece.get("cleanup", True)),
        decoders.Fuse(),
        decoders.Replace(Regex(_CJK_GAP.pattern), ""),
    ])
    cls = str(tok.cls_token)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0", pair=f"{cls}:0 $A:0 $B:1", special_tokens=[(cls, tok.cls_token_id)])
    backend.save(str(tj))
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("do_lower_case", "tokenize_chinese_chars", "strip_accents"):  # BertTokenizer's; in the normalizer
        cfg.pop(key, None)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
               model_input_names=["input_ids", "attention_mask"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
        named = (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.mask_token_id)
        gen["suppress_tokens"] = sorted({i for i in named if i is not None} - {tok.sep_token_id})
        gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True
