"""A lean GPT-2 forward pass over the parameters of a Hugging Face `GPT2LMHeadModel`.

`FastGPT2(hf_model)` does not copy or rename anything: it reads the very `nn.Parameter`s of the
HF model (plain or wrapped by peft LoRA), so the optimizer, checkpoints (same state-dict names)
and `save_pretrained` keep working on the HF model while training runs through this forward:

- fused qkv (`c_attn`, HF Conv1D layout `x @ W + b` through one `addmm`),
- causal attention without HF's mask machinery (right-padded and packed batches need no mask: a
  real token never attends to a later pad; left-padded batches are left to the HF forward):
  on the CPU written out with a cheap dropout mask when attention dropout is on or sequences are
  short, `F.scaled_dot_product_attention(is_causal=True)` otherwise (and always on GPUs),
- a chunked linear + cross-entropy (`linear_cross_entropy`) that never materialises the full
  `tokens x vocab` logits in fp32 and computes their gradient chunk by chunk.

Numerics: fp32 gives HF's loss to ~1e-6; under bf16 autocast both run their matmuls in bf16.
Bottleneck adapters (`method.adapter`, forward hooks on the `c_proj`s) are applied where their
hooks would; any other forward hook makes the model unsupported. Only GPT-2 configurations HF
computes the same way are accepted (`supported` says why not).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

IGNORE = -100


def unwrap(model):
    """The GPT2LMHeadModel inside a peft wrapper (or the model itself)."""
    inner = model
    for _ in range(3):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif type(inner).__name__ == "LoraModel" and hasattr(inner, "model"):
            inner = inner.model
        else:
            break
    return inner


def _lora_parts(mod):
    """(base Conv1D, [(A, B, scaling, dropout)]) for a peft LoRA layer, None for a plain Conv1D,
    False for anything this forward does not know."""
    name = type(mod).__name__
    if name == "Conv1D":
        return None
    if hasattr(mod, "base_layer") and hasattr(mod, "lora_A"):
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            return False
        if type(mod.base_layer).__name__ != "Conv1D":
            return False
        parts = []
        for a in mod.active_adapters:
            if a not in mod.lora_A:
                continue
            if getattr(mod, "use_dora", {}).get(a, False):
                return False
            parts.append((mod.lora_A[a].weight, mod.lora_B[a].weight, mod.scaling[a], mod.lora_dropout[a]))
        return mod.base_layer, parts
    return False


def supported(model, lora: bool = True) -> Optional[str]:
    """None when the lean GPT-2 forwards (`FastGPT2` for training, `generate.fast` for decoding)
    compute exactly what this model computes; else the reason they do not. `lora=False` asks for a
    plain GPT2LMHeadModel (decoding: adapters merged first); `lora=True` also accepts peft LoRA."""
    peft_cfg = getattr(model, "peft_config", None)
    if isinstance(peft_cfg, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_cfg.values()):
        return "prompt / prefix tuning (virtual tokens)"
    inner = unwrap(model) if lora else model
    if type(inner).__name__ != "GPT2LMHeadModel":
        return f"{type(inner).__name__} is not a {'' if lora else 'plain '}GPT2LMHeadModel"
    c = inner.config
    if getattr(c, "add_cross_attention", False) or getattr(c, "scale_attn_by_inverse_layer_idx", False) \
            or not getattr(c, "scale_attn_weights", True) or getattr(c, "reorder_and_upcast_attn", False):
        return "unusual GPT-2 attention options"
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        return f"activation {c.activation_function}"
    for blk in inner.transformer.h:
        for mod in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            parts = _lora_parts(mod)
            if parts is False or (parts is not None and not lora):
                return f"layer type {type(mod).__name__} " + ("(only Conv1D and plain LoRA)" if lora else "(merge adapters first)")
        if type(blk.ln_1).__name__ != "LayerNorm" or type(blk.ln_2).__name__ != "LayerNorm":
            return "non-LayerNorm norms"
    if type(inner.transformer.wte).__name__ != "Embedding" or type(inner.lm_head).__name__ != "Linear":
        return "embeddings or head replaced (e.g. prompt tuning, adapters on the head)"
    if getattr(inner.lm_head, "bias", None) is not None:
        return "lm_head has a bias"
    return foreign_hooks(inner)


def foreign_hooks(model) -> Optional[str]:
    """Where `model` has forward hooks other than output adapters on the `c_proj`s (hooks marked
    `output_adapter`, which run the projection's `adapter` child: the fast forward and the fast
    decoder apply those themselves); None when it has none."""
    for name, mod in model.named_modules():
        hooks = list(mod._forward_hooks.values())
        adapter_site = name.endswith(("attn.c_proj", "mlp.c_proj")) and \
            all(getattr(h, "output_adapter", False) for h in hooks)
        if mod._forward_pre_hooks or (hooks and not adapter_site):
            return f"forward hooks on {name or 'the model'}"
    return None


def right_padded(attention_mask: Optional[torch.Tensor]) -> bool:
    """True when every row is real tokens then padding: causal attention alone is then exact for
    the real tokens (none of them sees a later pad), so no mask is needed."""
    if attention_mask is None:
        return True
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with the mask drawn as 15-bit random integers (4 per 64-bit draw) instead of
    `bernoulli_` floats: ~3x cheaper on the CPU. The drop probability is p rounded to a multiple of
    1/32768 (0.1 -> 0.100007), and the scale uses that same rounded p, so E[out] = x exactly."""
    if p <= 0:
        return x
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_().view(torch.int16)[:n]
    cut = round(p * 32768)  # random_() leaves the sign bit of every 4th lane at 0: use the low 15 bits
    keep = (bits.bitwise_and_(0x7FFF) >= cut).view(x.shape)
    return x * (keep.to(x.dtype) * (32768 / (32768 - cut)))


