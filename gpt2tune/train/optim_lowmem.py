"""AdamW with a smaller state (`train.optimizer`): bf16 moments, or block-wise 8-bit moments.

torch's AdamW keeps two fp32 moments per parameter (8 bytes; twice the weights). These keep
them smaller; the parameters stay as they are (fp32) and every step's arithmetic is fp32: a
parameter's moments are decoded a chunk at a time (`CPU_CHUNK` / `GPU_CHUNK` elements: fp32
copies of 130 KB on a CPU, never of a whole tensor), updated, applied and encoded back. Tensors of fewer than
`MIN_ELEMENTS` elements (biases, layer norms, small heads) keep fp32 moments, as bitsandbytes
does: they are a sliver of the memory.

adamw_bf16 (4 bytes per parameter): both moments in bf16, which has fp32's exponent range (no
underflow of small squared gradients, unlike fp16) but 8 significant bits. Rounded to nearest,
`exp_avg_sq` would stall: with beta2 = 0.999 a step moves it by 0.1 %, below half a bf16 step
(0.2-0.4 %), so it could neither decay nor grow slowly. The moments are therefore rounded
stochastically: up with the probability of the dropped fraction, so a stored moment equals the
fp32 one in expectation and small moves accumulate. The rounding noise that remains in
`exp_avg_sq` (summed over ~1/(1 - beta2) steps) is a few % of it, ~1-2 % of the denominator.

adamw_8bit (2 bytes per parameter and 2 x 4 bytes per 256): the design of bitsandbytes'
AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each moment in
blocks of `BLOCK` values, scaled by the block's largest magnitude (kept in fp32) and stored as one
byte indexing bitsandbytes' dynamic map (a decimal exponent and a linear fraction: ~1-14 %
precision over 7 decades; signed for `exp_avg`, unsigned for the second moment), rounded to
nearest. Unlike bitsandbytes, the second moment is stored as its square root (the gradient's RMS,
the denominator itself): 7 decades of RMS are 14 of `exp_avg_sq`, so a small squared gradient
beside a large one in its block is not flushed to zero, which would leave `exp_avg / eps` as the
update (on the tests' model it also tracks fp32 AdamW's loss about 2x closer). Stochastic rounding
is not used here: with 8 bits its noise, summed over beta2's ~1000-step memory, would be as large
as the moment itself.

Why not a library: bitsandbytes 0.50.2 (CPU backend) took 3-10 s per step for GPT-2 124M's
parameters on this 2-core CPU (fused AdamW: 0.07 s) and, decoding whole tensors to fp32, peaked as
high as fp32 AdamW; torchao 0.18's AdamW8bit runs through torch.compile (40 s for 30 small steps)
and keeps its state as a tensor subclass that safetensors does not store; neither has bf16 moments.
This module is plain PyTorch and runs on any device.

Both are deterministic: the rounding noise comes from a fixed permutation table at offsets drawn
from (step, parameter index), not from torch's random stream, so a resumed run continues bit for
bit (the state is ordinary tensors, saved by the checkpoint in safetensors) and the dropout masks
are those of an `adamw` run.
"""

from __future__ import annotations

import math
import random

import torch

BLOCK = 256
MIN_ELEMENTS = 4096
# Elements updated at a time (a multiple of BLOCK). On a CPU just under torch's parallel grain
# (32768): every op then runs on the calling thread. Ops that spread over threads each wait for all
# of them, and on a loaded machine (another process on a core) that wait is a scheduler slice:
# ~7 ms per op measured here, 30-60 s per step of GPT-2 124M with 2^18-element chunks, against
# ~1-2.5 s single-threaded. On a GPU, large chunks: few kernel launches.
CPU_CHUNK = 127 * BLOCK
GPU_CHUNK = 1 << 22  # a multiple of _NOISE too

_NOISE = 1 << 16  # length of the rounding-noise table
_tables: dict = {}


