"""Incremental forward passes over a KV cache for the decoding loops.

A runner owns the cache of one batch: `prefill` runs the (left-padded) prompts and returns the
next-token logits of every row; `step` feeds one token per row; `select` keeps/reorders rows
(finished rows dropped, beams reordered). Position ids count only real tokens, so a left-padded
row sees exactly the positions it would see alone.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class HFRunner:
    """Runs a `transformers` causal LM with its DynamicCache; last-position logits only."""

    def __init__(self, model):
        self.model = model
        self.past = None
        self.mask = None
        self.pos = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = mask.long().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        padded = not bool(mask.all())
        self.mask = mask if padded else None
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        self.past = out.past_key_values
        self.pos = pos[:, -1:] + 1
        return out.logits[:, -1, :].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        self.pos = self.pos + 1
        return out.logits[:, -1, :].float()

    def select(self, index: torch.Tensor) -> None:
        self.past.reorder_cache(index)
        if self.mask is not None:
            self.mask = self.mask[index]
        self.pos = self.pos[index]


class StaticGPT2Runner:
    """GPT-2 forward passes written out over a preallocated KV cache (no per-step cache growth,
    no mask rebuilding, last-position logits only). Uses the model's own modules, so it works for
    fp32, bf16 or int8-quantized weights alike; numerically it performs the same operations as
    `transformers`' SDPA path. Chosen automatically for plain GPT-2 models in eval mode."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.tr = model.transformer
        cfg = model.config
        self.H = cfg.n_head
        self.D = cfg.n_embd // cfg.n_head
        self.max_len = max_len
        self.scale = (1.0 / self.D ** 0.5) if cfg.scale_attn_weights else 1.0

    @staticmethod
    def supports(model) -> bool:
        cfg = getattr(model, "config", None)
        return (getattr(cfg, "model_type", None) == "gpt2" and hasattr(model, "transformer")
                and not cfg.scale_attn_by_inverse_layer_idx and not cfg.reorder_and_upcast_attn
                and not getattr(cfg, "add_cross_attention", False) and not model.training
                and type(model).__name__ == "GPT2LMHeadModel")

    def _layers(self, x: torch.Tensor, start: int, bias) -> torch.Tensor:
        B, T, E = x.shape
        end = start + T
        for i, block in enumerate(self.tr.h):
            h = block.ln_1(x)
            q, k, v = block.attn.c_attn(h).split(E, dim=2)
            q = q.view(B, T, self.H, self.D).transpose(1, 2)
            self.k[i, :, :, start:end] = k.view(B, T, self.H, self.D).transpose(1, 2)
            self.v[i, :, :, start:end] = v.view(B, T, self.H, self.D).transpose(1, 2)
            kk, vv = self.k[i, :, :, :end], self.v[i, :, :, :end]
            if bias is None:
                a = F.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1, scale=self.scale)
            else:
                a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, scale=self.scale)
            a = a.transpose(1, 2).reshape(B, T, E)
            x = x + block.attn.c_proj(a)
            x = x + block.mlp(block.ln_2(x))
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.tr.ln_f(x[:, -1:, :]))[:, -1, :].float()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        wte = self.tr.wte.weight
        self.k = wte.new_zeros(len(self.tr.h), B, self.H, self.max_len, self.D)
        self.v = torch.zeros_like(self.k)
        pos = mask.long().cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        self.pos = pos[:, -1:] + 1
        self.t = T
        self.keys_ok = None
        bias = None
        if not bool(mask.all()):
            self.keys_ok = torch.zeros(B, self.max_len, dtype=torch.bool, device=ids.device)
            self.keys_ok[:, :T] = mask.bool()
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            bias = causal[None, None] & mask.bool()[:, None, None, :]
            bias = bias | torch.eye(T, dtype=torch.bool, device=ids.device)[None, None]  # pad rows see themselves
        x = self.tr.wte(ids) + self.tr.wpe(pos)
        return self._logits(self._layers(x, 0, bias))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.t >= self.max_len:
            raise ValueError("the static cache is full")
        bias = None
        if self.keys_ok is not None:
            self.keys_ok[:, self.t] = True
            bias = self.keys_ok[:, None, None, : self.t + 1]
        x = self.tr.wte(tokens[:, None]) + self.tr.wpe(self.pos)
        out = self._layers(x, self.t, bias)
        self.t += 1
        self.pos = self.pos + 1
        return self._logits(out)

    def select(self, index: torch.Tensor) -> None:
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.pos = self.pos[index]
        if self.keys_ok is not None:
            self.keys_ok = self.keys_ok[index]


def make_runner(model, max_len: Optional[int] = None, kind: str = "auto"):
    """The fastest runner that supports `model`: the static-cache GPT-2 one, else `transformers`'."""
    if kind == "hf" or max_len is None or not StaticGPT2Runner.supports(model):
        return HFRunner(model)
    return StaticGPT2Runner(model, max_len)
