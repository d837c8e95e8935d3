"""Fast decoding for GPT-2: a static, preallocated KV cache and a minimal per-token forward.

`FastRunner(model)` has the runner interface of `generate.runner.HFRunner` (`prefill`, `step`,
`select`), so the batched `generate.decode.Decoder` (processors, constraints, streaming, stop
strings, finished rows leaving the batch) runs unchanged on top of it:

    Decoder(model, prompts, eos_id, s, runner=FastRunner(model))

`generate_ids_fast` is a drop-in for `generate.sampling.generate_ids`. In fp32 (the default) it
computes what HF computes (greedy decoding gives HF's tokens); `dtype=torch.bfloat16` keeps a bf16
copy of the weights (half the memory traffic per token; an option, not the default: greedy text may
differ from fp32 after a few dozen tokens). Models that are not plain GPT-2 LMs (peft wrappers that
are not merged, other architectures) and beam search fall back to the reference path.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F


def fast_supported(model) -> Optional[str]:
    """None when FastRunner can run `model`; else why not."""
    if type(model).__name__ != "GPT2LMHeadModel":
        return f"{type(model).__name__} is not a plain GPT2LMHeadModel"
    c = model.config
    if getattr(c, "add_cross_attention", False) or getattr(c, "scale_attn_by_inverse_layer_idx", False) \
            or not getattr(c, "scale_attn_weights", True):
        return "unusual GPT-2 attention options"
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        return f"activation {c.activation_function}"
    for blk in model.transformer.h:
        for mod in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            if type(mod).__name__ != "Conv1D":
                return f"layer {type(mod).__name__} (merge adapters first)"
    if type(model.lm_head).__name__ != "Linear" or model.lm_head.bias is not None:
        return "unusual lm_head"
    return None


class _Weights:
    """The tensors of one GPT-2, optionally as a bf16 copy (fp32 references otherwise)."""

    def __init__(self, model, dtype: torch.dtype):
        tr = model.transformer
        # fp32: the model's own tensors (no copy), Conv1D layout [in, out] for addmm. Lower precision:
        # copies in [out, in] layout, where one row (batch 1) runs as a matrix-vector product, the
        # fastest bf16 kernel at M=1 (a bf16 GEMM with one row is slower than fp32 here)
        self.transposed = dtype != torch.float32

        def cv(t):
            t = t.detach()
            return t if t.dtype == dtype else t.to(dtype)

        def cvw(t):
            return cv(t).t().contiguous() if self.transposed else cv(t)

        self.wte = cv(tr.wte.weight)
        self.wpe = cv(tr.wpe.weight)
        self.head = self.wte if model.lm_head.weight is tr.wte.weight else cv(model.lm_head.weight)
        self.blocks = []
        for b in tr.h:
            self.blocks.append((cv(b.ln_1.weight), cv(b.ln_1.bias), cvw(b.attn.c_attn.weight), cv(b.attn.c_attn.bias),
                                cvw(b.attn.c_proj.weight), cv(b.attn.c_proj.bias), cv(b.ln_2.weight),
                                cv(b.ln_2.bias), cvw(b.mlp.c_fc.weight), cv(b.mlp.c_fc.bias),
                                cvw(b.mlp.c_proj.weight), cv(b.mlp.c_proj.bias)))
        lnf = tr.ln_f
        self.lnf = (cv(lnf.weight), cv(lnf.bias))


class FastRunner:
    """Static-KV-cache runner for GPT-2 (the interface of `generate.runner.HFRunner`)."""

    def __init__(self, model, dtype: Optional[torch.dtype] = None, max_len: Optional[int] = None):
        why = fast_supported(model)
        if why:
            raise ValueError(f"FastRunner: {why}")
        c = model.config
        self.model = model
        self.dtype = dtype or next(model.parameters()).dtype
        self.w = _Weights(model, self.dtype)
        self.H, self.D = c.n_head, c.n_embd
        self.hd = self.D // self.H
        self.eps = c.layer_norm_epsilon
        self.gelu = "none" if c.activation_function == "gelu" else "tanh"
        self.n_ctx = c.n_positions
        self.max_len = max_len or self.n_ctx
        self.device = self.w.wte.device
        self.k = self.v = None
        self.kmask = None  # [B, T] bool of real keys, None when no row is padded
        self.t = 0  # cache length
        self.pos = None  # [B] position of the next token of every row

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, out] for this runner's weight layout."""
        if not self.w.transposed:
            return torch.addmm(b, x, w)
        if x.size(0) == 1:
            return (torch.mv(w, x[0]) + b)[None]
        return F.linear(x, w, b)

    # the block forward over `x` [B, T, D] (fp32 residual stream), writing keys/values at [t0, t0+T)
    def _forward(self, x: torch.Tensor, t0: int, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        B, T, D = x.shape
        H, hd, dt, eps = self.H, self.hd, self.dtype, self.eps
        t1 = t0 + T
        for i, (l1w, l1b, aw, ab, pw, pb, l2w, l2b, fw, fb, mw, mb) in enumerate(self.w.blocks):
            h = F.layer_norm(x.to(dt), (D,), l1w, l1b, eps)
            qkv = self._lin(h.view(B * T, D), aw, ab).view(B, T, 3, H, hd)
            q = qkv[:, :, 0].transpose(1, 2)
            self.k[i, :, :, t0:t1] = qkv[:, :, 1].transpose(1, 2)
            self.v[i, :, :, t0:t1] = qkv[:, :, 2].transpose(1, 2)
            k, v = self.k[i, :, :, :t1], self.v[i, :, :, :t1]
            if mask is not None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1)
            a = self._lin(a.transpose(1, 2).reshape(B * T, D), pw, pb)
            x = x + a.view(B, T, D).to(x.dtype)
            h = F.layer_norm(x.to(dt), (D,), l2w, l2b, eps)
            h = F.gelu(self._lin(h.view(B * T, D), fw, fb), approximate=self.gelu)
            h = self._lin(h, mw, mb)
            x = x + h.view(B, T, D).to(x.dtype)
        return x

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x_last.to(self.dtype), (self.D,), self.w.lnf[0], self.w.lnf[1], self.eps)
        if h.size(0) == 1 and self.w.transposed:
            return torch.mv(self.w.head, h[0]).float()[None]
        return F.linear(h, self.w.head).float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = ids.shape
        L = len(self.w.blocks)
        cap = min(self.max_len, self.n_ctx)
        self.k = torch.zeros(L, B, self.H, cap, self.hd, dtype=self.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        if mask is not None and bool(mask.all()):
            mask = None
        if mask is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
            self.kmask = None
            amask = None
        else:
            m = mask.bool()
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
            pos = pos.masked_fill(~m, 1)  # as HFRunner: pad positions are never attended
            self.kmask = torch.zeros(B, cap, dtype=torch.bool, device=ids.device)
            self.kmask[:, :T] = m
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            amask = (causal[None] & m[:, None, :]) | torch.eye(T, dtype=torch.bool, device=ids.device)[None]
            amask = amask[:, None]
        x = (self.w.wte[ids] + self.w.wpe[pos]).float()
        x = self._forward(x, 0, amask, causal=True)
        self.t = T
        self.pos = pos[:, -1] + 1
        return self._logits(x[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.t >= self.k.size(3):
            raise ValueError("the KV cache is full (the model's context is used up)")
        x = (self.w.wte[tokens] + self.w.wpe[self.pos]).float()[:, None]
        amask = None
        if self.kmask is not None:
            self.kmask[:, self.t] = True
            amask = self.kmask[:, None, None, : self.t + 1]
        x = self._forward(x, self.t, amask, causal=False)
        self.t += 1
        self.pos = self.pos + 1
        return self._logits(x[:, -1])

    def select(self, index: torch.Tensor) -> None:
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        if self.kmask is not None:
            self.kmask = self.kmask[index]
        self.pos = self.pos[index]


def make_fast_runner(model, dtype: Optional[torch.dtype] = None):
    """A FastRunner for `model`, or the reference HF runner when the model is not a plain GPT-2."""
    from gpt2tune.generate.runner import HFRunner

    if fast_supported(model):
        return HFRunner(model)
    return FastRunner(model, dtype)


def generate_ids_fast(model, prompt_ids: list[int], eos_id: Optional[int], s, suppress_ids: Iterable[int] = (),
                      dtype: Optional[torch.dtype] = None) -> list[list[int]]:
    """`generate.sampling.generate_ids` on the fast runner: same options, same results in fp32."""
    from gpt2tune.generate.decode import Decoder
    from gpt2tune.generate.sampling import generate_ids

    if not prompt_ids:
        raise ValueError("empty prompt: start with the tokenizer's begin marker")
    if s.num_beams > 1 or fast_supported(model):
        return generate_ids(model, prompt_ids, eos_id, s, suppress_ids)
    dec = Decoder(model, [prompt_ids], eos_id, s, suppress_ids, runner=FastRunner(model, dtype))
    for _ in dec:
        pass
    return [r.ids for r in dec.results]
