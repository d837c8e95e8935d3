"""Build GPT-2 models: load a pretrained folder, or a fresh model from a size preset."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError
from gpt2tune.model.quiet import quiet_transformers
from gpt2tune.model.tokenizer import Framing

# name -> (n_layer, n_head, n_embd, n_positions); small..xl are the GPT-2 paper's sizes.
SIZES = {
    "nano": (2, 2, 64, 256),
    "micro": (4, 4, 128, 256),
    "mini": (4, 4, 256, 256),
    "small": (12, 12, 768, 1024),
    "medium": (24, 16, 1024, 1024),
    "large": (36, 20, 1280, 1024),
    "xl": (48, 25, 1600, 1024),
}


def set_special_ids(model, framing: Framing) -> None:
    """Make config and generation config agree with the tokenizer's markers.

    `uer/gpt2-chinese-*` configs lack these ids, so transformers falls back to 50256,
    outside their 21,128-token vocabulary; the tokenizer is the source of truth.
    """
    bos = framing.bos if framing.bos is not None else framing.eos
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.bos_token_id = bos
        cfg.eos_token_id = framing.eos
        cfg.pad_token_id = framing.pad


def scratch_config(size: str, vocab_size: int, n_positions: Optional[int] = None, dropout: Optional[float] = None,
                   framing: Optional[Framing] = None):
    from transformers import GPT2Config

    if size not in SIZES:
        raise UserError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    n_layer, n_head, n_embd, n_pos = SIZES[size]
    drop = 0.1 if dropout is None else dropout
    kw = dict(vocab_size=vocab_size, n_positions=n_positions or n_pos, n_embd=n_embd, n_layer=n_layer,
              n_head=n_head, resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop)
    if framing is not None:
        kw.update(bos_token_id=framing.bos if framing.bos is not None else framing.eos,
                  eos_token_id=framing.eos, pad_token_id=framing.pad)
    return GPT2Config(**kw)


def build_scratch(size: str, vocab_size: int, framing: Framing, n_positions: Optional[int] = None,
                  dropout: Optional[float] = None, seed: int = 0, attn: str = "sdpa"):
    import torch
    from transformers import GPT2LMHeadModel

    cfg = scratch_config(size, vocab_size, n_positions, dropout, framing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with quiet_transformers():
            model = GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    set_special_ids(model, framing)
    return model


def load_pretrained(folder: str | Path, framing: Framing, vocab_len: int, dropout: Optional[float] = None,
                    attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as err:
            raise UserError(f"could not read the model config in {folder}: {str(err).splitlines()[0]}") from None
        if getattr(config, "model_type", None) != "gpt2":
            raise UserError(f"{folder} holds a {config.model_type!r} model; gpt2tune fine-tunes GPT-2-family models")
        config.bos_token_id = framing.bos if framing.bos is not None else framing.eos
        config.eos_token_id = framing.eos
        config.pad_token_id = framing.pad
        if dropout is not None:
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
        if vocab_len > config.vocab_size:
            raise UserError(
                f"the tokenizer has {vocab_len} tokens but the model's embeddings only {config.vocab_size}: "
                "they do not belong together (choose the model's own tokenizer)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, attn_implementation=attn)
        except pickle.UnpicklingError:
            raise UserError(f"refused to load {folder}: its legacy .bin weights hold more than tensors "
                            "(a pickle that could run code); use safetensors weights") from None
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"could not load the model in {folder}: {str(err).splitlines()[0]}") from None
    set_special_ids(model, framing)
    return model


def count_parameters(model) -> tuple[int, int]:
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
