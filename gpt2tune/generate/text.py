"""Text in, text out: frame the prompt like a training sample, decode without specials."""

from __future__ import annotations

from gpt2tune.errors import UserError
from gpt2tune.generate.sampling import Sampling, generate_ids
from gpt2tune.model.tokenizer import decode


def complete(model, tok, framing, prompt: str, s: Sampling) -> list[str]:
    ids = ([framing.bos] if framing.bos is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("empty prompt and the tokenizer has no begin marker to start from")
    try:
        outs = generate_ids(model, ids, framing.eos, s, suppress_ids=tok.all_special_ids)
    except ValueError as err:
        raise UserError(str(err)) from None
    return [prompt + decode(tok, o) for o in outs]