def _dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed)` (8 bits, 7 decades): 256 sorted values in [-1, 1]
    (signed) or [0, 1]."""
    data = []
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * 10 ** (i - 6)
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _code_table(values: torch.Tensor) -> torch.Tensor:
    """For every bf16 bit pattern (as an unsigned 16-bit index), the index of the nearest of the
    sorted `values`: encoding is then a bf16 conversion and a table look-up, no search."""
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    x = torch.nan_to_num(x, nan=0.0).clamp(-1.0, 1.0)
    mids = (values[1:] + values[:-1]) / 2
    return torch.bucketize(x, mids).to(torch.uint8)


def _tables_on(device: torch.device) -> dict:
    if device not in _tables:
        perm = torch.randperm(_NOISE, generator=torch.Generator().manual_seed(0)).to(torch.int32)
        t = {"noise16": torch.cat([perm, perm])}  # offset o: the 2^16 values [o, o + 2^16), a permutation
        for name, signed in (("signed", True), ("unsigned", False)):
            values = _dynamic_map(signed)
            t[name] = (values, _code_table(values))
        _tables[device] = {k: (tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device))
                           for k, v in t.items()}
    return _tables[device]


def _round_bf16(x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor, offset: int) -> None:
    """Write fp32 `x` (contiguous, 1-D; overwritten) into bf16 `out`, rounded stochastically: a
    uniform 16-bit integer added to the bits that bf16 drops, then cut (carries round up)."""
    bits = x.view(torch.int32)
    n, full = bits.numel(), bits.numel() // _NOISE * _NOISE
    if full:
        bits[:full].view(-1, _NOISE).add_(noise[offset:offset + _NOISE])
    if n > full:
        bits[full:].add_(noise[offset:offset + n - full])
    out.view(torch.int16).copy_(bits.bitwise_right_shift_(16))


def _q8_empty(n: int, values: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 8-bit codes of `n` zeros: uint8 codes padded to whole blocks, fp32 block scales."""
    blocks = -(-n // BLOCK)
    zero = int((values == 0).nonzero()[0])
    return (torch.full((blocks * BLOCK,), zero, dtype=torch.uint8, device=device),
            torch.zeros(blocks, dtype=torch.float32, device=device))


class _Work:
    """Reused fp32 / int buffers of one chunk (no allocation per chunk and step)."""

    def __init__(self, device: torch.device):
        self.chunk = CPU_CHUNK if device.type == "cpu" else GPU_CHUNK
        self.f = [torch.empty(self.chunk, dtype=torch.float32, device=device) for _ in range(4)]
        self.i = torch.empty(self.chunk, dtype=torch.int32, device=device)
        self.b = torch.empty(self.chunk, dtype=torch.bfloat16, device=device)

    def decode(self, q, absmax, values, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Codes of elements [lo, hi) (whole blocks: `out`'s first `hi - lo` rounded up) to fp32."""
        b0, b1 = lo // BLOCK, -(-hi // BLOCK)
        n = (b1 - b0) * BLOCK
        idx = self.i[:n]
        idx.copy_(q[b0 * BLOCK:b1 * BLOCK])
        x = torch.index_select(values, 0, idx, out=out[:n])
        x.view(-1, BLOCK).mul_(absmax[b0:b1, None])
        return x

    def encode(self, x: torch.Tensor, q, absmax, table, lo: int, hi: int) -> None:
        """fp32 `x` (whole blocks, zero past `hi - lo`; overwritten) to codes and block scales."""
        b0, b1 = lo // BLOCK, -(-hi // BLOCK)
        blocks = x.view(-1, BLOCK)
        scale = blocks.abs().amax(1)
        absmax[b0:b1] = scale
        blocks.div_(scale.clamp_min_(torch.finfo(torch.float32).tiny)[:, None])
        half, idx = self.b[:x.numel()], self.i[:x.numel()]
        half.copy_(x)  # the nearest code via the bf16 bit pattern's table entry
        idx.copy_(half.view(torch.int16)).bitwise_and_(0xFFFF)
        torch.index_select(table, 0, idx, out=q[b0 * BLOCK:b1 * BLOCK])


class LowMemAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, as `torch.optim.AdamW`) with moments stored
    as `state`: "bf16" or "8bit" (see the module's notes). The per-parameter state holds tensors
    only: `step` (fp32 scalar, as torch's), and `exp_avg` / `exp_avg_sq` (flat; fp32 for small
    tensors, else bf16), or for 8 bits `exp_avg` / `exp_avg_sq_sqrt` (uint8 codes, padded to whole
    blocks) with their block scales `exp_avg_absmax` / `exp_avg_sq_sqrt_absmax` (fp32)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, state: str = "bf16"):
        if state not in ("bf16", "8bit"):
            raise ValueError(f"state must be bf16 or 8bit, not {state!r}")
        # `optimizer` is saved with the groups in a checkpoint: a resume with another state format is refused
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      optimizer=f"adamw_{state}"))
        self.state_format = state
        self._work: dict = {}
        self.register_load_state_dict_post_hook(LowMemAdamW._restore_dtypes)

    @staticmethod
    def _restore_dtypes(opt: "LowMemAdamW") -> None:
        """After torch's `load_state_dict`, which casts floating state to the parameter's dtype (fp32):
        the moments back to bf16 / uint8 codes (exactly: they were bf16 values or byte codes)."""
        for p, st in opt.state.items():
            if "exp_avg_sq_sqrt" in st:
                keys, dtype = ("exp_avg", "exp_avg_sq_sqrt"), torch.uint8
            elif opt.state_format == "bf16" and p.numel() >= MIN_ELEMENTS:
                keys, dtype = ("exp_avg", "exp_avg_sq"), torch.bfloat16
            else:
                continue
            for k in keys:
                st[k] = st[k].to(dtype)

    def _init_state(self, p: torch.Tensor, st: dict) -> None:
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        n = p.numel()
        if n < MIN_ELEMENTS:
            st["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
            st["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=p.device)
        elif self.state_format == "bf16":
            st["exp_avg"] = torch.zeros(n, dtype=torch.bfloat16, device=p.device)
            st["exp_avg_sq"] = torch.zeros(n, dtype=torch.bfloat16, device=p.device)
        else:  # the second moment as its square root
            tables = _tables_on(p.device)
            st["exp_avg"], st["exp_avg_absmax"] = _q8_empty(n, tables["signed"][0], p.device)
            st["exp_avg_sq_sqrt"], st["exp_avg_sq_sqrt_absmax"] = _q8_empty(n, tables["unsigned"][0], p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LowMemAdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    self._init_state(p, st)
                st["step"] += 1
                self._update(p, st, group, index, int(st["step"].item()))
        return loss

    def _update(self, p: torch.Tensor, st: dict, group: dict, index: int, step: int) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step_size = lr / (1 - beta1 ** step)
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        m_all = st["exp_avg"]
        kind = "fp32" if m_all.dtype == torch.float32 else ("bf16" if m_all.dtype == torch.bfloat16 else "8bit")
        v_all = st["exp_avg_sq_sqrt"] if kind == "8bit" else st["exp_avg_sq"]
        if p.device not in self._work:
            self._work[p.device] = _Work(p.device)
        work_bufs = self._work[p.device]
        fm, fv, fr, fd = work_bufs.f
        tables = _tables_on(p.device)
        rng = random.Random(step * 1_000_003 + index)  # rounding-noise offsets: a function of (step, parameter)
        work = p if p.dtype == torch.float32 and p.is_contiguous() else p.detach().float().contiguous()
        flat, grad = work.view(-1), p.grad.reshape(-1)
        for lo in range(0, flat.numel(), work_bufs.chunk):
            hi = min(lo + work_bufs.chunk, flat.numel())
            n = hi - lo
            w, g = flat[lo:hi], grad[lo:hi].float()
            if kind == "fp32":
                m, v = m_all[lo:hi], v_all[lo:hi]  # updated in place
            elif kind == "bf16":
                m, v = fm[:n].copy_(m_all[lo:hi]), fv[:n].copy_(v_all[lo:hi])
            else:
                m_blocks = work_bufs.decode(m_all, st["exp_avg_absmax"], tables["signed"][0], lo, hi, fm)
                r_blocks = work_bufs.decode(v_all, st["exp_avg_sq_sqrt_absmax"], tables["unsigned"][0], lo, hi, fr)
                m, v = m_blocks[:n], torch.square(r_blocks[:n], out=fv[:n])
            if wd:
                w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            rms = torch.rsqrt(v, out=fr[:n]).reciprocal_()  # sqrt(v) (torch's sqrt kernel spawns threads on small chunks)
            w.addcdiv_(m, torch.div(rms, bc2_sqrt, out=fd[:n]).add_(eps), value=-step_size)
            if kind == "bf16":
                _round_bf16(m, m_all[lo:hi], tables["noise16"], rng.randrange(_NOISE))
                _round_bf16(v, v_all[lo:hi], tables["noise16"], rng.randrange(_NOISE))
            elif kind == "8bit":
                if m_blocks.numel() > n:  # the tensor's last, partial block: zeros past its end
                    m_blocks[n:].zero_()
                    r_blocks[n:].zero_()
                work_bufs.encode(m_blocks, m_all, st["exp_avg_absmax"], tables["signed"][1], lo, hi)
                work_bufs.encode(r_blocks, v_all, st["exp_avg_sq_sqrt_absmax"], tables["unsigned"][1], lo, hi)
        if work is not p:
            p.copy_(work.view_as(p))


def state_bytes(numels, kind: str) -> int:
    """Bytes of optimizer state for parameters of `numels` elements under `train.optimizer` `kind`."""
    total = 0
    for n in numels:
        if kind == "adamw" or n < MIN_ELEMENTS:
            total += 8 * n
        elif kind == "adamw_bf16":
            total += 4 * n
        else:
            blocks = -(-n // BLOCK)
            total += 2 * (blocks * BLOCK + 4 * blocks)
        total += 4  # step
    return total
