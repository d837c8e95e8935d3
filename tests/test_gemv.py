"""The compiled one-row decoding kernel (`generate.gemv`): its products and blocks against float64
and PyTorch, the same numbers on any thread count, safe after fork and from several threads, and
how it is built (or not)."""

import multiprocessing as mp
import threading

import pytest
import torch

from gpt2tune.errors import UserError
from gpt2tune.generate import gemv


@pytest.fixture
def lib():
    k = gemv.kernel()
    if k is None:
        pytest.skip("the compiled decoding kernel is not built here (no C compiler, or not x86 with AVX2 and FMA)")
    return k


SHAPES = [(64, 300), (3072, 768), (7, 13), (1, 9), (33, 8)]  # odd sizes: every tail of the loops


@pytest.mark.parametrize("K,N", SHAPES)
def test_products_match_float64_on_every_thread_count(lib, K, N):
    torch.manual_seed(K * N)
    w, x, b = torch.randn(K, N), torch.randn(1, K), torch.randn(N)
    want = (x.double() @ w.double() + b.double()).float()
    for layout, weight in (("in_out", w), ("out_in", w.t().contiguous())):
        g = gemv.Gemv(lib, weight, b, layout)
        outs = [g(x, n) for n in (1, 2, 3, 4)]
        torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5 * K ** 0.5)
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), layout  # fixed splits: bitwise the same


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("K,N", [(96, 40), (37, 61), (40, 13), (16, 8)])  # every column tail of the row tiles
def test_several_rows_get_the_numbers_each_gets_alone(lib, layout, K, N):
    torch.manual_seed(K + N)
    w, b, x = torch.randn(K, N), torch.randn(N), torch.randn(8, K)
    g = gemv.Gemv(lib, w if layout == "in_out" else w.t().contiguous(), b, layout)
    alone = torch.cat([g(x[i:i + 1], 1) for i in range(8)])
    for n in (1, 2, 3, 4):
        for rows in (2, 3, 5, 8):
            assert torch.equal(g(x[:rows], n), alone[:rows]), (n, rows)
    torch.testing.assert_close(alone, (x.double() @ w.double() + b.double()).float(), rtol=1e-5, atol=1e-4)


def test_a_product_checks_its_input(lib):
    g = gemv.Gemv(lib, torch.randn(8, 4), None, "in_out")
    with pytest.raises(ValueError, match="1 to 8 fp32 rows of 8"):
        g(torch.randn(9, 8))
    with pytest.raises(ValueError, match="contiguous fp32 CPU"):
        gemv.Gemv(lib, torch.randn(8, 4).t(), None, "in_out")


