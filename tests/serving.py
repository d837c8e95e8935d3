"""HTTP helpers shared by the server tests."""

import threading
import time

import httpx


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=kw.pop("timeout", 30), **kw)


def assert_error(r, status, param=None, code=None):
    """`r` is an OpenAI-shaped error with this status (and param / code); its error object."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def wait_for(cond, timeout=15.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)


def batched(srv, batcher, bodies, path="/v1/completions"):
    """Post `bodies` at once so that the worker decodes them in one batch (checked); their responses."""
    batcher.pause()
    out = [None] * len(bodies)

    def one(i):
        out[i] = post(srv.url, path, bodies[i], timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    wait_for(lambda: batcher.waiting == len(bodies))
    before = batcher.stats["batches"]
    batcher.resume()
    for t in threads:
        t.join(60)
    assert batcher.stats["batches"] - before == 1
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    return out
