"""The playground page at `/` driven in headless Chromium (selenium + chromedriver).

Needs the Debian packages `chromium` and `chromium-driver` (`apt-get install -y chromium
chromium-driver`; CI installs them when it runs as root); skips with the reason otherwise.
In CI (`CI=true`, as `.ci/run` is run) they must run: there a missing browser, driver or Python
package fails them with the reason instead.
"""

import importlib
import os
import re
import shutil
import tempfile

import pytest

IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str):
    """Skip with the reason; under CI=true fail with it, so a CI run cannot pass without a browser."""
    if IN_CI:
        pytest.fail(f"{reason} -- CI=true: the browser tests must run in CI (.ci/run installs chromium and "
                    f"chromium-driver when it runs as root)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_module(name: str, reason: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(reason)


need_module("fastapi", "the 'serve' extra (fastapi, uvicorn) is not installed")
webdriver = need_module("selenium.webdriver", "selenium is not installed (dev extra)")

from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from gpt2tune.serve.app import create_app  # noqa: E402
from gpt2tune.serve.engine import load_engine  # noqa: E402
from gpt2tune.serve.server import BackgroundServer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        missing = " and ".join(n for n, found in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not found)
        unavailable(f"headless Chromium is not installed ({missing} not found): "
                    "apt-get install -y chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for a driver online
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gpt2tune-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except WebDriverException as err:
        shutil.rmtree(profile, ignore_errors=True)
        unavailable(f"headless Chromium did not start: {str(err).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, cond, timeout=30, what="condition"):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(d))
    except TimeoutException:
        err = driver.find_element(By.ID, "error").text
        raise AssertionError(f"timed out waiting for {what}; page error: {err!r}") from None


def text_of(driver, id_):
    return driver.find_element(By.ID, id_).text


def set_value(driver, id_, value):
    el = driver.find_element(By.ID, id_)
    el.clear()
    el.send_keys(value)


@pytest.fixture(scope="module")
def lm_server(tiny_zh_model):
    engine = load_engine(tiny_zh_model, name="tiny", max_tokens_cap=64)
    with BackgroundServer(create_app(engine)) as srv:
        yield srv


def open_page(driver, url, model_text):
    driver.get(url + "/")
    wait(driver, lambda d: model_text in text_of(d, "model"), what="the model name")


def test_playground_streams_a_completion(browser, lm_server):
    open_page(browser, lm_server.url, "tiny · causal-lm")
    # count every change of the output box, to see the text arrive piece by piece
    browser.execute_script("""
        window.__changes = [];
        new MutationObserver(() => window.__changes.push(document.getElementById('output').textContent.length))
            .observe(document.getElementById('output'), {childList: true, characterData: true, subtree: true});""")
    set_value(browser, "prompt", "白日")
    set_value(browser, "max_tokens", "24")
    for seed in range(1, 9):  # a tiny random model may sample its end marker at once: take a seed that writes on
        browser.execute_script("window.__changes = [];")
        set_value(browser, "seed", str(seed))
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "1",
             what="the stream to end")
        out = text_of(browser, "output")
        if len(out) >= len("白日") + 4:
            break
    changes = browser.execute_script("return window.__changes")
    assert out.startswith("白日") and len(out) >= len("白日") + 4, out
    assert len([c for c in changes if c > 0]) >= 3, changes  # many streamed pieces, not one answer
    assert changes == sorted(changes)  # text only grows while streaming
    assert re.search(r"\d+ tokens in [\d.]+s", text_of(browser, "stats")), text_of(browser, "stats")
    assert text_of(browser, "error") == ""


def test_playground_verse_form_with_acrostic_and_errors(browser, lm_server):
    open_page(browser, lm_server.url, "tiny")
    set_value(browser, "prompt", "")
    Select(browser.find_element(By.ID, "form")).select_by_value("wuyan-jueju")
    set_value(browser, "acrostic", "白黃")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "1", what="the poem")
    poem = text_of(browser, "output")
    assert re.fullmatch(r"(?:[\u4e00-\u9fff]{5}，[\u4e00-\u9fff]{5}。){2}", poem), poem
    assert poem[0] == "白" and poem[6] == "黃"
    # a request the server refuses shows its message, and the page keeps working
    Select(browser.find_element(By.ID, "form")).select_by_value("")
    set_value(browser, "acrostic", "")
    set_value(browser, "max_tokens", "500")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: "max_tokens" in text_of(d, "error"), what="the error message")
    set_value(browser, "max_tokens", "4")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "1", what="a completion")
    assert text_of(browser, "error") == ""


def test_playground_asks_for_the_api_key(browser, tiny_zh_model):
    engine = load_engine(tiny_zh_model, name="keyed", max_tokens_cap=16)
    with BackgroundServer(create_app(engine, api_key="pw")) as srv:
        browser.get(srv.url + "/")
        wait(browser, lambda d: "API key" in text_of(d, "error"), what="the API key error")
        set_value(browser, "apikey", "pw")
        browser.find_element(By.ID, "prompt").click()  # leaving the field fires its change event
        wait(browser, lambda d: "keyed" in text_of(d, "model"), what="the model after the key")
        set_value(browser, "prompt", "春")
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "1", what="completion")
        assert text_of(browser, "output").startswith("春")
        browser.execute_script("sessionStorage.clear()")


def test_playground_classify_tab(browser, tmp_path_factory, tiny_zh_model):
    from gpt2tune.classify.model import classifier_from_lm
    from gpt2tune.method.io import load_run
    from gpt2tune.tasks.classification import _fix_architecture

    lm, tok, framing = load_run(tiny_zh_model)
    d = tmp_path_factory.mktemp("browser_clf")
    classifier_from_lm(lm, {0: "ham", 1: "spam"}, framing.pad, seed=0).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    _fix_architecture(d)
    with BackgroundServer(create_app(load_engine(d, name="clf"))) as srv:
        open_page(browser, srv.url, "clf · classification")
        assert not browser.find_element(By.ID, "pane-classify").get_attribute("hidden")
        assert browser.find_element(By.ID, "tab-complete").get_attribute("disabled")
        set_value(browser, "classify-input", "白日依山盡\nfree prize now")
        browser.find_element(By.ID, "classify-btn").click()
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classify-output tr")) == 3, what="the table")
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#classify-output td")]
        assert cells[0] == "白日依山盡" and cells[1] in ("ham", "spam") and 0 <= float(cells[2]) <= 1
