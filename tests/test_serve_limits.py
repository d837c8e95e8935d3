"""Server and decoding robustness: per-row top-k in a mixed batch (and one top-k/top-p filter with
transformers' rules), request size limits (413/400, tokenizing off the event loop), no partial
UTF-8 characters in completions, and cancelling the rows of a client that went away."""

import dataclasses
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx")

from conftest import GPT2_BPE  # noqa: E402
from gpt2tune.generate.decode import Decoder, decode  # noqa: E402
from gpt2tune.generate.sampling import Sampling  # noqa: E402
from gpt2tune.serve.app import create_app  # noqa: E402
from gpt2tune.serve.engine import load_engine  # noqa: E402
from gpt2tune.serve.server import BackgroundServer  # noqa: E402
from serving import assert_error, batched, post, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_zh_model):
    from gpt2tune.method.io import load_run

    return load_run(tiny_zh_model)


@pytest.fixture(scope="module")
def lm_engine(tiny_zh_model):
    return load_engine(tiny_zh_model, name="tiny", max_tokens_cap=64)


# -- 11: each row its own top-k; one filter with transformers' rules ---------------------------

def test_top_k_1_row_is_greedy_whatever_the_other_rows_top_k(tiny):
    """A row's top-k must not depend on its neighbours': top-k 1 at a high temperature is greedy
    next to a row without top-k (0) and next to one whose top-k is the whole vocabulary or more."""
    model, tok, fr = tiny
    p = [fr.bos] + tok("白日", add_special_tokens=False)["input_ids"]
    q = [fr.bos] + tok("春", add_special_tokens=False)["input_ids"]
    base = Sampling(max_new_tokens=16, min_new_tokens=16, seed=0)
    greedy = decode(model, [p], fr.eos, dataclasses.replace(base, greedy=True))[0].ids
    V = model.config.vocab_size
    for other_k in (0, V, 10 ** 6):
        for seed in range(2):
            rows = [dataclasses.replace(base, top_k=1, temperature=1.5), dataclasses.replace(base, top_k=other_k)]
            dec = Decoder(model, [p, q], fr.eos, dataclasses.replace(base, seed=seed), per_row=rows)
            for _ in dec:
                pass
            assert dec.results[0].ids == greedy, (other_k, seed)
            assert len(dec.results[1].ids) == 16


def test_top_k_1_request_stays_greedy_when_batched_with_a_huge_top_k(lm_engine):
    app = create_app(lm_engine, max_batch=16, queue_size=32, wait_ms=50)
    a = {"prompt": "白日", "max_tokens": 12, "temperature": 1.5, "top_k": 1}
    b = {"prompt": "春", "max_tokens": 12, "temperature": 1.0, "top_k": 1_000_000}
    with BackgroundServer(app) as srv:
        alone = post(srv.url, "/v1/completions", dict(a, temperature=0, top_k=None)).json()["choices"][0]["text"]
        for _ in range(2):
            ra, rb = batched(srv, app.state.batcher, [a, b])
            assert ra.json()["choices"][0]["text"] == alone


def test_one_top_k_top_p_filter_with_transformers_rules_and_per_row_settings():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from gpt2tune.generate.sampling import filter_candidates, filter_logits

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=gen) * 3
    for t in (1.0, 0.7):
        for k in (0, 1, 5, 50, 300, 1000):
            for p in (1.0, 0.95, 0.5, 0.1):
                ref = x.clone()
                ref = TemperatureLogitsWarper(t)(None, ref) if t != 1.0 else ref
                ref = TopKLogitsWarper(k)(None, ref) if k else ref
                ref = TopPLogitsWarper(p)(None, ref) if p < 1 else ref
                got = filter_logits(x, t, k, p)
                assert torch.equal(torch.isinf(got), torch.isinf(ref)), (t, k, p)
                assert torch.allclose(got[~torch.isinf(got)], ref[~torch.isinf(ref)]), (t, k, p)
    # per-row settings give what each row gets alone
    ts = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.8])
    ks = torch.tensor([0, 1, 5, 10 ** 6, 40])
    ps = torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0], dtype=torch.float64)
    rows = filter_logits(x, ts, ks, ps)
    for i in range(5):
        assert torch.equal(rows[i], filter_logits(x[i:i + 1], float(ts[i]), int(ks[i]), float(ps[i]))[0]), i
    # ties: a token equal to the last one kept is kept (top-k and top-p), also past the candidates
    tied = torch.tensor([[3.0, 1.0, 1.0, 0.0, 1.0]])
    assert torch.isinf(filter_logits(tied, 1.0, 2, 1.0)).tolist() == [[False, False, False, True, False]]
    vals, idx = filter_candidates(tied, 1.0, 2, 1.0)
    assert sorted(idx[0][~torch.isinf(vals[0])].tolist()) == [0, 1, 2, 4]
    half = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert torch.isinf(filter_logits(half, 1.0, 0, 0.5)).tolist() == [[False, False, False, False]]
    assert torch.isinf(filter_logits(half, 1.0, 0, 0.3)).tolist() == [[False, True, True, True]]


