"""`gpt2tune serve`: the OpenAI-compatible API driven by the official `openai` client and httpx
against uvicorn running in a thread on a free loopback port, with a tiny model."""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from conftest import ROOT  # noqa: E402
from gpt2tune.serve.app import create_app  # noqa: E402
from gpt2tune.serve.engine import load_engine  # noqa: E402
from gpt2tune.serve.server import BackgroundServer  # noqa: E402
from serving import assert_error, batched, post, wait_for  # noqa: E402

LABELS = {0: "ham", 1: "spam"}


@pytest.fixture(scope="module")
def lm_engine(tiny_zh_model):
    return load_engine(tiny_zh_model, name="tiny", max_tokens_cap=64)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_zh_model):
    """The tiny model with gpt2tune's plain chat template saved next to it (what task: chat writes)."""
    from gpt2tune.chat.template import install, make_template, save_template
    from gpt2tune.method.io import load_run

    model, tok, framing = load_run(tiny_zh_model)
    template = make_template("plain", tok, framing)
    install(template, tok, model)
    d = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    save_template(template, d)
    return d


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_zh_model):
    """A (random) tiny classifier saved as task: classification saves it."""
    from gpt2tune.classify.model import classifier_from_lm
    from gpt2tune.method.io import load_run
    from gpt2tune.tasks.classification import _fix_architecture

    lm, tok, framing = load_run(tiny_zh_model)
    clf = classifier_from_lm(lm, LABELS, framing.pad, seed=0)
    d = tmp_path_factory.mktemp("classifier")
    clf.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    _fix_architecture(d)
    return d