_CAUSAL: dict = {}


def segment_blocked(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] True where attention is not allowed in a packed row: later tokens, and tokens of
    another document (a document starts where the position drops back, see `data.dataset.collate`)."""
    T = position_ids.size(1)
    seg = (position_ids[:, 1:] <= position_ids[:, :-1]).cumsum(1)
    seg = torch.cat([torch.zeros_like(seg[:, :1]), seg], 1)
    later = ~torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (later | (seg[:, :, None] != seg[:, None, :]))[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                     blocked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal softmax attention over [B, H, T, d] with dropout `p` on the probabilities, written out:
    scores as one batched matmul (scaled in place), softmax in fp32, the cheap `dropout` mask.
    With dropout, SDPA on the CPU falls back to its own unfused math path with `bernoulli_`
    (measured 13.6 ms per layer forward + backward at 4 x 128 tokens vs 7.5 here); short sequences
    without dropout are also faster here than the flash kernel (5 vs 12 ms at T=128)."""
    T, d = q.size(-2), q.size(-1)
    if blocked is None:
        key = (T, q.device)
        if key not in _CAUSAL:
            _CAUSAL[key] = ~torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        blocked = _CAUSAL[key]
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(d)).masked_fill_(blocked, float("-inf"))
    a = torch.softmax(s, -1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(dropout(a, p), v)


class GradBuffers:
    """Gradients written straight into `param.grad`, in fp32 buffers kept from step to step.

    Autograd would allocate a fresh gradient per weight at every backward (and the low-precision
    path another one for its fp32 cast): hundreds of MB that the C allocator maps and unmaps each
    step, paying page faults on every touch. Here `add(w, g)` copies into a kept buffer when
    `w.grad` is None (after `zero_grad(set_to_none=True)`) and accumulates into `w.grad` otherwise
    (gradient accumulation), so a step allocates nothing big. The buffers cost what the gradients
    cost anyway during a step; they are kept between steps."""

    def __init__(self):
        self.bufs: dict[int, torch.Tensor] = {}

    def _buffer(self, w: torch.Tensor) -> torch.Tensor:
        buf = self.bufs.get(id(w))
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
            buf = torch.empty_like(w, memory_format=torch.contiguous_format)
            self.bufs[id(w)] = buf
        return buf

    def add(self, w: torch.Tensor, g: torch.Tensor, alpha: float = 1.0) -> None:
        if w.grad is None:
            buf = self._buffer(w).copy_(g)
            w.grad = buf if alpha == 1.0 else buf.mul_(alpha)
        else:
            w.grad.add_(g, alpha=alpha)

    def index_add(self, w: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> None:
        """Add an embedding lookup's gradient (rows `ids`) into `w.grad`."""
        if w.grad is None:
            w.grad = self._buffer(w).zero_()
        w.grad.index_add_(0, ids.reshape(-1), g.reshape(-1, g.size(-1)).to(w.grad.dtype))


class Scratch:
    """Big temporaries of the fused head (logits chunk, its gradient, the head's weight gradient)
    kept between steps, for the same reason as `GradBuffers`."""

    def __init__(self):
        self.flat: dict[tuple, torch.Tensor] = {}
        self.epoch = 0  # bumped by every forward that leaves a weight gradient in `part`

    def get(self, role: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        key = (role, dtype, torch.device(device))
        buf = self.flat.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self.flat[key] = buf
        return buf[:n].view(shape)


_GENERATION = [0]  # bumped after every optimizer step (fused AdamW does not bump version counters)
_HOOKED = [False]


def _watch_optimizers() -> None:
    if not _HOOKED[0]:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: _GENERATION.__setitem__(0, _GENERATION[0] + 1))
        _HOOKED[0] = True


class _CastGrad(torch.autograd.Function):
    """Hand out a cached low-precision copy of a weight; its gradient goes into the weight's fp32
    `.grad` (what autocast's own weight cast does, without a fresh allocation per forward or per
    backward: see `GradBuffers`)."""

    @staticmethod
    def forward(ctx, w, low, grads):
        ctx.w, ctx.grads = w, grads
        return low.view_as(low)

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            return (g.float() if g.dtype != torch.float32 else g), None, None
        ctx.grads.add(ctx.w, g)
        return None, None, None


class FrozenCast:
    """Low-precision copies of weights for autocast, kept between forwards and refreshed in place.

    A copy is valid while the weight's storage, version counter and the optimizer-step generation
    are unchanged: in-place edits (a loaded state dict, merged adapters) and optimizer steps (fused
    AdamW does not bump version counters, hence the global step hook) make it refresh. Frozen
    weights (LoRA's base) are thus cast once for the whole run, trainable ones once per step into
    the same buffer (no fresh allocation and page faults at every forward)."""

    def __init__(self, grads: Optional[GradBuffers] = None):
        self.cache: dict[int, tuple] = {}
        self.grads = grads
        _watch_optimizers()

    def raw(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if w.dtype == dtype:
            return w
        key = (w.data_ptr(), w._version, dtype, _GENERATION[0] if w.requires_grad else -1)
        hit = self.cache.get(id(w))
        if hit is None or hit[0] != key:
            buf = hit[1] if hit is not None and hit[1].shape == w.shape and hit[1].dtype == dtype else None
            with torch.no_grad():
                buf = w.detach().to(dtype) if buf is None else buf.copy_(w.detach())
            hit = (key, buf)
            self.cache[id(w)] = hit
        return hit[1]

    def __call__(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if w.dtype == dtype or dtype == torch.float32:
            return w
        low = self.raw(w, dtype)
        if w.requires_grad and torch.is_grad_enabled():
            return _CastGrad.apply(w, low, self.grads)
        return low


def _adapted(mod, y: torch.Tensor) -> torch.Tensor:
    """The output of projection `mod` through its bottleneck adapter, if it has one (what the
    adapter's forward hook does in the HF forward)."""
    adapter = mod._modules.get("adapter")
    return y if adapter is None else adapter(y)


def _linear(mod, x: torch.Tensor, training: bool, cast=None) -> torch.Tensor:
    parts = _lora_parts(mod)
    base = mod if parts is None else parts[0]
    shape = x.shape[:-1] + (base.weight.size(1),)
    w, b = base.weight, base.bias
    if cast is not None and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        w = cast(w, dt)
        if b is not None and not b.requires_grad:
            b = cast(b, dt)
    out = torch.addmm(b, x.reshape(-1, x.size(-1)), w).view(shape)
    if parts is not None:
        for a, b, scale, drop in parts[1]:
            xin = drop(x) if training and isinstance(drop, torch.nn.Dropout) else x
            out = out + F.linear(F.linear(xin, a), b) * scale
    return out


class FastGPT2:
    """Lean forward of a HF GPT-2 LM (shares its parameters; follows its train/eval mode)."""

    def __init__(self, model, direct_grads: bool = True, checkpoint: bool = False):
        why = supported(model)
        if why:
            raise ValueError(f"fast GPT-2 forward not applicable: {why}")
        self.outer = model
        self.hf = unwrap(model)
        c = self.hf.config
        self.n_head = c.n_head
        self.eps = c.layer_norm_epsilon
        self.gelu = "none" if c.activation_function == "gelu" else "tanh"
        self.p_embd, self.p_attn, self.p_resid = c.embd_pdrop, c.attn_pdrop, c.resid_pdrop
        # direct_grads: weight gradients written into kept buffers, bypassing autograd's accumulation
        # (fewer allocations); off where something must see them arrive through autograd (DDP's hooks)
        self.grads = GradBuffers() if direct_grads else None
        self.cast = FrozenCast(self.grads)
        self.scratch = Scratch()
        # gradient checkpointing: keep only each block's input; its inside is recomputed in backward
        self.checkpoint = checkpoint

    @property
    def training(self) -> bool:
        return self.hf.training

    def hidden(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states [B, T, D] (after ln_f). With `position_ids` (packed rows) every
        document attends to itself only."""
        tr = self.hf.transformer
        training = self.training
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
        blocked = None if position_ids is None else segment_blocked(position_ids)
        wte = tr.wte.weight
        if training and torch.is_grad_enabled() and wte.requires_grad and wte is self.hf.lm_head.weight \
                and self.grads is not None:
            # tied embeddings: scatter the lookup's gradient straight into wte.grad (which the head's dense
            # gradient fills anyway) instead of autograd's extra zero-filled [V, D] embedding gradient
            emb = F.embedding(input_ids, wte.detach()).requires_grad_()
            emb.register_hook(lambda g, w=wte, ids=input_ids: self.grads.index_add(w, ids, g))
        else:
            emb = tr.wte(input_ids)
        x = emb + tr.wpe(pos)
        if training and self.p_embd:
            x = dropout(x, self.p_embd)
        if not right_padded(attention_mask):
            raise ValueError("FastGPT2 needs right-padded (or unpadded) rows; use the HF forward for left padding")
        recompute = self.checkpoint and training and torch.is_grad_enabled()
        for blk in tr.h:
            if recompute:  # non-reentrant: the recomputation gets the same autocast state and dropout masks
                x = torch.utils.checkpoint.checkpoint(self._block, blk, x, blocked, use_reentrant=False)
            else:
                x = self._block(blk, x, blocked)
        return F.layer_norm(x, (x.size(-1),), tr.ln_f.weight, tr.ln_f.bias, self.eps)

    def _block(self, blk, x: torch.Tensor, blocked: Optional[torch.Tensor]) -> torch.Tensor:
        training = self.training
        B, T = x.shape[:2]
        H = self.n_head
        p_attn = self.p_attn if training else 0.0
        h = F.layer_norm(x, (x.size(-1),), blk.ln_1.weight, blk.ln_1.bias, self.eps)
        qkv = _linear(blk.attn.c_attn, h, training, self.cast)
        q, k, v = qkv.view(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if q.device.type == "cpu" and (p_attn > 0 or T <= 128):
            a = causal_attention(q, k, v, p_attn, blocked)
        elif blocked is None:  # GPUs (fused kernels, dropout included) and long CPU sequences without dropout
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p_attn, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked, dropout_p=p_attn)
        a = a.transpose(1, 2).reshape(B, T, -1)
        a = _adapted(blk.attn.c_proj, _linear(blk.attn.c_proj, a, training, self.cast))
        if training and self.p_resid:
            a = dropout(a, self.p_resid)
        x = x + a
        h = F.layer_norm(x, (x.size(-1),), blk.ln_2.weight, blk.ln_2.bias, self.eps)
        h = F.gelu(_linear(blk.mlp.c_fc, h, training, self.cast), approximate=self.gelu)
        h = _adapted(blk.mlp.c_proj, _linear(blk.mlp.c_proj, h, training, self.cast))
        if training and self.p_resid:
            h = dropout(h, self.p_resid)
        x = x + h
        return x

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        return F.linear(self.hidden(input_ids, attention_mask), self.hf.lm_head.weight)

    def loss(self, batch: dict, chunk: int = 512) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Same contract as `train.objective.lm_loss`: (mean loss over real tokens, count, #correct)."""
        h = self.hidden(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        labels = batch["labels"][:, 1:].reshape(-1)
        h = h[:, :-1].reshape(-1, h.size(-1))
        return linear_cross_entropy(h, self.hf.lm_head.weight, labels, chunk, self.cast, self.scratch)


# --------------------------------------------------------------------------- fused head + loss


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


class _LinearCE(torch.autograd.Function):
    """loss = mean CE(h @ W.T, labels) over labels != -100, chunk by chunk; the gradients of h and W
    are computed in the forward pass (the loss is a scalar, backward only scales them). With a
    `Scratch` the big temporaries are kept between steps and W's gradient goes straight into
    `W.grad` through the cast's `GradBuffers`."""

    @staticmethod
    def forward(ctx, h, w, labels, chunk, dtype, need_grad, cast, sc):
        n_valid = int((labels != IGNORE).sum())
        denom = max(n_valid, 1)
        # the logits' gradient is softmax / n. In fp16 (5 exponent bits) probabilities below ~1e-4 over
        # a few thousand tokens would underflow to zero in that form, before any loss scale is applied:
        # there the low-precision products take softmax (<= 1) and the 1/n is applied after them, in fp32
        pre = 1.0 if dtype == torch.float16 else 1.0 / denom
        post = 1.0 / denom / pre
        hc_all = h.to(dtype)
        wc = cast.raw(w, dtype) if cast is not None else w
        wc = wc if wc.dtype == dtype else wc.to(dtype)
        grads = cast.grads if cast is not None else None
        if grads is None:
            sc = None
        N, V, D = h.size(0), wc.size(0), wc.size(1)
        dev = h.device
        total = torch.zeros((), dtype=torch.float32, device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        grad_h = torch.empty_like(h) if need_grad else None
        need_w = need_grad and w.requires_grad
        grad_w = None
        single = N <= chunk
        for s in range(0, N, chunk):
            hc = hc_all[s:s + chunk]
            lab = labels[s:s + chunk]
            n = hc.size(0)
            valid = lab != IGNORE
            if sc is not None:
                low = torch.mm(hc, wc.t(), out=sc.get("logits-low", (n, V), dtype, dev))
                logits = low if dtype == torch.float32 else sc.get("logits", (n, V), torch.float32, dev).copy_(low)
            else:
                logits = (hc @ wc.t()).float()
            mx = logits.amax(-1)
            safe = lab.clamp_min(0)
            tgt = logits.gather(1, safe[:, None]).squeeze(1)
            # a hit: the label's logit is the largest (argmax up to exact ties, at a fraction of its cost)
            correct += ((tgt >= mx) & valid).sum()
            e = torch.exp_(logits.sub_(mx[:, None]))  # in place: exp(logits - max)
            se = e.sum(-1)
            lse = mx + se.log()
            total += ((lse - tgt) * valid).sum()
            if need_grad:
                g = e.mul_((valid.float() * pre / se)[:, None])  # softmax * pre, in place
                g.scatter_add_(1, safe[:, None], -(valid.float() * pre)[:, None])
                if sc is not None:
                    gc = g if dtype == torch.float32 else low.copy_(g)  # the low-precision logits are spent
                else:
                    gc = g.to(dtype)
                gh = grad_h[s:s + chunk]
                gh.copy_(gc @ wc)
                if post != 1.0:
                    gh.mul_(post)
                if need_w:
                    if sc is not None:
                        part = torch.mm(gc.t(), hc, out=sc.get("head-grad", (V, D), dtype, dev))
                        if single:
                            grad_w = part
                        elif grad_w is None:
                            grad_w = sc.get("head-grad-sum", (V, D), torch.float32, dev).copy_(part)
                        else:
                            grad_w.add_(part)
                    else:
                        part = gc.t() @ hc
                        if grad_w is None:
                            grad_w = part.float()
                        else:
                            grad_w.add_(part)
        ctx.need_w = need_w
        ctx.sc = sc
        ctx.post = post
        if need_grad:
            if sc is not None:
                sc.epoch += 1
                ctx.epoch, ctx.w, ctx.grads, ctx.grad_w = sc.epoch, w, grads, grad_w
                ctx.save_for_backward(grad_h)
            else:
                if need_w and post != 1.0:
                    grad_w = grad_w.float().mul_(post)
                ctx.save_for_backward(grad_h, grad_w.to(w.dtype) if need_w else None)
        n = torch.tensor(n_valid)
        ctx.mark_non_differentiable(correct, n)
        return total / denom, correct, n

    @staticmethod
    def backward(ctx, grad_loss, _gc, _gn):
        none = (None,) * 6
        if ctx.sc is not None:
            (grad_h,) = ctx.saved_tensors
            if ctx.need_w:
                if ctx.epoch != ctx.sc.epoch:
                    raise RuntimeError("fast GPT-2 loss: another loss was computed before this one's backward; "
                                       "call backward on each loss before computing the next")
                ctx.grads.add(ctx.w, ctx.grad_w, float(grad_loss) * ctx.post)
            gh = grad_h if float(grad_loss) == 1.0 else grad_h * grad_loss.to(grad_h.dtype)
            return (gh, None) + none
        grad_h, grad_w = ctx.saved_tensors
        if float(grad_loss) == 1.0:  # the usual case: skip two full passes over [V, D] and [N, D]
            return (grad_h, grad_w if ctx.need_w else None) + none
        gw = grad_w * grad_loss.to(grad_w.dtype) if ctx.need_w else None
        return (grad_h * grad_loss.to(grad_h.dtype), gw) + none


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int = 512, cast=None,
                         scratch: Optional[Scratch] = None):
    """(mean CE of `h @ w.T` against `labels` over labels != -100, number of such labels, #argmax hits)."""
    dtype = _compute_dtype(h)
    need = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    with torch.autocast(h.device.type, enabled=False):
        loss, correct, n = _LinearCE.apply(h, w, labels, chunk, dtype, need, cast, scratch)
    return loss, int(n), correct


def tune_allocator() -> bool:
    """Keep big CPU buffers in the malloc heap instead of fresh mmaps (glibc only).

    By default glibc serves every allocation above 32 MB (a logits chunk, a vocabulary-sized
    gradient) with a new mmap and gives it back on free, so every training step pays page faults
    on hundreds of MB (measured: zeroing a 154 MB tensor 63 ms -> 19 ms). Process-wide; RSS then
    stays near its peak instead of shrinking between steps. Harmless no-op elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):
        return False