def _near_ties(N, K, seed):
    """A head whose best rows are near copies of one row, differing about as much as int8 (or bf16)
    rounds (so approximate products order them wrongly), some exact copies (ties), and an x that
    favours them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(1, K, generator=g) * 10
    best = x[0] / x.norm() * 0.2  # a row well above the others
    idx = torch.randperm(N, generator=g)[:24]
    w[idx] = best + torch.randn(24, K, generator=g) * best.abs().mean() * 2.0 ** -torch.arange(4, 10).repeat(4)[:, None]
    w[idx[5:8]] = w[idx[4]].clone()  # exact copies: ties, the first wins
    return w.contiguous(), x


@pytest.mark.parametrize("N,K", [(1003, 37), (5000, 64), (4, 16), (3, 7)])
def test_top1_keeps_the_first_argmax_and_its_exact_products(lib, N, K):
    """`Top1` reads the head's int8 copy and recomputes only the rows that can win: the rows it
    returns are bitwise `Gemv`'s, and its first argmax is the full product's, also when rows differ
    by less than int8 can tell (the bound must hold, not just be usual), on any thread count."""
    recomputed = []
    for seed in range(12):
        w, x = _near_ties(N, K, seed) if N > 24 else (torch.randn(N, K), torch.randn(1, K))
        full, top = gemv.Gemv(lib, w, None, "out_in"), gemv.Top1(lib, w)
        want = full(x, 2)
        for threads in (1, 2, 3):
            y = top(x, threads)
            kept = torch.isfinite(y)
            assert torch.equal(y[kept], want[kept])
            assert int(y.argmax()) == int(want.argmax())
            assert bool((y[~kept] == -float("inf")).all())
        recomputed.append(top.recomputed)
    assert max(recomputed) < N or N <= 4  # it does skip rows
    if N > 24:
        assert max(recomputed) >= 5  # the near copies are all recomputed


def test_top1_leaves_out_banned_rows(lib):
    """Rows the caller bans are -inf and take no part in the screen: the argmax among the others,
    also when the banned ones include the winners and their near copies."""
    for seed in range(6):
        w, x = _near_ties(1003, 37, seed)
        want = gemv.Gemv(lib, w, None, "out_in")(x, 2)
        banned = torch.zeros(1003, dtype=torch.bool)
        top = want[0].topk(3 + seed).indices  # the best rows (and some near copies) banned
        banned[top] = True
        y = gemv.Top1(lib, w)(x, 2, banned)
        assert bool((y[0, banned] == -float("inf")).all())
        assert int(y.argmax()) == int(want.masked_fill(banned, -float("inf")).argmax())
    assert gemv.Top1(lib, w)(x, 2, torch.ones(1003, dtype=torch.bool)) is None  # nothing left to pick


def test_top1_bound_holds_where_it_is_tight(lib):
    """For x along a row's int8 rounding error the bound is nearly reached: it must hold there, and
    be no looser than 5% (a bound scaled down would let a row that wins be skipped)."""
    torch.manual_seed(0)
    N, K = 64, 48
    w = torch.randn(N, K)
    top, full = gemv.Top1(lib, w), gemv.Gemv(lib, w, None, "out_in")
    s = top.scale.double()
    e = w.double() - torch.round(w.double() / s[:, None]).clamp(-127, 127) * s[:, None]
    for r in range(0, N, 5):
        x = (e[r] / e[r].norm() * 3).float()[None]  # the worst x for row r
        top(x, 1)
        diff = abs(float(full(x, 1)[0, r]) - float(top.acc[r]))
        sx = float(x.abs().max()) / 32767
        dx = (x.double() - torch.round(x.double() / sx) * sx).norm()
        bound = float(top.err[r]) * float(x.double().norm()) + float(top.gq[r]) * float(dx)
        assert diff <= bound <= 1.05 * diff, (r, diff, bound)


def test_top1_gives_up_on_products_that_are_not_finite(lib):
    w = torch.randn(40, 16)
    top = gemv.Top1(lib, w)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 16)
        x[0, 3] = bad
        assert top(x, 2) is None
    assert top(torch.zeros(1, 16), 2) is None  # nothing to scale x by: every product (all zero)
    w[7, 0] = float("inf")
    assert gemv.Top1(lib, w.contiguous())(torch.ones(1, 16), 2) is None


def test_attention_and_gelu_of_several_rows(lib):
    """`attend_rows` writes each row's key and value into its cache and attends like SDPA, each row
    bitwise as alone on any thread count; `gelu_` follows torch's GELU in both forms."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    M, H, hd, max_len, t = 5, 4, 24, 40, 17
    k, v = torch.randn(M, H, max_len, hd), torch.randn(M, H, max_len, hd)
    qkv = torch.randn(M, 3 * H * hd)
    outs = []
    for threads in (1, 2, 3):
        kk, vv = k.clone(), v.clone()
        outs.append(gemv.attend_rows(lib, qkv, kk, vv, t, threads))
    q3 = qkv.view(M, 3, H, hd)
    assert torch.equal(kk[:, :, t], q3[:, 1]) and torch.equal(vv[:, :, t], q3[:, 2])
    assert torch.equal(kk[:, :, t + 1:], k[:, :, t + 1:]) and torch.equal(kk[:, :, :t], k[:, :, :t])
    want = F.scaled_dot_product_attention(q3[:, 0, :, None], kk[:, :, :t + 1], vv[:, :, :t + 1]).view(M, H * hd)
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    for i in (0, 3):  # a row alone: the same numbers
        alone = gemv.attend_rows(lib, qkv[i:i + 1].clone(), k[i:i + 1].clone(), v[i:i + 1].clone(), t, 2)
        assert torch.equal(alone[0], outs[0][i])
    x = torch.randn(3, 1001) * 4
    torch.testing.assert_close(gemv.gelu_(lib, x.clone(), False), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gemv.gelu_(lib, x.clone(), True), F.gelu(x), rtol=1e-5, atol=1e-6)