@pytest.fixture(scope="module")
def server(lm_engine):
    with BackgroundServer(create_app(lm_engine, max_batch=8, queue_size=32, timeout=30)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


# -- the official client ------------------------------------------------------------------------

def test_openai_client_lists_the_model_and_completes(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="白日", max_tokens=8, n=2, seed=3)
    assert r.object == "text_completion" and len(r.choices) == 2
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and isinstance(c.text, str) for c in r.choices)
    assert r.usage.prompt_tokens == 3  # [CLS] 白 日
    assert 2 <= r.usage.completion_tokens <= 16
    again = client.completions.create(model="tiny", prompt="白日", max_tokens=8, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # a seed makes it reproducible


def test_prompt_list_gives_prompt_major_choices(client):
    r = client.completions.create(model="tiny", prompt=["白日", "春眠不覺"], max_tokens=4, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples of a prompt agree
    assert r.usage.prompt_tokens == 3 + 5


def test_streamed_completion_matches_the_unstreamed_one(client):
    body = dict(model="tiny", prompt="床前", max_tokens=12, seed=11)
    whole = client.completions.create(**body).choices[0]
    pieces, finish = [], None
    for chunk in client.completions.create(stream=True, **body):
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) >= 2  # really streamed, token by token
    assert "".join(pieces) == whole.text and finish == whole.finish_reason


def test_stream_ends_with_done_and_reports_usage(server):
    body = {"prompt": "白日", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 3
    assert 1 <= chunks[-1]["usage"]["completion_tokens"] <= 6


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model="tiny", prompt="白日", max_tokens=24, temperature=0).choices[0].text
    cjk = [ch for ch in free[2:] if "\u4e00" <= ch <= "\u9fff"]
    if not cjk:
        pytest.skip(f"the greedy text {free!r} has no Chinese character to stop at")
    stop = cjk[0]
    r = client.completions.create(model="tiny", prompt="白日", max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert r.text == free[:free.index(stop)] and r.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="白日", max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == r.text
    # a long stop string holds text back; the short one that hits releases it, up to the cut
    for seed in range(20):
        text = client.completions.create(model="tiny", prompt="白日", max_tokens=24, temperature=1.0, seed=seed).choices[0].text
        late = [i for i, ch in enumerate(text) if i >= 3 and text.index(ch) == i]
        if late:
            break
    else:
        pytest.skip("no sampled text with a character that first comes after the third")
    stops = [text[late[0]], "never-in-the-text"]
    kw = dict(model="tiny", prompt="白日", max_tokens=24, temperature=1.0, seed=seed, stop=stops)
    r = client.completions.create(**kw).choices[0]
    assert r.text == text[:late[0]] and r.finish_reason == "stop"
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices) == r.text


def test_verse_form_with_acrostic(client):
    r = client.completions.create(model="tiny", prompt="", max_tokens=1, extra_body={
        "form": "wuyan-jueju", "acrostic": "白黃", "echo": True}, seed=5)
    text = r.choices[0].text
    assert re.fullmatch(r"(?:[\u4e00-\u9fff]{5}，[\u4e00-\u9fff]{5}。){2}", text), text
    assert text[0] == "白" and text[6] == "黃"


def test_verse_rhyme_follows_the_requested_prosody(server):
    from gpt2tune.evaluate import classical
    from gpt2tune.evaluate.prosody import LEVEL, rhyme_key

    for prosody in ("classical", "modern", None):
        body = {"prompt": "", "max_tokens": 1, "form": "wuyan-jueju", "rhyme": True, "seed": 3, "n": 4}
        if prosody:
            body["prosody"] = prosody
        r = post(server.url, "/v1/completions", body)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            ends = [c["text"][10], c["text"][22]]  # the last characters of lines 2 and 4
            if prosody == "modern":
                assert rhyme_key(ends[0]) == rhyme_key(ends[1]) is not None, c["text"]
            else:  # classical, the default: one level-tone 平水韻 group
                groups = [{x.group for x in classical.info(ch).readings if x.tone == LEVEL} for ch in ends]
                assert groups[0] & groups[1], c["text"]
    r = post(server.url, "/v1/completions", {"prompt": "", "form": "wuyan-jueju", "rhyme": True, "prosody": "tang"})
    assert r.status_code == 400


def test_verse_tone_pattern_and_rhyme_group(server):
    from gpt2tune.evaluate import patterns as tp
    from gpt2tune.evaluate.poems import parse_poem
    from gpt2tune.generate.forms import tone_sets

    body = {"prompt": "", "max_tokens": 1, "form": "wuyan-jueju", "rhyme": True, "seed": 3, "n": 3, "tones": "strict",
            "pattern": "ze-unrhymed", "rhyme_group": "陽"}
    r = post(server.url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    pat = tp.pattern("ze-unrhymed", 4, 5)
    for c in r.json()["choices"]:
        lines = parse_poem(c["text"], 4, 5)
        assert tp.fits([tone_sets(list(line), "classical") for line in lines], pat, "strict"), c["text"]
        assert all("下平七陽" in classical_groups(line[-1]) for line in lines[1::2]), c["text"]
    for bad in ({"tones": "loose"}, {"rhyme_group": "陽"}, {"tones": "strict", "form": None}):
        r = post(server.url, "/v1/completions", {"prompt": "", "form": "wuyan-jueju", **bad})
        assert r.status_code == 400, (bad, r.text)


def classical_groups(ch):
    from gpt2tune.evaluate import classical

    return classical.rhyme_groups(ch)


def test_chat_completions_with_the_openai_client(chat_dir):
    engine = load_engine(chat_dir, name="chat", max_tokens_cap=32)
    assert engine.task == "chat"
    with BackgroundServer(create_app(engine)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        msgs = [{"role": "system", "content": "短"}, {"role": "user", "content": "白日"}]
        r = c.chat.completions.create(model="chat", messages=msgs, max_tokens=10, seed=2)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
        prompt = engine.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert r.usage.prompt_tokens == len(engine.tok(prompt, add_special_tokens=False)["input_ids"])
        streamed = []
        for chunk in c.chat.completions.create(model="chat", messages=msgs, max_tokens=10, seed=2, stream=True):
            streamed += [ch.delta.content or "" for ch in chunk.choices]
        assert "".join(streamed) == r.choices[0].message.content
        # completions still work on a chat run; classify does not
        assert c.completions.create(model="chat", prompt="白", max_tokens=2).choices
        assert_error(post(srv.url, "/v1/classify", {"input": "x"}), 400, code="wrong_task")
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="chat", messages=[{"role": "assistant", "content": "hi"}])


def test_classify_endpoint(classifier_dir):
    from gpt2tune.classify.predict import load_classifier, predict

    engine = load_engine(classifier_dir, name="clf")
    assert engine.task == "classification" and engine.labels == ["ham", "spam"]
    texts = ["白日依山盡", "free prize call now", "床前明月光"]
    model, tok = load_classifier(classifier_dir)
    want = predict(model, tok, texts)
    with BackgroundServer(create_app(engine)) as srv:
        r = post(srv.url, "/v1/classify", {"model": "clf", "input": texts})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want):
            assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)
            assert sum(g["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        one = post(srv.url, "/v1/classify", {"input": "白日"}).json()["results"]
        assert len(one) == 1 and one[0]["label"] in LABELS.values()
        assert_error(post(srv.url, "/v1/completions", {"prompt": "x"}), 400, code="wrong_task")
        assert_error(post(srv.url, "/v1/classify", {"input": []}), 400, param="input")


# -- bad requests -------------------------------------------------------------------------------

BAD = [
    ({"prompt": "白", "max_tokens": "10"}, "max_tokens", None),
    ({"prompt": 5}, None, None),
    ({"prompt": [1, 2, 3]}, None, None),
    ({"prompt": "白", "temperatur": 1}, "temperatur", None),
    ({"prompt": "白", "max_tokens": 65}, "max_tokens", "max_tokens_too_large"),
    ({"prompt": "白" * 200, "max_tokens": 4}, "prompt", "context_length_exceeded"),
    ({"prompt": "白" * 120, "max_tokens": 20}, "prompt", "context_length_exceeded"),
    ({"prompt": "白", "n": 0}, "n", None),
    ({"prompt": "白", "n": True}, "n", None),
    ({"prompt": "白", "temperature": -1}, "temperature", None),
    ({"prompt": "白", "top_p": 0}, "top_p", None),
    ({"prompt": "白", "stop": ["", "x"]}, "stop", None),
    ({"prompt": "白", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"prompt": "白", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"prompt": "白", "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({"prompt": "白", "form": "sonnet"}, "form", "invalid_form"),
    ({"prompt": "白", "acrostic": "春"}, "form", "invalid_form"),
    ({"prompt": "abc", "form": "wuyan-jueju"}, "prompt", "invalid_form"),
    ({"prompt": "白", "form": "wuyan-jueju", "acrostic": "ab"}, "form", "invalid_form"),
    ({"prompt": []}, "prompt", None),
    ({"prompt": "白", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", None),
]


@pytest.mark.parametrize("body,param,code", BAD)
def test_bad_completion_requests_get_openai_style_400(server, body, param, code):
    assert_error(post(server.url, "/v1/completions", body), 400, param, code)


def test_other_bad_requests_and_the_server_survives(server, client):
    url = server.url
    assert_error(httpx.post(url + "/v1/completions", content=b"{not json", timeout=10,
                            headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url + "/v1/completions", content=b"[]", timeout=10,
                            headers={"content-type": "application/json"}), 400)
    assert_error(post(url, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model", "model_not_found")
    assert_error(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}), 400,
                 code="wrong_task")
    assert_error(post(url, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(url, "/v1/classify", {"input": "x"}), 400, code="wrong_task")
    assert_error(httpx.get(url + "/v1/nothing", timeout=10), 404)
    assert_error(httpx.get(url + "/v1/completions", timeout=10), 405)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="白", max_tokens=1000)
    assert "max_tokens" in str(e.value)
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    assert client.completions.create(model="tiny", prompt="白", max_tokens=2).choices


def test_client_leaving_a_stream_does_not_hurt_the_server(server, client):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": "白", "max_tokens": 60, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    assert client.completions.create(model="tiny", prompt="白", max_tokens=3).choices
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


# -- API key, queue, timeout, micro-batching ----------------------------------------------------

def test_api_key_guards_every_endpoint(lm_engine):
    with BackgroundServer(create_app(lm_engine, api_key="s3cret")) as srv:
        for path in ("/v1/models", "/health"):
            assert_error(httpx.get(srv.url + path, timeout=10), 401, code="invalid_api_key")
            assert_error(httpx.get(srv.url + path, headers={"Authorization": "Bearer nope"}, timeout=10), 401)
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer s3cret"}, timeout=10).status_code == 200
        assert_error(post(srv.url, "/v1/completions", {"prompt": "白"}), 401)
        assert httpx.get(srv.url + "/", timeout=10).status_code == 200  # the page itself holds nothing; it asks for the key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="白", max_tokens=2).choices


def test_full_queue_answers_503_with_retry_after(lm_engine):
    app = create_app(lm_engine, max_batch=1, queue_size=1, timeout=30)
    with BackgroundServer(app) as srv:
        batcher = app.state.batcher
        batcher.pause()
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", post(srv.url, "/v1/completions",
                                                                    {"prompt": "白", "max_tokens": 3})))
        t.start()
        wait_for(lambda: batcher.waiting == 1)
        r = post(srv.url, "/v1/completions", {"prompt": "白", "max_tokens": 3})
        assert_error(r, 503, code="queue_full")
        assert r.headers["retry-after"] == "1"
        with pytest.raises(openai.APIStatusError) as e:
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="tiny", prompt="白", max_tokens=2)
        assert e.value.status_code == 503
        batcher.resume()
        t.join(30)
        assert got["r"].status_code == 200


def test_request_timeout(lm_engine):
    app = create_app(lm_engine, timeout=0.3)
    with BackgroundServer(app) as srv:
        app.state.batcher.pause()
        r = post(srv.url, "/v1/completions", {"prompt": "白", "max_tokens": 3})
        assert_error(r, 503, code="timeout")
        app.state.batcher.resume()
        wait_for(lambda: app.state.batcher.waiting == 0)
        assert post(srv.url, "/v1/completions", {"prompt": "白", "max_tokens": 3}).status_code == 200


def test_requests_arriving_together_share_one_batch(lm_engine):
    app = create_app(lm_engine, max_batch=16, queue_size=32, wait_ms=50)
    prompts = ["白日", "床前明月", "春", "千山鳥飛", "夜", "孤舟"]
    bodies = [{"prompt": p, "max_tokens": 3 + i, "temperature": 0} for i, p in enumerate(prompts)]
    with BackgroundServer(app) as srv:
        results = batched(srv, app.state.batcher, bodies)
        assert app.state.batcher.stats["max_rows"] >= 6
        # each request kept its own max_tokens, and batching did not change greedy texts
        for i, r in enumerate(results):
            assert r.json()["usage"]["completion_tokens"] <= 3 + i
            alone = post(srv.url, "/v1/completions", bodies[i])
            assert alone.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]


def test_requests_with_different_sampling_settings_share_one_batch(lm_engine):
    app = create_app(lm_engine, max_batch=16, queue_size=32, wait_ms=50)
    bodies = [{"prompt": "白日", "max_tokens": 6, "temperature": 0},
              {"prompt": "春", "max_tokens": 6, "temperature": 0.7, "top_p": 0.9},
              {"prompt": "夜", "max_tokens": 6, "temperature": 1.2, "top_k": 5},
              {"prompt": "床前", "max_tokens": 6, "temperature": 0, "repetition_penalty": 1.5}]
    with BackgroundServer(app) as srv:
        results = batched(srv, app.state.batcher, bodies)
        for i in (0, 3):  # greedy rows (one with a repetition penalty) give what they give alone
            alone = post(srv.url, "/v1/completions", bodies[i])
            assert alone.json()["choices"][0]["text"] == results[i].json()["choices"][0]["text"]


def test_small_load_test_has_no_5xx_but_503(lm_engine):
    spec = importlib.util.spec_from_file_location("load_serve", ROOT / "bench" / "load_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    app = create_app(lm_engine, max_batch=8, queue_size=4, timeout=30)
    with BackgroundServer(app) as srv:
        rep = bench.load_test(srv.url, clients=16, requests=60, max_tokens=8)
    assert rep["requests"] == 60 and rep["errors"] == 0
    assert set(rep["status"]) <= {"200", "503"} and rep["status"].get("200", 0) > 0
    assert rep["ok"] + rep["status"].get("503", 0) == 60


# -- the command --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_with_env_api_key(tiny_zh_model):
    port = _free_port()
    env = dict(os.environ, GPT2TUNE_API_KEY="k1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "gpt2tune", "serve", str(tiny_zh_model), "--port", str(port),
                          "--max-tokens-cap", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert p.poll() is None, p.stdout.read().decode()
            try:
                if httpx.get(url + "/health", headers={"Authorization": "Bearer k1"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 90, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=5).status_code == 401
        r = post(url, "/v1/completions", {"prompt": "白", "max_tokens": 9}, headers={"Authorization": "Bearer k1"})
        assert_error(r, 400, "max_tokens", "max_tokens_too_large")
    finally:
        p.terminate()
        p.wait(20)


def test_serve_command_bad_input(run_cli, tmp_path):
    code, _, err = run_cli("serve", tmp_path / "missing-run")
    assert code == 2 and "error" in err
    code, _, err = run_cli("serve", tmp_path, "--port", "0")
    assert code == 2 and "--port" in err


# -- never crash on input -----------------------------------------------------------------------

def _bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                        st.text(max_size=12), st.sampled_from(["白日", "wuyan-jueju", "白黃", "", "\ud800"]))
    values = st.one_of(scalars, st.lists(scalars, max_size=5), st.dictionaries(st.text(max_size=5), scalars, max_size=3))
    keys = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                            "echo", "form", "acrostic", "rhyme", "prosody", "no_repeat_chars", "tones", "pattern", "rhyme_group", "repetition_penalty", "logprobs",
                            "best_of", "model", "stream_options", "messages", "input", "bogus"])
    return st.one_of(st.dictionaries(keys, values, max_size=6), values)


def test_random_bodies_never_crash_the_server(server):
    from hypothesis import HealthCheck, given, settings

    seen = set()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(), path=__import__("hypothesis").strategies.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/v1/classify"]))
    def check(body, path):
        r = httpx.post(server.url + path, content=json.dumps(body).encode(), timeout=30,
                       headers={"content-type": "application/json"})
        seen.add(r.status_code)
        assert r.status_code in (200, 400, 404), (body, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert 400 in seen
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_int8_weights_serve_completions(tiny_zh_model):
    engine = load_engine(tiny_zh_model, name="tiny8", max_tokens_cap=16, weights="int8")
    with BackgroundServer(create_app(engine)) as srv:
        r = post(srv.url, "/v1/completions", {"prompt": "白日", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert isinstance(ch["text"], str) and ch["finish_reason"] in ("stop", "length")
    # the runner behind it decodes with int8 weights
    from gpt2tune.generate.runner import make_runner

    assert make_runner(engine.model, 8, weights=engine.weights).w.blocks[0][1].kind.startswith("int8")
