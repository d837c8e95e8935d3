"""Decoding's fp32 products of 1 to 8 rows, compiled on first use (x86 CPUs with AVX2 and FMA).

Decoding one sequence multiplies one row by every weight matrix: a matrix-vector product bound by
memory bandwidth. PyTorch's CPU kernels (MKL) do it well enough, but around them a step pays for
waking OpenMP's threads and changing their count twice per product, and the LM head needs a
[d, vocab] copy (154 MB for GPT-2 124M) to be split over two threads. `gemv.c` is a small kernel for
exactly this case: the caller's thread and `threads - 1` workers of its own (which spin for a
millisecond between products, then sleep), the Conv1D [in, out] weights read in place as two
contiguous halves of rows (summed at the end: the same numbers for every thread count), the head
read in place as rows of [vocab, d]. `Blocks` runs every GPT-2 block of a one-row step in one call
(norms, attention over the KV cache, GELU, residuals around the products): on the 2-core AVX2 EPYC
15.1 ms per GPT-2 124M token against 17.2 for PyTorch's kernels and 16.2 for CTranslate2. `Top1`
finds the head's argmax for greedy decoding from an int8 copy (a quarter of the bytes) and a proven
bound, computing in fp32 only the rows that can win (the head: 5.5 -> 1.8 ms per token). `Gemv`
also takes 2 to 8 rows (sampling, beams), register-tiled, each row getting the numbers it gets
alone; `attend_rows` and `gelu_` do those steps' attention and GELU (see BENCHMARKS.md).

It is built with the C compiler of the machine (`$CC`, else `cc`, `gcc` or `clang`: well under a
second) into `$GPT2TUNE_NATIVE_DIR`, else `$XDG_CACHE_HOME/gpt2tune/native` (`~/.cache/...`), named by a hash of the source
and flags, and loaded with `ctypes`. Without a compiler, on other CPUs, or with `GPT2TUNE_NATIVE=0`,
`kernel()` is None and decoding uses PyTorch's kernels (`generate.fast`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from gpt2tune.errors import UserError
from gpt2tune.model.cpu import cpu_flags

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread"]
ENV = "GPT2TUNE_NATIVE"
DIR_ENV = "GPT2TUNE_NATIVE_DIR"  # where the library is built (default: the user's cache folder)
AXPY, DOT = 0, 1  # x @ W[K, N] (Conv1D) and W[N, K] . x (nn.Linear)

_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    """Whether `GPT2TUNE_NATIVE` allows the kernel (unset or 1; 0 turns it off)."""
    v = os.environ.get(ENV, "").strip()
    if v not in ("", "0", "1"):
        raise UserError(f"{ENV} must be 0 or 1, not {v!r}")
    return v != "0"


def supported_cpu(flags: Optional[frozenset] = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= flags


def compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def cache_dir() -> Path:
    own = os.environ.get(DIR_ENV)
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gpt2tune" / "native"


def build(cc: str, dest_dir: Path) -> Path:
    """Compile `gemv.c` into `dest_dir` (once per source, flags and compiler; atomic, so that
    processes building at once do not see half a file) and return the library's path."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc] + FLAGS).encode()).hexdigest()[:16]
    out = dest_dir / f"gemv-{key}.so"
    if out.exists():
        return out
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> Optional[ctypes.CDLL]:
    if not (enabled() and supported_cpu()):
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        try:
            path = build(cc, cache_dir())
        except OSError:  # an unwritable home: a folder of this process
            path = build(cc, Path(tempfile.mkdtemp(prefix="gpt2tune-native-")))
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        _state["error"] = str(e)
        return None
    lib.g2t_gemv.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_void_p,
                                                                                           ctypes.c_int]
    lib.g2t_gemv.restype = ctypes.c_int
    L, P, F, I = ctypes.c_long, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.g2t_blocks.argtypes = [P, L, P, P, P, P, L, L, L, L, L, F, I, P, I]
    lib.g2t_blocks.restype = I
    lib.g2t_top1.argtypes = [P] * 9 + [L, L, I]
    lib.g2t_top1.restype = L
    lib.g2t_top1_prepare.argtypes = [P, L, L, P, P, P, P]
    lib.g2t_top1_prepare.restype = None
    lib.g2t_attn_rows.argtypes = [P, P, P, P, L, L, L, L, L, I]
    lib.g2t_attn_rows.restype = I
    lib.g2t_gelu.argtypes = [P, L, I]
    lib.g2t_gelu.restype = None
    return lib


def kernel() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, or None where it cannot run (built and loaded once)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


MAX_ROWS = 8  # rows one call takes (gemv.c's MAXROWS)


