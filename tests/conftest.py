import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# the corpus cache of the runs the tests make: a temporary folder, not the user's ~/.cache
import tempfile  # noqa: E402

os.environ.setdefault("GPT2TUNE_CACHE_DIR", tempfile.mkdtemp(prefix="gpt2tune-test-cache-"))
# the compiled decoding kernel (generate.gemv) is built once per test session, there too
os.environ.setdefault("GPT2TUNE_NATIVE_DIR", os.path.join(os.environ["GPT2TUNE_CACHE_DIR"], "native"))

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
POEMS = SHARED / "data" / "chinese-poetry" / "全唐诗"
SONGCI = SHARED / "data" / "chinese-poetry" / "宋词" / "宋词三百首.json"
SMS = SHARED / "data" / "sms-spam" / "SMSSpamCollection"
GPT2_BPE = SHARED / "data" / "tokenizers" / "gpt2"
BERT_ZH = SHARED / "data" / "tokenizers" / "bert-base-chinese"
TANG_MINI = SHARED / "models" / "gpt2-tang-mini"


def need(path: Path):
    """Skip (with the reason) when a piece of ../shared is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared test data not available)")
    return path


ZH_TEXT = ["白日依山盡，黃河入海流。欲窮千里目，更上一層樓。",
           "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
           "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。",
           "千山鳥飛絕，萬徑人蹤滅。孤舟蓑笠翁，獨釣寒江雪。"]


@pytest.fixture(params=["native", "torch"])
def one_row_path(request, monkeypatch):
    """Run a test on both one-row fp32 decoding paths: the compiled kernel (`generate.gemv`;
    skipped where it is not built) and PyTorch's kernels."""
    import gpt2tune.generate.fast as fast
    from gpt2tune.generate import gemv

    fast._CACHE.clear()
    if request.param == "torch":
        monkeypatch.setitem(gemv._state, "lib", None)
    elif gemv.kernel() is None:
        pytest.skip("the compiled decoding kernel is not built here (no C compiler, or not x86 with AVX2 and FMA)")
    yield request.param
    fast._CACHE.clear()


@pytest.fixture(scope="session")
def zh_tokenizer_dir(tmp_path_factory):
    from gpt2tune.model.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("zh_tok")
    build_tokenizer(ZH_TEXT * 3, d)
    return d


@pytest.fixture(scope="session")
def tiny_zh_model(tmp_path_factory, zh_tokenizer_dir):
    """A tiny GPT-2 (2 layers, 64 wide) with a Chinese char vocabulary, saved in HF format."""
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer

    tok = load_tokenizer(zh_tokenizer_dir)
    model = build_scratch("nano", len(tok), framing_of(tok), n_positions=128, seed=0)
    d = tmp_path_factory.mktemp("tiny_zh_model")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture
def run_cli(capfd):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from gpt2tune.cli import main

    def _run(*args):
        code = main([str(a) for a in args])
        out = capfd.readouterr()
        return code, out.out, out.err

    return _run


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