def test_ties_across_the_top_k_cut_keep_the_rules_without_sorting_the_vocabulary(monkeypatch):
    """bf16 logits tie often; a tie across the k-th logit takes the tied tokens by one more
    `topk`, not by sorting the whole vocabulary, and keeps what the full sort kept (and, for top-k
    alone, what transformers' warper keeps)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    from gpt2tune.generate.sampling import filter_candidates, filter_logits

    x = (torch.randn(6, 5000, generator=torch.Generator().manual_seed(1)) * 2).bfloat16().float()
    big = x.clone()
    big[2, :40] = 9.0  # one row ties far past every row's candidates
    settings = [(x, k, p) for x in (x, big) for k in (1, 5, 50) for p in (1.0, 0.9)]
    refs = []
    for x, k, p in settings:  # the full-sort way: a seventh row without top-k makes the filter sort
        ks = torch.tensor([k] * 6 + [0])
        refs.append(filter_logits(torch.cat([x, x[:1]]), 1.0, ks, p)[:6] if p < 1 else TopKLogitsWarper(k)(None, x.clone()))
    monkeypatch.setattr(torch, "sort", lambda *a, **kw: pytest.fail("sorted the whole vocabulary"))
    ties = 0
    for (x, k, p), ref in zip(settings, refs):
        got = filter_logits(x, 1.0, k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (k, p)
        vals, idx = filter_candidates(x, 1.0, k, p)
        ties += idx.size(1) > k + 1
    assert ties  # the tied tokens did go past the first candidates


# -- 12: request size limits, tokenizing off the event loop ------------------------------------

@pytest.fixture
def limited(lm_engine, monkeypatch):
    monkeypatch.setenv("GPT2TUNE_MAX_BODY_BYTES", str(64 * 1024))
    monkeypatch.setenv("GPT2TUNE_MAX_PROMPT_CHARS", "1000")
    monkeypatch.setenv("GPT2TUNE_MAX_MESSAGES", "4")
    monkeypatch.setenv("GPT2TUNE_MAX_STOP_CHARS", "16")
    with BackgroundServer(create_app(lm_engine)) as srv:
        yield srv


def test_over_long_body_gets_413(limited):
    url = limited.url
    assert_error(post(url, "/v1/completions", {"prompt": "a" * 100_000, "max_tokens": 2}), 413, None,
                 "request_too_large")
    big = json.dumps({"prompt": "a" * 3_000_000}).encode()
    assert_error(httpx.post(url + "/v1/completions", content=big, timeout=30,
                            headers={"content-type": "application/json"}), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted while it is read
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 4096
        yield b'"}'

    assert_error(httpx.post(url + "/v1/completions", content=chunks(), timeout=30,
                            headers={"content-type": "application/json"}), 413, code="request_too_large")
    assert_error(post(url, "/v1/classify", {"input": ["x" * 1000] * 80}), 413)
    assert post(url, "/v1/completions", {"prompt": "白日", "max_tokens": 2}).status_code == 200
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_over_long_stop_prompt_and_conversation_get_400(limited):
    url = limited.url
    assert_error(post(url, "/v1/completions", {"prompt": "白", "stop": "。" * 17}), 400, "stop",
                 "string_above_max_length")
    assert_error(post(url, "/v1/completions", {"prompt": "白", "stop": ["，", "x" * 17]}), 400, "stop")
    assert_error(post(url, "/v1/completions", {"prompt": "白" * 1001}), 400, "prompt", "string_above_max_length")
    assert_error(post(url, "/v1/completions", {"prompt": ["白" * 600, "日" * 600]}), 400, "prompt")
    msgs = [{"role": "user", "content": "白"}] * 5
    assert_error(post(url, "/v1/chat/completions", {"messages": msgs}), 400, "messages", "array_above_max_length")
    msgs = [{"role": "user", "content": "白" * 600}] * 2
    assert_error(post(url, "/v1/chat/completions", {"messages": msgs}), 400, "messages", "string_above_max_length")
    r = post(url, "/v1/completions", {"prompt": "白", "stop": "。" * 16, "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_limits_from_the_environment():
    from gpt2tune.errors import UserError
    from gpt2tune.serve.schemas import Limits

    assert Limits.from_env({}) == Limits()
    assert Limits.from_env({"GPT2TUNE_MAX_BODY_BYTES": "10", "GPT2TUNE_MAX_STOP_CHARS": "3"}) == \
        Limits(body_bytes=10, stop_chars=3)
    for bad in ("x", "0", "-5"):
        with pytest.raises(UserError):
            Limits.from_env({"GPT2TUNE_MAX_MESSAGES": bad})


def test_health_answers_while_a_big_prompt_is_tokenized(lm_engine, monkeypatch):
    """A big allowed prompt is tokenized in a worker thread: the event loop (and /health) stays free."""
    monkeypatch.setenv("GPT2TUNE_MAX_PROMPT_CHARS", "400000")
    eng = dataclasses.replace(lm_engine)
    started = threading.Event()
    real = eng.encode

    def slow_encode(text, param="prompt", **kw):
        if len(text) > 100_000:
            started.set()
            time.sleep(2.0)  # a slow tokenizer, on top of the real (long) tokenizing below
        return real(text, param, **kw)

    eng.encode = slow_encode
    with BackgroundServer(create_app(eng)) as srv:
        got = {}
        big = {"prompt": "白日依山盡" * 60_000, "max_tokens": 2}  # 300,000 characters
        t = threading.Thread(target=lambda: got.setdefault("r", post(srv.url, "/v1/completions", big, timeout=120)))
        t.start()
        assert started.wait(60)
        t0 = time.monotonic()
        h = httpx.get(srv.url + "/health", timeout=30)
        took = time.monotonic() - t0
        assert h.status_code == 200 and took < 1.0, took
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 200  # so do other requests
        t.join(120)
        assert_error(got["r"], 400, "prompt", "context_length_exceeded")


# -- 13: no partial UTF-8 characters ------------------------------------------------------------

def _byte_bpe(kind, tmp_path):
    from gpt2tune.model.tokenizer import build_tokenizer, load_tokenizer

    if kind == "gpt2":
        if not GPT2_BPE.exists():
            pytest.skip(f"{GPT2_BPE} is absent (../shared test data not available)")
        return load_tokenizer(GPT2_BPE)
    text = "hello world, this is some text 😀 中文 and more words here, 🎉 again"
    return build_tokenizer([text] * 20, tmp_path / "bpe", vocab_size=300)


def _cycle_model(vocab, start, cycle):
    """A GPT-2 whose greedy continuation of `start` is `cycle` repeated: attention and MLP add
    nothing, each token's embedding is its own direction, and lm_head maps it to the next token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n = 32
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=n, n_layer=1, n_head=2, tie_word_embeddings=False,
                     bos_token_id=start, eos_token_id=start)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for blk in m.transformer.h:
            for lin in (blk.attn.c_proj, blk.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        m.transformer.wpe.weight.zero_()
        m.transformer.wte.weight.zero_()
        m.lm_head.weight.zero_()
        for j, (a, b) in enumerate(zip([start] + cycle, cycle + cycle[:1])):
            e = torch.zeros(n)
            e[j] = 1.0
            m.transformer.wte.weight[a] = e
            m.lm_head.weight[b] += torch.nn.functional.layer_norm(e, (n,))
    return m


@pytest.mark.parametrize("kind", ["built", "gpt2"])
def test_max_tokens_inside_a_multibyte_character_never_gives_u_fffd(kind, tmp_path):
    from gpt2tune.model.tokenizer import framing_of
    from gpt2tune.serve.engine import Engine

    tok = _byte_bpe(kind, tmp_path)
    fr = framing_of(tok)
    cycle = tok("😀語中文", add_special_tokens=False)["input_ids"]
    assert len(set(cycle)) == len(cycle) and fr.bos not in cycle and len(cycle) > 4
    engine = Engine(_cycle_model(len(tok), fr.bos, cycle), tok, fr, "causal-lm", "bpe", max_tokens_cap=32)
    ids = cycle * 4
    cut_inside = 0
    with BackgroundServer(create_app(engine)) as srv:
        for m in range(1, 2 * len(cycle) + 2):
            raw = tok.decode(ids[:m])
            want = raw.rstrip("\ufffd")
            cut_inside += raw != want
            body = {"prompt": "", "max_tokens": m, "temperature": 0}
            deltas = []
            with httpx.stream("POST", srv.url + "/v1/completions", json=dict(body, stream=True), timeout=30) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        deltas += [ch["text"] for ch in json.loads(line[6:])["choices"]]
            assert not any("\ufffd" in d for d in deltas) and "".join(deltas) == want, (m, deltas)
            r = post(srv.url, "/v1/completions", body)
            assert r.status_code == 200, r.text
            c = r.json()["choices"][0]
            assert c["text"] == want and c["finish_reason"] == "length", (m, c)
    assert cut_inside >= 2  # some max_tokens really cut inside a character


# -- 14: a client that goes away stops its rows -------------------------------------------------

@pytest.fixture
def slow_engine(tiny_zh_model):
    """The tiny model at ~30 ms per decoding step (a forward hook), so a 120-token completion lasts."""
    engine = load_engine(tiny_zh_model, name="slow", max_tokens_cap=120)
    engine.model.register_forward_pre_hook(lambda mod, args: time.sleep(0.03))
    return engine


def _with_spec(app, spec):
    """`app` as served by an ASGI server of that spec version (2.4: Starlette no longer listens for
    the disconnect while streaming; writes to a gone client are silently dropped by uvicorn)."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            scope = dict(scope, asgi=dict(scope.get("asgi", {}), spec_version=spec))
        await app(scope, receive, send)
    return wrapped


def _settled(url, quiet=0.8, limit=30.0):
    """The /health counters once the decoded-token count has stopped moving."""
    t0 = time.monotonic()
    last = httpx.get(url + "/health", timeout=10).json()["stats"]
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() - t0 < limit
        time.sleep(0.1)
        now = httpx.get(url + "/health", timeout=10).json()["stats"]
        if now["tokens"] != last["tokens"]:
            last, since = now, time.monotonic()
    return last


LONG = {"prompt": "白", "max_tokens": 120, "temperature": 0}


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_closing_a_stream_stops_decoding_its_row(slow_engine, spec):
    app = create_app(slow_engine)
    with BackgroundServer(_with_spec(app, spec)) as srv:
        before = _settled(srv.url)
        with httpx.stream("POST", srv.url + "/v1/completions", json=dict(LONG, stream=True), timeout=30) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
        after = _settled(srv.url)
        assert after["tokens"] - before["tokens"] < 40, after  # not the 120 asked for
        assert after["cancelled"] == before["cancelled"] + 1
        # the server still answers (and a whole completion is 120 tokens: the model would have gone on)
        r = post(srv.url, "/v1/completions", LONG, timeout=60)
        assert r.json()["usage"]["completion_tokens"] == 120


def test_client_gone_before_the_answer_stops_decoding(slow_engine):
    app = create_app(slow_engine)
    with BackgroundServer(app) as srv:
        before = _settled(srv.url)
        with pytest.raises(httpx.TimeoutException):
            post(srv.url, "/v1/completions", LONG, timeout=0.6)
        after = _settled(srv.url)
        assert 0 < after["tokens"] - before["tokens"] < 60, after
        assert after["cancelled"] == before["cancelled"] + 1


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_while_queued_costs_no_decoding(slow_engine, stream):
    app = create_app(slow_engine)
    with BackgroundServer(app) as srv:
        before = _settled(srv.url)
        app.state.batcher.pause()
        with pytest.raises(httpx.TimeoutException):
            post(srv.url, "/v1/completions", dict(LONG, stream=stream), timeout=0.5)
        time.sleep(0.3)
        app.state.batcher.resume()
        wait_for(lambda: app.state.batcher.waiting == 0)
        after = _settled(srv.url)
        assert after["tokens"] == before["tokens"] and after["cancelled"] == before["cancelled"] + 1