class Gemv:
    """`__call__(x [M, K], threads) -> [M, N]` (M = 1 to `MAX_ROWS`) for one fp32 CPU weight read in
    place: `layout` "in_out" (Conv1D [K, N]) or "out_in" (nn.Linear [N, K]), with an optional bias
    [N]. Each row gets the numbers it would get alone, on any thread count."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bias: Optional[torch.Tensor], layout: str):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
            raise ValueError("Gemv needs a contiguous fp32 CPU weight")
        self.lib, self.w = lib, weight
        self.kind = AXPY if layout == "in_out" else DOT
        self.K, self.N = weight.shape if self.kind == AXPY else weight.shape[::-1]
        self.b = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        x = x.contiguous()
        M = x.size(0) if x.dim() == 2 else 0
        if not 1 <= M <= MAX_ROWS or x.size(1) != self.K or x.dtype != torch.float32:
            raise ValueError(f"Gemv takes 1 to {MAX_ROWS} fp32 rows of {self.K}, not {tuple(x.shape)} {x.dtype}")
        out = torch.empty(2 if self.kind == AXPY else 1, M, self.N)  # the result and the second half's sums
        self.lib.g2t_gemv(self.kind, self.w.data_ptr(), x.data_ptr(), out.data_ptr(), out[-1].data_ptr(),
                          M, self.K, self.N, None if self.b is None else self.b.data_ptr(), threads)
        return out[0]


class Top1:
    """The largest of `W [N, K] . x` for one fp32 row x without reading all of W: `__call__(x [1, K],
    threads)` returns [1, N] with every row that can be the largest computed exactly as `Gemv`
    computes it, and -inf elsewhere; its (first) argmax is the full product's. The LM head of greedy
    decoding: GPT-2 124M's is 154 MB of the 495 MB a token reads.

    It reads an int8 copy of W (a quarter of the bytes; per row w: q = round(w / s), s = max|w| / 127)
    and x as int16 (xq = round(x / sx)), whose product is exact in integers: a = s sx (q . xq). Then
    |fl(w . x) - a| <= g ||w|| ||x||  +  ||w - s q|| ||x||  +  s ||q|| ||x - sx xq||
    (the fp32 product's rounding, g = n u / (1 - n u) with u = 2^-24 and n = K + 10 covering its
    accumulation depth; then Cauchy-Schwarz on the two roundings to integers), kept per row as `err`
    (the factor of ||x||) and `gq` (of ||x - sx xq||), times 1.001 for the comparisons' own rounding.
    Rows whose upper bound is below the best lower bound cannot win; the others (one to a few per
    token on GPT-2s, random or pretrained) are recomputed from W. Costs an int8 copy of W."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
            raise ValueError("Top1 needs a contiguous fp32 CPU weight")
        self.lib, self.w = lib, weight
        self.N, self.K = weight.shape
        self.finite = bool(torch.isfinite(weight).all())  # else every call computes all products
        self.wq = torch.zeros(self.N, -(-self.K // 16) * 16, dtype=torch.int8)  # packed as gemv.c reads it
        self.scale, self.err, self.gq = torch.empty(self.N), torch.empty(self.N), torch.empty(self.N)
        if self.finite:  # one pass in C: 0.25 s for GPT-2 124M's head on the EPYC
            lib.g2t_top1_prepare(weight.data_ptr(), self.N, self.K, self.wq.data_ptr(), self.scale.data_ptr(),
                                 self.err.data_ptr(), self.gq.data_ptr())
        self.acc = torch.empty(self.N, dtype=torch.float64)  # the approximate products (used under the call lock)
        self.recomputed = 0  # rows recomputed from W by the last call

    def __call__(self, x: torch.Tensor, threads: int = 1, banned: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """[1, N], or None when x or W is not finite or x is zero (compute the full product then).
        `banned` [N] bool: rows the caller masks out (-inf here too): the argmax among the others."""
        x = x.contiguous()
        if x.shape != (1, self.K) or x.dtype != torch.float32:
            raise ValueError(f"Top1 takes one fp32 row of {self.K}, not {tuple(x.shape)} {x.dtype}")
        if banned is not None and (banned.shape != (self.N,) or banned.dtype != torch.bool):
            raise ValueError(f"Top1's banned rows: a bool tensor of {self.N}, not {tuple(banned.shape)} {banned.dtype}")
        if not self.finite:
            return None
        y = torch.empty(1, self.N)
        skip = None if banned is None else banned.contiguous()
        n = self.lib.g2t_top1(self.w.data_ptr(), self.wq.data_ptr(), self.scale.data_ptr(), self.err.data_ptr(),
                              self.gq.data_ptr(), x.data_ptr(), None if skip is None else skip.data_ptr(),
                              y.data_ptr(), self.acc.data_ptr(), self.N, self.K, threads)
        self.recomputed = n
        return None if n < 0 else y


def attend_rows(lib: ctypes.CDLL, qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int,
                threads: int = 1) -> torch.Tensor:
    """One layer's attention for M new tokens at cache position `t`, as `Blocks` computes it: `qkv`
    [M, 3D] (contiguous fp32), `k` / `v` that layer's cache [M, heads, max_len, head size]
    (contiguous; each row's key and value are written at `t`). Returns [M, D]."""
    M, H, max_len, hd = k.shape
    if qkv.shape != (M, 3 * H * hd) or not (qkv.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("attend_rows needs contiguous qkv [M, 3D] and caches [M, heads, max_len, head size]")
    out = torch.empty(M, H * hd)
    lib.g2t_attn_rows(qkv.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), M, H, hd, t, max_len, threads)
    return out


def gelu_(lib: ctypes.CDLL, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """GELU in place on a contiguous fp32 tensor, as `Blocks` computes it (the tanh form unless
    `exact`)."""
    if not x.is_contiguous() or x.dtype != torch.float32:
        raise ValueError("gelu_ needs a contiguous fp32 tensor")
    lib.g2t_gelu(x.data_ptr(), x.numel(), int(exact))
    return x


_BLOCK_FIELDS = ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b", "ln2_w", "ln2_b", "fc_w", "fc_b",
                 "mproj_w", "mproj_b", "k_cache", "v_cache")


class _Block(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _BLOCK_FIELDS]


def blocks_supported(model) -> bool:
    """Whether `Blocks` can run `model`'s blocks: fp32 CPU tensors, all contiguous (a plain GPT-2
    as `generate.fast` accepts it, adapters merged)."""
    tensors = [p for p in model.transformer.h.parameters()] + list(model.transformer.ln_f.parameters())
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    return all(b.attn.c_attn.bias is not None for b in model.transformer.h)


class Blocks:
    """Every block of a GPT-2 for one token in one call (`g2t_blocks`: layer norms, the products,
    the key and value written to the cache, attention over it, GELU, residuals), then the final
    norm. The numbers do not depend on `threads` (fixed splits; attention split by heads)."""

    def __init__(self, lib: ctypes.CDLL, model):
        tr, c = model.transformer, model.config
        self.lib = lib
        self.L, self.D, self.H = len(tr.h), c.n_embd, c.n_head
        self.F = tr.h[0].mlp.c_fc.weight.size(1)
        self.eps = c.layer_norm_epsilon
        self.exact_gelu = int(c.activation_function == "gelu")
        self.lnf = tr.ln_f
        self.blocks = (_Block * self.L)()
        for blk, b in zip(self.blocks, tr.h):
            mods = (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj)
            ptrs = [t.data_ptr() for m in mods for t in (m.weight, m.bias)]
            for name, ptr in zip(_BLOCK_FIELDS, ptrs):
                setattr(blk, name, ptr)
        self.keep = model  # the pointers are into its tensors
        q = max(3 * self.D, self.F)
        self.work = torch.empty(self.D + 3 * q)
        self.cache = None

    def __call__(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int, threads: int = 1) -> torch.Tensor:
        """`x` [1, D] (the token's embedding; used as the residual stream), `k` / `v` the cache
        [L, 1, H, max_len, head size] (contiguous fp32); the key and value of position `t` are
        written. Returns the final norm of the last residual [1, D]."""
        if x.shape != (1, self.D) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"Blocks takes one contiguous fp32 row of {self.D}")
        if k.dim() != 5 or k.size(1) != 1 or not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError("Blocks needs the one-row contiguous KV cache [L, 1, H, max_len, head size]")
        max_len = k.size(3)
        if self.cache != (k.data_ptr(), v.data_ptr(), max_len):
            layer = k[0].numel() * k.element_size()
            for i, blk in enumerate(self.blocks):
                blk.k_cache, blk.v_cache = k.data_ptr() + i * layer, v.data_ptr() + i * layer
            self.cache = (k.data_ptr(), v.data_ptr(), max_len)
        h = torch.empty(1, self.D)
        self.lib.g2t_blocks(self.blocks, self.L, x.data_ptr(), h.data_ptr(), self.lnf.weight.data_ptr(),
                            self.lnf.bias.data_ptr(), t, max_len, self.H, self.D, self.F, self.eps, self.exact_gelu,
                            self.work.data_ptr(), threads)
        return h