def _gpt2(activation="gelu_new"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=300, n_positions=64, activation_function=activation,
                     initializer_range=0.3)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_blocks_follow_the_torch_step_and_write_the_cache(lib, activation, monkeypatch):
    """`Blocks` (every block in one call) against FastRunner's own torch step, over 12 tokens:
    the same final hidden state within fp32 rounding, the same keys and values in the cache, and
    bitwise the same on one thread and on two."""
    import gpt2tune.generate.fast as fast

    m = _gpt2(activation)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    runs = {}
    for name in ("torch", "native1", "native2"):
        fast._CACHE.clear()
        r = fast.FastRunner(m, max_len=40)
        if name == "torch":
            monkeypatch.setattr(r.w, "native_blocks", None)
        else:
            assert r.w.native_blocks is not None
        threads = 2 if name == "native2" else 1
        with torch.inference_mode():
            tok = r.prefill(ids).argmax(-1)
            hs = []
            for _ in range(12):
                h = r._hidden(r._embed(tok, r.pos), None, threads)
                hs.append(h)
                tok = r._advance(h).argmax(-1)
        runs[name] = (torch.cat(hs), r.k.clone(), r.v.clone())
    fast._CACHE.clear()
    for a, b in zip(runs["torch"], runs["native1"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(runs["native1"], runs["native2"]):
        assert torch.equal(a, b)


def _product_in_child(q):
    g = gemv.Gemv(gemv.kernel(), torch.ones(64, 16), None, "in_out")
    q.put(g(torch.ones(1, 64), 2).sum().item())


def test_a_forked_child_gets_workers_of_its_own(lib):
    """The parent's worker threads do not exist in a forked child: its first product must start its
    own, not wait forever for the parent's."""
    g = gemv.Gemv(lib, torch.ones(64, 16), None, "in_out")
    assert g(torch.ones(1, 64), 2).sum().item() == 64 * 16  # the parent's workers are running
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_product_in_child, args=(q,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "the child hung in its first product"
    assert q.get(timeout=5) == 64 * 16


def test_products_from_several_threads_at_once_stay_right(lib):
    torch.manual_seed(0)
    ws = [torch.randn(256, 512) for _ in range(4)]
    xs = [torch.randn(1, 256) for _ in range(4)]
    want = [x @ w for x, w in zip(xs, ws)]
    bad = []

    def work(i):
        g = gemv.Gemv(lib, ws[i], None, "in_out")
        for _ in range(200):
            if not torch.allclose(g(xs[i], 2), want[i], atol=1e-4):
                bad.append(i)
                return

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad


def test_built_once_then_reused(tmp_path, lib):
    cc = gemv.compiler()
    first = gemv.build(cc, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert gemv.build(cc, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_off_switch_missing_compiler_and_other_cpus(monkeypatch):
    monkeypatch.setenv(gemv.ENV, "0")
    assert gemv._load() is None
    monkeypatch.setenv(gemv.ENV, "yes")
    with pytest.raises(UserError, match="GPT2TUNE_NATIVE must be 0 or 1"):
        gemv._load()
    monkeypatch.delenv(gemv.ENV)
    assert not gemv.supported_cpu(frozenset({"sse4_2", "avx"}))
    monkeypatch.setattr(gemv, "supported_cpu", lambda flags=None: True)
    monkeypatch.setattr(gemv, "compiler", lambda: None)
    assert gemv._load() is None
