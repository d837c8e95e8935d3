"""Fast decoding for GPT-2: a static, preallocated KV cache and a minimal per-token forward.

`FastRunner(model, weights=...)` has the runner interface of `generate.runner.HFRunner` (`prefill`,
`step`, `select`), so the batched `generate.decode.Decoder` (processors, constraints, streaming,
stop strings, finished rows leaving the batch) and beam search run unchanged on top of it.
`generate.runner.make_runner` picks it for every plain GPT-2 LM.

Bottleneck adapters (`method.adapter`) run inside it too. Decoding one token reads every weight once, so at small batch sizes its speed is the memory
bandwidth divided by the bytes of the weights. `weights` chooses them (`Sampling.weights`):

- "model" (default): the model's own tensors. The blocks use HF's products (`addmm` in the Conv1D
  layout). On the CPU in fp32, one-row steps use `generate.gemv` (a compiled kernel that reads
  every weight in place, on x86 CPUs with AVX2 and FMA; steps of up to 8 rows too, on CPUs other
  than Intel's) or else split each product over two blocks of its input rows (so that two threads
  can stream it; the head through a [d, vocab] copy, +31% of the weights' bytes for GPT-2 124M);
  batches read the head through oneDNN, and on CPUs other than Intel's split the blocks' products
  like one row (MKL's small GEMMs are slow there). Other kernels round differently, and the tanh GELU is torch's, not HF's Python formula: the logits are
  allclose to HF's (~1e-6), not bitwise equal; greedy decoding gives HF's tokens in the tests and
  on the benchmark's 128 tokens. Greedy steps whose logits serve only their argmax
  (`step(..., top1_only=True)`, asked by `Decoder` when processors at most ban tokens) read
  the head through `gemv.Top1`: an int8 copy screens the vocabulary with a proven error bound and
  only the rows that can win are computed in fp32, so the token is the one all fp32 logits give;
- "bf16": a bf16 copy in [out, in] layout (matrix-vector kernels at batch 1; several rows as
  W @ x.T where bf16 is native): half the bytes;
- "int8": int8 weights with one scale per output channel (symmetric). On x86 CPUs with fbgemm
  the activations are quantized too, per token on the fly (W8A8 dynamic, VNNI kernels: the
  fastest at every batch size measured); elsewhere weight-only int8 with bf16 activations
  (`torch.ops.aten._weight_int8pack_mm`).

bf16 and int8 change the numbers (greedy text may part from fp32's after some tokens), hence an
option. Embedding rows are always read from the model's own tensors; layer norms and the
residual stream stay in fp32. Converted copies (and the "model" ones) are cached per model and
rebuilt when its parameters change (in-place edits or optimizer steps). One-row steps run on one
intra-op thread (`generate.threads.one_thread`) and lend the others to their big products when
that is measured to be faster (`Lending`).
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from gpt2tune.generate import gemv
from gpt2tune.generate.threads import one_thread
from gpt2tune.model.fast_gpt2 import supported

WEIGHTS = ("model", "bf16", "int8")
ONE_ROW_PARTS = 2  # blocks of input rows a one-row fp32 product is split into (see `_Linear`)
LEND_MIN = 1 << 18  # weights of at least this many elements get the caller's threads for one-row products


def split_several_rows() -> bool:
    """Whether fp32 products of several rows take `_Linear._split` (CPUs other than Intel's)."""
    from gpt2tune.model.cpu import cpu_vendor

    return cpu_vendor() not in ("GenuineIntel", "")


def fast_supported(model) -> Optional[str]:
    """None when FastRunner can run `model` (a plain GPT-2: adapters merged); else why not."""
    return supported(model, lora=False)


def fbgemm_int8(device) -> bool:
    """Whether W8A8 dynamic int8 (fbgemm) serves `device` (x86 CPUs)."""
    return torch.device(device).type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


_INT8PACK: dict = {}


def int8pack_ok(device) -> bool:
    """Whether `aten._weight_int8pack_mm` runs on `device` (checked once per device type)."""
    kind = torch.device(device).type
    if kind not in _INT8PACK:
        try:
            x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
            w = torch.ones(8, 64, dtype=torch.int8, device=device)
            torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
            _INT8PACK[kind] = True
        except (RuntimeError, NotImplementedError, AttributeError):
            _INT8PACK[kind] = False
    return _INT8PACK[kind]


_ONEDNN: dict = {}


def onednn_linear_ok(w: torch.Tensor) -> bool:
    """Whether oneDNN's linear (`mkldnn._linear_pointwise`, torch's CPU inference kernel) serves the
    fp32 [out, in] weight `w` (checked once per process)."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or not w.is_contiguous():
        return False
    if "ok" not in _ONEDNN:
        try:
            x, wt = torch.ones(1, 8), torch.ones(4, 8)
            _ONEDNN["ok"] = torch.backends.mkldnn.is_available() and bool(
                torch.ops.mkldnn._linear_pointwise(x, wt, None, "none", [], "").eq(8).all())
        except (RuntimeError, NotImplementedError, AttributeError):
            _ONEDNN["ok"] = False
    return _ONEDNN["ok"]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of `w` [out, in]: (int8 [out, in] contiguous, fp32 scale [out]) with
    w ~= q * scale[:, None]. The scale is a bf16 number, so bf16 dequantisation is exact in it."""
    w = w.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).to(torch.bfloat16).float()
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


class _Linear:
    """One projection in the chosen format; `__call__(x [M, in]) -> [M, out]`. `act` is the dtype
    its input must have."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], kind: str, conv1d: bool = True):
        # weight: Conv1D [in, out] (conv1d=True) or nn.Linear [out, in]
        self.kind = kind
        self.native = None  # a `generate.gemv.Gemv` for fp32 products of 1 to 8 rows where it is built
        self.lend = weight.numel() >= LEND_MIN  # small products are not worth waking a thread
        if kind == "model":
            self.w = weight.detach() if conv1d else weight.detach().t()  # [in, out] for addmm / mm
            self.w_oi = None if conv1d else weight.detach()
            self.b = None if bias is None else bias.detach()
            self.act = weight.dtype
            cpu32 = weight.device.type == "cpu" and weight.dtype == torch.float32
            # One row (one sequence decoding) makes a matrix-vector product bound by memory bandwidth,
            # and MKL runs it on one thread whatever the thread count (16-25 GB/s on the 2-core AVX2
            # EPYC, which streams 27-31 with two threads). So on the CPU in fp32 a one-row product is
            # split over its input: the [in, out] weight as ONE_ROW_PARTS blocks of rows (views: no
            # copy), one batched product (`bmm`, which gives each part a thread), and the parts summed:
            # 27-32 GB/s with two threads. The parts are fixed, so the numbers do not depend on the
            # thread count. The head is [vocab, d]: it keeps a [d, vocab] copy for this (154 MB for
            # GPT-2 124M), made at its first one-row product.
            self.one_row = cpu32 and self.w.size(0) % ONE_ROW_PARTS == 0
            self.parts = None
            # several rows (sampling, beams) through the same split on CPUs other than Intel's, where MKL's
            # small-row GEMMs are slow: 1.2-1.9x faster for 2 to 64 rows of GPT-2 124M's blocks on the
            # AVX2 EPYC (8 rows: 27.7 vs 46.6 ms per step). Intel CPUs keep `addmm`.
            self.split_rows = self.one_row and conv1d and split_several_rows()
            # where it is built (x86 with AVX2 and FMA, a C compiler): one row through `generate.gemv`,
            # every weight read in place (the head too: no copy) by its own threads
            lib = gemv.kernel() if cpu32 else None
            own = self.w if conv1d else self.w_oi
            self.native = gemv.Gemv(lib, own, self.b, "in_out" if conv1d else "out_in") \
                if lib is not None and own.is_contiguous() else None
            self.top1_rows = None  # the head's `gemv.Top1`, made at its first greedy one-row step
            # several rows (sampling, beams) lean on compute: oneDNN's kernel on the head's own
            # [vocab, d] tensor is 1.15-1.25x faster than MKL's best form at 8 rows; no copy needed
            self.onednn = cpu32 and not conv1d and self.b is None and onednn_linear_ok(self.w_oi)
            return
        w_oi = weight.detach().t() if conv1d else weight.detach()
        if kind == "bf16":
            from gpt2tune.model.cpu import cpu_has_bf16

            self.w = w_oi.to(torch.bfloat16).contiguous()
            self.b = None if bias is None else bias.detach().to(torch.bfloat16)
            self.act = torch.bfloat16
            # several rows where bf16 is native (AMX): W @ x.T is 1.4-1.8x faster than x @ W.T for
            # 2 to 256 rows of GPT-2's products (the same numbers up to 32 rows)
            self.w_left = w_oi.device.type == "cpu" and cpu_has_bf16()
            return
        q, scale = quantize_rows(w_oi)
        if fbgemm_int8(w_oi.device):
            self.kind = "int8-fbgemm"
            with warnings.catch_warnings():  # torch flags its quantized tensor types as deprecated
                warnings.simplefilter("ignore")
                wq = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                b = None if bias is None else bias.detach().float()
                self.packed = torch.ops.quantized.linear_prepack(wq, b)
            # 8-bit activations need VNNI (no 16-bit saturation); older x86 kernels get 7-bit ones
            self.reduce_range = not torch.cpu._is_vnni_supported()
            self.act = torch.float32
        else:
            self.q, self.scale = q, scale.to(torch.bfloat16)
            self.b = None if bias is None else bias.detach().to(torch.bfloat16)
            self.act = torch.bfloat16
            if not int8pack_ok(w_oi.device):
                self.kind = "int8-dequant"  # no int8 kernel here: dequantise on the fly (same numbers, no speed-up)

    def __call__(self, x: torch.Tensor, threads: int = 0) -> torch.Tensor:
        """`threads` 0: a product on torch's threads (prefills, big batches). `threads` >= 1: inside
        a step that runs on one thread (`FastRunner.step`), lending this product `threads` threads
        (every kind's kernel splits its work so that the numbers do not depend on it: tested); fp32
        products of up to `gemv.MAX_ROWS` rows then go to the compiled kernel, on its own threads."""
        if threads and self.native is not None and x.size(0) <= gemv.MAX_ROWS:
            return self.native(x, threads if self.lend else 1)  # torch's threads stay as they are
        if threads > 1 and self.lend:
            torch.set_num_threads(threads)
            try:
                return self._product(x)
            finally:
                torch.set_num_threads(1)
        return self._product(x)

    def top1(self, x: torch.Tensor, threads: int = 0, banned: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As `__call__` where only the first argmax of each row matters (greedy decoding), among
        the outputs not `banned` ([out] bool, the caller masks them out): for one fp32 row of the
        head through the compiled kernel, exact products only for the rows that can be the largest,
        -inf elsewhere (`gemv.Top1`: reads mostly an int8 copy, a quarter of the bytes)."""
        if threads and self.native is not None and self.b is None and self.native.kind == gemv.DOT \
                and x.size(0) == 1:
            if self.top1_rows is None:
                self.top1_rows = gemv.Top1(self.native.lib, self.w_oi)
            y = self.top1_rows(x, threads if self.lend else 1, banned)
            if y is not None:
                return y
        return self(x, threads)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "model":
            if self.native is not None and x.size(0) == 1:
                return self.native(x, 1)
            if self.one_row and x.size(0) == 1 or self.split_rows:
                return self._split(x)
            if self.onednn:
                return torch.ops.mkldnn._linear_pointwise(x, self.w_oi, None, "none", [], "")
            if self.w_oi is not None and self.b is None and x.size(0) > 1:
                return torch.mm(self.w_oi, x.t()).t()  # 1.5x faster than x @ W.T for the head at 8 rows
            return torch.mm(x, self.w) if self.b is None else torch.addmm(self.b, x, self.w)
        if self.kind == "int8-fbgemm":
            return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        if self.kind == "bf16":
            if x.size(0) == 1:  # matrix-vector: the fastest bf16 kernel for one row
                y = torch.mv(self.w, x[0])[None]
            elif self.w_left:
                y = torch.mm(self.w, x.t()).t().contiguous()
            else:
                y = torch.mm(x, self.w.t())
        elif self.kind == "int8-dequant":
            y = F.linear(x, self.q.to(x.dtype) * self.scale[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return y if self.b is None else y.add_(self.b)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ W as ONE_ROW_PARTS products over blocks of W's input rows, summed."""
        if self.parts is None:  # [parts, in/parts, out]
            w = self.w.contiguous()  # Conv1D: the weight itself; the head: its [d, vocab] copy
            self.parts = w.view(ONE_ROW_PARTS, w.size(0) // ONE_ROW_PARTS, w.size(1))
        p = torch.bmm(x.view(x.size(0), ONE_ROW_PARTS, -1).transpose(0, 1), self.parts)
        y = p[0]
        for i in range(1, ONE_ROW_PARTS):
            y = y.add_(p[i])
        return y if self.b is None else y.add_(self.b)


class _Adapted:
    """A projection followed by its bottleneck adapter (`method.adapter`, which the model applies
    with a forward hook): the adapter runs in its own dtype on the projection's output."""

    def __init__(self, lin: _Linear, adapter):
        self.lin, self.adapter = lin, adapter
        self.kind, self.act = lin.kind, lin.act

    def __call__(self, x: torch.Tensor, threads: int = 0) -> torch.Tensor:
        y = self.lin(x, threads)
        return self.adapter(y.to(self.adapter.up.weight.dtype)).to(y.dtype)


def _proj(mod, kind: str):
    lin = _Linear(mod.weight, mod.bias, kind)
    adapter = mod._modules.get("adapter")
    return lin if adapter is None else _Adapted(lin, adapter)


class _Weights:
    """The projections of one GPT-2 in one format; norms, embeddings and bottleneck adapters are
    the model's own."""

    def __init__(self, model, kind: str):
        tr = model.transformer
        self.kind = kind
        self.blocks = [(b.ln_1, _Linear(b.attn.c_attn.weight, b.attn.c_attn.bias, kind), _proj(b.attn.c_proj, kind),
                        b.ln_2, _Linear(b.mlp.c_fc.weight, b.mlp.c_fc.bias, kind), _proj(b.mlp.c_proj, kind))
                       for b in tr.h]
        self.head = _Linear(model.lm_head.weight, None, kind, conv1d=False)
        self.dtype = self.head.act  # activations and KV cache
        self.lendings: dict[int, Lending] = {}
        # steps of 2 to gemv.MAX_ROWS fp32 rows on CPUs other than Intel's (as `split_several_rows`; not
        # timed on Intel's): their products through the compiled kernel, on one torch thread
        self.native_rows = self.head.native is not None and split_several_rows()
        # one-row fp32 steps: every block in one call of the compiled kernel, where it is built
        plain = all(isinstance(blk[i], _Linear) for blk in self.blocks for i in (1, 2, 4, 5))  # no adapters
        lib = gemv.kernel() if kind == "model" and plain and self.head.native is not None else None
        self.native_blocks = gemv.Blocks(lib, model) if lib is not None and gemv.blocks_supported(model) else None

    def lending_for(self, rows: int) -> "Lending":
        """The lending choice of one-thread steps of `rows` rows (timed apart: their costs differ)."""
        return self.lendings.setdefault(rows, Lending())


class Lending:
    """Whether one-row steps lend their threads to the big products: timed, not guessed. On an idle
    2-core EPYC lending makes greedy fp32 decoding of GPT-2 124M 1.3-1.5x faster; with another busy
    process on the machine it halves it (every product waits for a descheduled partner: 10.5 vs 20.5
    tok/s). On an idle 2-core Xeon (AMX) lending the threads to the bf16 and int8 kernels as well
    makes greedy decoding with `weights` bf16 1.6x faster (40 -> 65 tok/s) and int8 1.7x (72 ->
    122), with fp32 at 47-48 tok/s, near that machine's copy bandwidth (53). The numbers are the
    same either way (fixed parts), so each step may take either: the faster by a running average of
    step times, and every `probe`-th step the other, to notice a change of load."""

    def __init__(self, probe: int = 32, keep: float = 0.7):
        self.probe, self.keep = probe, keep
        self.seconds: dict = {True: None, False: None}
        self.steps = 0

    def choose(self) -> bool:
        self.steps += 1
        lent, solo = self.seconds[True], self.seconds[False]
        if lent is None or solo is None:
            return lent is None  # try each once
        best = lent <= solo
        return (not best) if self.steps % self.probe == 0 else best

    def record(self, lend: bool, seconds: float) -> None:
        old = self.seconds[lend]
        self.seconds[lend] = seconds if old is None else self.keep * old + (1 - self.keep) * seconds


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(model) -> tuple:
    from gpt2tune.model.fast_gpt2 import _GENERATION, _watch_optimizers

    _watch_optimizers()  # fused optimizers do not bump version counters: count their steps instead
    return (_GENERATION[0],) + tuple((p.data_ptr(), p._version) for p in model.parameters())


def weights_for(model, kind: str) -> _Weights:
    """The model's projections in format `kind`, cached while its parameters stay the same."""
    if kind not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, not {kind!r}")
    fp = _fingerprint(model)  # "model": views of the model's own tensors and the one-row copies
    per_model = _CACHE.setdefault(model, {})
    hit = per_model.get(kind)
    if hit is None or hit[0] != fp:
        for k in [k for k, v in per_model.items() if v[0] != fp]:
            del per_model[k]  # copies of weights that have changed since
        with torch.no_grad():
            hit = (fp, _Weights(model, kind))
        per_model[kind] = hit
    return hit[1]


class FastRunner:
    """Static-KV-cache runner for GPT-2 (the interface of `generate.runner.HFRunner`). Inference
    only: no dropout, whatever the model's mode."""

    def __init__(self, model, weights: str = "model", max_len: Optional[int] = None):
        why = fast_supported(model)
        if why:
            raise ValueError(f"FastRunner: {why}")
        c = model.config
        self.model = model
        self.tr = model.transformer
        self.w = weights_for(model, weights)
        self.dtype = self.w.dtype
        self.H, self.D = c.n_head, c.n_embd
        self.hd = self.D // self.H
        self.eps = c.layer_norm_epsilon
        self.gelu = "none" if c.activation_function == "gelu" else "tanh"
        self.n_ctx = c.n_positions
        self.max_len = min(max_len or self.n_ctx, self.n_ctx)
        self.device = self.tr.wte.weight.device
        self.k = self.v = None
        self.kmask = None  # [B, T] bool of real keys, None when no row is padded
        self.t = 0  # cache length
        self.pos = None  # [B] position of the next token of every row

    def _norm(self, x: torch.Tensor, ln) -> torch.Tensor:
        return F.layer_norm(x, (self.D,), ln.weight, ln.bias, self.eps).to(self.dtype)

    # the block forward over `x` [B, T, D] (residual stream in the model's dtype), writing keys/values at [t0, t0+T)
    def _forward(self, x: torch.Tensor, t0: int, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        B, T, D = x.shape
        H, hd = self.H, self.hd
        t1 = t0 + T
        for i, (ln1, attn, proj, ln2, fc, mproj) in enumerate(self.w.blocks):
            qkv = attn(self._norm(x, ln1).view(B * T, D)).view(B, T, 3, H, hd)
            q = qkv[:, :, 0].transpose(1, 2)
            self.k[i, :, :, t0:t1] = qkv[:, :, 1].transpose(1, 2)
            self.v[i, :, :, t0:t1] = qkv[:, :, 2].transpose(1, 2)
            k, v = self.k[i, :, :, :t1], self.v[i, :, :, :t1]
            if mask is not None:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1)
            a = proj(a.transpose(1, 2).reshape(B * T, D))
            x = x + a.view(B, T, D).to(x.dtype)
            h = F.gelu(fc(self._norm(x, ln2).view(B * T, D)), approximate=self.gelu)
            x = x + mproj(h).view(B, T, D).to(x.dtype)
        return x

    def _logits(self, x_last: torch.Tensor, n: int = 0) -> torch.Tensor:
        return self.w.head(self._norm(x_last, self.tr.ln_f), n).float()

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.tr.wte.weight[ids] + self.tr.wpe.weight[pos]

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = ids.shape
        L = len(self.w.blocks)
        self.k = torch.zeros(L, B, self.H, self.max_len, self.hd, dtype=self.dtype, device=self.device)
        self.v = torch.zeros_like(self.k)
        self._cache_views()
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
            self.kmask = torch.zeros(B, self.max_len, dtype=torch.bool, device=ids.device)
            self.kmask[:, :T] = m
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            amask = (causal[None] & m[:, None, :]) | torch.eye(T, dtype=torch.bool, device=ids.device)[None]
            amask = amask[:, None]
        x = self._forward(self._embed(ids, pos), 0, amask, causal=True)
        self.t = T
        self.pos = pos[:, -1] + 1
        return self._logits(x[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, top1_only: bool = False, banned: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next-token logits [B, V] after `tokens` [B]. `top1_only`: the caller takes only each
        row's (first) argmax after masking out the `banned` tokens ([V] bool, or None), so a one-row
        fp32 step may return exact logits for the tokens that can be the largest and -inf for the
        others (`_Linear.top1`); that argmax is the same."""
        if self.t >= self.max_len:
            raise ValueError("the KV cache is full (the model's context is used up)")
        amask = None
        if self.kmask is not None:
            self.kmask[:, self.t] = True
            amask = self.kmask[:, None, None, : self.t + 1]
        B = tokens.size(0)
        if B > 1 and not (self.w.native_rows and B <= gemv.MAX_ROWS):  # other batches keep every thread for their GEMMs
            return self._advance(self._hidden(self._embed(tokens, self.pos), amask))
        with one_thread() as n:
            if n == 1:
                return self._advance(self._hidden(self._embed(tokens, self.pos), amask, 1), 1, top1_only, banned)
            lending = self.w.lending_for(B)
            lend = lending.choose()
            lent = n if lend else 1
            t0 = time.perf_counter()
            h = self._hidden(self._embed(tokens, self.pos), amask, lent)
            logits = self._advance(h, lent, top1_only, banned)
            if lending.steps > 1:  # the first step builds the head's one-row copy
                lending.record(lend, time.perf_counter() - t0)
            return logits

    def _advance(self, h: torch.Tensor, n: int = 0, top1_only: bool = False,
                 banned: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.t += 1
        self.pos = self.pos + 1
        return (self.w.head.top1(h, n, banned) if top1_only else self.w.head(h, n)).float()

    def _hidden(self, x: torch.Tensor, amask: Optional[torch.Tensor], n: int = 0) -> torch.Tensor:
        """The final norm of the blocks' output for one new token per row: one call of the
        compiled kernel (`generate.gemv.Blocks`) for one unmasked fp32 row where it is built,
        else `_step_forward`."""
        native = self.w.native_blocks
        if native is not None and x.size(0) == 1 and amask is None and self.k.is_contiguous():
            return native(x, self.k, self.v, self.t, n)
        return self._norm(self._step_forward(x, amask, n), self.tr.ln_f)

    def _step_forward(self, x: torch.Tensor, amask: Optional[torch.Tensor], n: int = 0) -> torch.Tensor:
        """`_forward` for one new token per row, `x` [B, D]: per-layer cache views made once per
        batch, no [B, T, ...] reshapes, the key and value written straight from the qkv row. Half
        the tensor ops of `_forward`, the same numbers: 0.28 ms less CPU per token over 12 layers
        (1.73 vs 2.01 ms with tiny matrices), about 1% of a GPT-2 124M token."""
        B, D, H, hd, t = x.size(0), self.D, self.H, self.hd, self.t
        t1 = t + 1
        # 2 to 8 unmasked fp32 rows through the compiled kernel: attention and GELU too (SDPA over 8 rows
        # on one thread and torch's GELU were 4 ms of a 44 ms GPT-2 124M step on the EPYC)
        lib = self.w.head.native.lib if n and self.w.native_rows and amask is None and B <= gemv.MAX_ROWS \
            and self.k.is_contiguous() else None
        for (ln1, attn, proj, ln2, fc, mproj), k, v in zip(self.w.blocks, self.kl, self.vl):
            qkv = attn(self._norm(x, ln1), n)
            if lib is not None:
                a = gemv.attend_rows(lib, qkv, k, v, t, n)
                x = x + proj(a, n)
                x = x + mproj(gemv.gelu_(lib, fc(self._norm(x, ln2), n), self.gelu == "none"), n)
                continue
            qkv = qkv.view(B, 3, H, 1, hd)
            k.select(2, t).copy_(qkv[:, 1, :, 0])
            v.select(2, t).copy_(qkv[:, 2, :, 0])
            a = F.scaled_dot_product_attention(qkv[:, 0], k[:, :, :t1], v[:, :, :t1], attn_mask=amask)
            x = x + proj(a.view(B, D), n).to(x.dtype)  # a [B, H, 1, hd] is contiguous
            x = x + mproj(F.gelu(fc(self._norm(x, ln2), n), approximate=self.gelu), n).to(x.dtype)
        return x

    def _cache_views(self) -> None:
        self.kl, self.vl = self.k.unbind(0), self.v.unbind(0)  # [B, H, max_len, hd] per layer

    def select(self, index: torch.Tensor) -> None:
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self._cache_views()
        if self.kmask is not None:
            self.kmask = self.kmask[index]
        self.pos = self.pos[index]


@torch.inference_mode()
def logits_drift(model, weights: str, ids: torch.Tensor) -> dict:
    """How far decoding with `weights` moves the logits from the model's own on `ids` [1, T]
    (every position of one prefill): max and mean |difference|, share of positions with the same
    top-1 token, mean KL(model || weights)."""
    a = model(input_ids=ids).logits.float()[0]
    r = FastRunner(model, weights, max_len=ids.size(1))
    with torch.inference_mode():
        B, T = ids.shape
        r.k = torch.zeros(len(r.w.blocks), B, r.H, T, r.hd, dtype=r.dtype, device=r.device)
        r.v = torch.zeros_like(r.k)
        x = r._forward(r._embed(ids, torch.arange(T, device=ids.device).expand(B, T)), 0, None, causal=True)
        b = r._logits(x[0])
    d = (a - b).abs()
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"max_abs_logit_diff": round(float(d.max()), 4), "mean_abs_logit_diff": round(float(d.mean()), 4),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "mean_kl": round(float(kl.mean()), 5)}
