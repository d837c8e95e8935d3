"""Hub models and datasets end to end, through the real `huggingface_hub` and `datasets` clients.

A local hub (tests/localhub.py) on loopback serves tiny models saved with `save_pretrained` (or
`torch.save` for the legacy `.bin`) under the real repo names and with the real repos' file layouts;
the CLI runs in subprocesses with HF_ENDPOINT pointing at it and a temporary HF_HOME, so download,
caching, offline reuse, revision pinning and upload all run the clients' own code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2tune.errors import UserError
from gpt2tune.model.build import load_pretrained
from gpt2tune.model.tokenizer import Framing

from conftest import BERT_ZH, GPT2_BPE, ROOT, ZH_TEXT, need, write_recipe
from localhub import TOKEN, LocalHub, read_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TANG_POEMS = [{"title": "t", "author": "a", "paragraphs": [t[:12], t[12:]]} for t in ZH_TEXT]
EN_TEXT = ["Every effort moves you forward when the work is steady and the aim is clear.",
           "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
           "A small model learns the shape of a sentence long before it learns its sense."] * 4
SMS = ["ham\tAre we still meeting for lunch today?", "spam\tWINNER!! Claim your prize now, call 09061701461",
       "ham\tI'll be home late, keep some dinner for me.", "spam\tFree entry in a weekly competition, text WIN now",
       "ham\tCan you send me the notes from class?", "spam\tURGENT! Your mobile has won a 2000 cash award, call now"] * 4


# -- repos ------------------------------------------------------------------------------------
def tiny_gpt2(vocab_size: int, seed: int = 0, n_layer: int = 2, n_head: int = 2, n_embd: int = 32,
              n_positions: int = 128, **config):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     **config)
    return GPT2LMHeadModel(cfg).eval()


def save_model(model, folder: Path, weights: str) -> Path:
    """A model folder with `weights`: 'safetensors', 'bin' (torch.save of the state dict, as old repos
    ship it) or 'both'."""
    import torch

    model.save_pretrained(str(folder))
    if weights in ("bin", "both"):
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    if weights == "bin":
        (folder / "model.safetensors").unlink()
    return folder


def uer_repo(folder: Path, seed: int = 0) -> Path:
    """Files shaped like uer/gpt2-chinese-cluecorpussmall: 12 blocks, the 21,128-entry BERT vocab.txt
    read by BertTokenizer, pytorch_model.bin (no safetensors) plus TF and Flax weights, a config without
    bos/eos ids."""
    vocab = need(BERT_ZH / "vocab.txt")
    model = tiny_gpt2(21128, seed=seed, n_layer=12, n_head=12, n_embd=48)
    save_model(model, folder, "bin")
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg.pop(k, None)
    cfg["tokenizer_class"] = "BertTokenizer"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").unlink()
    (folder / "vocab.txt").write_bytes(vocab.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "tokenizer_class": "BertTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}))
    (folder / "tf_model.h5").write_bytes(b"not for us" * 100)
    (folder / "flax_model.msgpack").write_bytes(b"not for us" * 100)
    return folder


def gpt2_repo(folder: Path) -> Path:
    """Files shaped like `gpt2`: the real byte-level BPE (50,257 tokens), model.safetensors and
    pytorch_model.bin, TF/Flax/Rust weights, a small width."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(need(GPT2_BPE)))
    save_model(tiny_gpt2(50257, n_positions=256), folder, "both")
    tok.save_pretrained(str(folder))
    for extra in ("tf_model.h5", "flax_model.msgpack", "rust_model.ot"):
        (folder / extra).write_bytes(b"not for us" * 100)
    return folder


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def conversation(i: int) -> dict:
    q = ["What is two plus three?", "Name a colour of the sky.", "Say hello in French."][i % 3]
    a = ["Two plus three is five.", "The sky is often blue.", "Bonjour!"][i % 3]
    return {"prompt": q, "prompt_id": f"{i:064x}",
            "messages": [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]}


CHAT_README = """---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
  - split: train_gen
    path: data/train_gen-*
  - split: test_gen
    path: data/test_gen-*
---
# A chat dataset laid out like HuggingFaceH4/ultrachat_200k
"""


def chat_dataset(n_train: int = 24, n_test: int = 6) -> dict:
    """ultrachat_200k's layout: parquet shards per split, columns prompt / prompt_id / messages."""
    return {"README.md": CHAT_README,
            "data/train_sft-00000-of-00001.parquet": parquet([conversation(i) for i in range(n_train)]),
            "data/test_sft-00000-of-00001.parquet": parquet([conversation(i) for i in range(100, 100 + n_test)]),
            "data/train_gen-00000-of-00001.parquet": parquet([conversation(i) for i in range(3)]),
            "data/test_gen-00000-of-00001.parquet": parquet([conversation(i) for i in range(3)])}


# -- running the CLI against a hub --------------------------------------------------------------
def hub_env(hub: LocalHub, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def cli(env: dict, *args, ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "gpt2tune", *map(str, args)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-4000:]}"
    return p


BATCH = """
import contextlib, io, json, sys, traceback
from gpt2tune.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def cli_batch(env: dict, *commands, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Several `gpt2tune` commands, one after the other, through the CLI's `main` in one process (one
    start-up of torch instead of one per command); each must succeed."""
    todo = [[str(a) for a in c] for c in commands]
    p = subprocess.run([sys.executable, "-c", BATCH, json.dumps(todo)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    done = [subprocess.CompletedProcess(c, r["returncode"], r["stdout"], r["stderr"])
            for c, r in zip(todo, json.loads(line[len("RESULTS "):]))]
    for r in done:
        assert r.returncode == 0, f"{r.args}: exit {r.returncode}\n{r.stderr[-4000:]}"
    return done


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2tune: error: "), p.stderr[-3000:]
    return lines[0]


def last_line_error(p: subprocess.CompletedProcess) -> str:
    """Progress lines may come first; the error is one line, the last, and no traceback."""
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr and lines[-1].startswith("gpt2tune: error: "), p.stderr[-3000:]
    assert sum(ln.startswith("gpt2tune: error") for ln in lines) == 1
    return lines[-1]


def snapshot_files(home: Path, repo_id: str) -> set[str]:
    snaps = list((home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*"))
    assert len(snaps) == 1, snaps
    return {p.name for p in snaps[0].iterdir()}


FAST = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.eval_every=0",
        "--set", "train.save_every=0", "--set", "train.warmup_steps=0", "--set", "train.warmup_ratio=0",
        "--set", "train.precision=fp32", "--set", "train.num_threads=1", "--no-progress"]


@pytest.fixture(scope="module")
def zh_poems(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("poems")
    (d / "poems.txt").write_text("\n".join(ZH_TEXT * 3) + "\n", encoding="utf-8")
    (d / "tang.json").write_text(json.dumps(TANG_POEMS * 3, ensure_ascii=False), encoding="utf-8")
    return d


# -- acceptance: a .bin-only repo, downloaded, trained, generated; then from the cache, hub stopped ----
@pytest.fixture(scope="module")
def bin_run(tmp_path_factory, tiny_zh_model, zh_poems):
    """`gpt2tune train` of a recipe naming a hub repo that ships only pytorch_model.bin (hub running)."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("bin_run")
    tok = AutoTokenizer.from_pretrained(str(tiny_zh_model))
    folder = save_model(tiny_gpt2(len(tok)), tmp / "repo", "bin")
    tok.save_pretrained(str(folder))
    assert "pytorch_model.bin" in os.listdir(folder) and not list(folder.glob("*.safetensors"))
    recipe = write_recipe(tmp / "r.yaml", f"""
task: causal-lm
model: {{name: someone/tiny-zh-bin, init: pretrained}}
data: {{source: "text:{zh_poems / 'poems.txt'}", max_length: 32, val_fraction: 0.2}}
train: {{max_steps: 2, batch_size: 2, eval_every: 0, precision: fp32, num_threads: 1}}
sample: {{prompts: []}}
output: {{dir: "{tmp / 'run'}"}}
""")
    hub = LocalHub().start()
    hub.add_repo("someone/tiny-zh-bin", folder)
    env = hub_env(hub, tmp / "hf")
    try:
        p = cli(env, "train", recipe, "--no-progress")
        yield {"tmp": tmp, "hub": hub, "env": env, "recipe": recipe, "run": tmp / "run", "stderr": p.stderr}
    finally:
        hub.stop()


def test_bin_only_repo_downloads_trains_generates_then_runs_from_cache_with_hub_stopped(bin_run):
    tmp, hub, env, run = bin_run["tmp"], bin_run["hub"], bin_run["env"], bin_run["run"]
    assert "model someone/tiny-zh-bin: downloaded pytorch_model.bin (the repo has no safetensors weights)" \
        in bin_run["stderr"]
    assert {"pytorch_model.bin", "config.json", "tokenizer.json"} <= snapshot_files(tmp / "hf", "someone/tiny-zh-bin")
    assert (run / "model" / "model.safetensors").is_file()
    hub.stop()
    # the hub is gone: the run generates, and the same recipe runs from the cache (no HF_HUB_OFFLINE
    # needed; and with it set, the cache is used too)
    gen, p = cli_batch(env, ["generate", run, "--prompt", "白日", "--max-new-tokens", "8", "--seed", "1", "--json"],
                       ["train", bin_run["recipe"], "--no-progress", "--set", f"output.dir={tmp / 'run2'}"])
    text = json.loads(gen.stdout)[0]["text"]
    assert text.startswith("白日") and len(text) > 2
    assert "model someone/tiny-zh-bin: pytorch_model.bin from the Hugging Face cache" in p.stderr
    assert (tmp / "run2" / "model" / "model.safetensors").is_file()
    offline = resolve({**env, "HF_HUB_OFFLINE": "1"}, "someone/tiny-zh-bin")[0]
    assert "pytorch_model.bin" in offline["files"] and "from the Hugging Face cache" in offline["stderr"]


# -- which weights, revision pinning, private and missing repos, a pickled .bin -----------------
RESOLVE = """
import json, os, sys
from gpt2tune.errors import UserError
from gpt2tune.model.resolve import resolve_model_dir
out = []
for name, revision, env in json.loads(sys.argv[1]):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        p = resolve_model_dir(name, revision)
        out.append({"path": str(p), "files": sorted(x.name for x in p.iterdir())})
    except UserError as e:
        out.append(str(e))
    os.environ.clear()
    os.environ.update(saved)
print(json.dumps(out))
"""


def resolve(env: dict, *queries) -> list:
    """Resolve several (name, revision, extra env) in one process: a dict (path, files) or the error line each."""
    todo = [(q, None, {}) if isinstance(q, str) else (q[0], q[1] if len(q) > 1 else None, q[2] if len(q) > 2 else {})
            for q in queries]
    p = subprocess.run([sys.executable, "-c", RESOLVE, json.dumps(todo)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return [{**o, "stderr": p.stderr} if isinstance(o, dict) else o for o in out]


class _Payload:
    """Unpickling this creates a folder: what a malicious pytorch_model.bin could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def state_equal(folder: str, model) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    return all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_safetensors_preferred_revision_pinned_and_hub_errors(tmp_path):
    both = tiny_gpt2(50)
    save_model(both, tmp_path / "both", "both")
    (tmp_path / "both" / "tf_model.h5").write_bytes(b"x" * 100)
    v1, v2 = tiny_gpt2(50, seed=1), tiny_gpt2(50, seed=2)
    save_model(v1, tmp_path / "v1", "bin")
    save_model(v2, tmp_path / "v2", "safetensors")
    with LocalHub() as hub:
        hub.add_repo("org/both", tmp_path / "both")
        sha1 = hub.add_repo("org/revs", tmp_path / "v1")
        hub.tag("org/revs", "v1.0", sha1)
        sha2 = hub.add_repo("org/revs", tmp_path / "v2", message="v2")  # replaces the .bin by safetensors
        hub.add_repo("org/private", tmp_path / "v2", private=True)
        marker = tmp_path / "PWNED"
        evil = {**read_folder(tmp_path / "v1"), "pytorch_model.bin": pickle.dumps(_Payload(str(marker)))}
        hub.add_repo("org/evil", evil)
        env = hub_env(hub, tmp_path / "hf")
        got, pinned, tagged, latest, norev, private, wrong, allowed, absent, bad = resolve(
            env, "org/both", ("org/revs", sha1), ("org/revs", "v1.0"), "org/revs", ("org/revs", "nope"),
            "org/private", ("org/private", None, {"HF_TOKEN": "hf_wrong"}), ("org/private", None, {"HF_TOKEN": TOKEN}),
            "org/absent", "org/evil")
    # both kinds shipped: only safetensors comes down (and no TF weights)
    assert "model.safetensors" in got["files"] and "pytorch_model.bin" not in got["files"]
    assert "tf_model.h5" not in got["files"] and "model org/both: downloaded model.safetensors" in got["stderr"]
    assert state_equal(got["path"], both)
    # revisions: a commit, a tag, the branch head
    assert pinned["path"].endswith(sha1) and "pytorch_model.bin" in pinned["files"]
    assert state_equal(pinned["path"], v1)
    assert tagged["path"] == pinned["path"]
    assert latest["path"].endswith(sha2) and "model.safetensors" in latest["files"]
    assert state_equal(latest["path"], v2) and not state_equal(latest["path"], v1)
    assert "has no revision 'nope'" in norev
    # private: 401 without a token, refused with a wrong one, fine with a good one; absent: 404
    assert "401" in private and "HF_TOKEN" in private and "no valid token was sent" in private
    assert "the token in HF_TOKEN was refused" in wrong
    assert state_equal(allowed["path"], v2)
    assert "'org/absent' does not exist on the Hugging Face hub" in absent
    # a downloaded .bin holding more than tensors is refused, never unpickled
    with pytest.raises(UserError, match="refused to load .*legacy .bin weights hold more than tensors"):
        load_pretrained(bad["path"], Framing(bos=None, eos=0, pad=0, bert_style=False), 50)
    assert not marker.exists()
    # the hub stopped: the pinned revision and the branch still come from the cache
    cached, head, never = resolve(env, ("org/revs", sha1), "org/revs", "org/never-downloaded")
    assert cached["path"] == pinned["path"] and head["path"] == latest["path"]
    assert f"model org/revs@{sha1}: pytorch_model.bin from the Hugging Face cache" in cached["stderr"]
    assert "hub cannot be reached" in never


def test_cli_prints_one_line_for_a_private_repo(tmp_path):
    with LocalHub() as hub:
        save_model(tiny_gpt2(50), tmp_path / "m", "safetensors")
        hub.add_repo("org/private", tmp_path / "m", private=True)
        env = hub_env(hub, tmp_path / "hf")
        line = one_line_error(cli(env, "generate", "org/private", "--prompt", "a", ok=False))
    assert "org/private" in line and "401" in line and "HF_TOKEN" in line


# -- datasets ------------------------------------------------------------------------------------
def test_hf_source_reads_a_hub_dataset_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    with LocalHub() as hub:
        hub.add_repo("org/chat", chat_dataset(n_train=24, n_test=6), repo_type="dataset")
        env = hub_env(hub, tmp_path / "hf")
        p = cli(env, "data", "inspect", "hf:org/chat:train_sft", "--field", "prompt", "--json")
        report = json.loads(p.stdout)
        assert report["samples"] == 24, report
        assert any(path.startswith("/datasets/org/chat/resolve/") for _, path in hub.requests)
        line = one_line_error(cli(env, "data", "inspect", "hf:org/nothing:train", ok=False))
        assert "'org/nothing' does not exist or cannot be accessed" in line and "HF_TOKEN" in line


# -- export --push-to-hub ------------------------------------------------------------------------
PUSH = """
import json, os, sys
from pathlib import Path
from gpt2tune.errors import UserError
from gpt2tune.export.hub import push_folder
out = []
for repo_id, env in json.loads(sys.argv[2]):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        out.append(push_folder(Path(sys.argv[1]), repo_id))
    except UserError as e:
        out.append("ERROR " + str(e))
    os.environ.clear()
    os.environ.update(saved)
print(json.dumps(out))
"""


def push(env: dict, folder: Path, *uploads) -> list[str]:
    """push_folder for each (repo id, extra env) in one process: the commit URL or 'ERROR <message>' each."""
    p = subprocess.run([sys.executable, "-c", PUSH, str(folder), json.dumps(uploads)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_export_push_to_hub_uploads_the_export_folder(bin_run, tmp_path):
    with LocalHub() as hub:
        env = hub_env(hub, tmp_path / "hf")
        p = cli({**env, "HF_TOKEN": TOKEN}, "export", bin_run["run"], "--output", tmp_path / "out",
                "--push-to-hub", "me/poems", "--private")
        assert f"uploaded to {hub.url}/me/poems/commit/" in p.stderr
        exported = read_folder(tmp_path / "out")
        assert {"README.md", "config.json", "model.safetensors", "generation_config.json"} <= set(exported)
        uploaded = hub.files("me/poems")
        uploaded.pop(".gitattributes")  # made with the repo
        assert uploaded == exported
        assert hub.repos[("model", "me/poems")].private
        # the upload is a model that comes back through the hub
        got = resolve({**env, "HF_TOKEN": TOKEN}, "me/poems")[0]
        assert set(got["files"]) >= {"config.json", "model.safetensors"}
        # upload failures are one line each
        none, wrong = push(env, tmp_path / "out", ("me/other", {}), ("me/other", {"HF_TOKEN": "hf_wrong"}))
        assert none.startswith("ERROR --push-to-hub me/other:") and "401: no valid token was sent" in none
        assert "HF_TOKEN" in none and "the token in HF_TOKEN was refused" in wrong
        assert ("model", "me/other") not in hub.repos
    [line] = push(env, tmp_path / "out", ("me/poems", {"HF_TOKEN": TOKEN}))
    assert line.startswith("ERROR --push-to-hub me/poems: cannot reach the hub at http://127.0.0.1:"), line


# -- the seeds' setups as recipes, each a few steps against the local hub ---------------------------
@pytest.fixture(scope="module")
def seed_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_repos")
    hub = LocalHub().start()
    try:
        if BERT_ZH.exists():
            hub.add_repo("uer/gpt2-chinese-cluecorpussmall", uer_repo(root / "uer"))
        if GPT2_BPE.exists():
            hub.add_repo("gpt2", gpt2_repo(root / "gpt2"))
        try:
            hub.add_repo("HuggingFaceH4/ultrachat_200k", chat_dataset(n_train=16, n_test=4), repo_type="dataset")
        except ImportError:
            pass
        yield hub
    finally:
        hub.stop()


def need_repo(hub: LocalHub, repo_id: str, repo_type: str = "model") -> None:
    if (repo_type, repo_id) not in hub.repos:
        pytest.skip(f"{repo_id} needs ../shared tokenizer data (or pyarrow) to be built")


def test_seed_tang_uer_full_then_partial_and_lora_then_verse_form(seed_hub, tmp_path, zh_poems):
    need_repo(seed_hub, "uer/gpt2-chinese-cluecorpussmall")
    env = hub_env(seed_hub, tmp_path / "hf")
    data = ["--set", f"data.source=chinese-poetry:{zh_poems / 'tang.json'}", "--set", "data.max_length=32",
            "--set", "data.val_fraction=0.2"]
    full, cmp, gen = cli_batch(
        env, ["train", ROOT / "recipes" / "tang-uer.yaml", *data, *FAST, "--set", f"output.dir={tmp_path / 'full'}"],
        ["compare", ROOT / "recipes" / "tang-uer-compare.yaml", "--methods", "partial,lora", *data, *FAST,
         "--set", "data.limit=12", "--output", tmp_path / "cmp"],
        ["generate", tmp_path / "cmp" / "lora", "--form", "wuyan-jueju", "--prompt", "白日", "--seed", "1", "--json"])
    assert "uer/gpt2-chinese-cluecorpussmall: downloaded pytorch_model.bin" in full.stderr
    files = snapshot_files(tmp_path / "hf", "uer/gpt2-chinese-cluecorpussmall")
    assert {"pytorch_model.bin", "vocab.txt", "config.json"} <= files and not files & {"tf_model.h5", "flax_model.msgpack"}
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert "partial" in cmp.stdout and "lora" in cmp.stdout
    assert (tmp_path / "cmp" / "partial" / "model").is_dir() and (tmp_path / "cmp" / "lora" / "adapter").is_dir()
    poem = json.loads(gen.stdout)[0]["text"]
    assert re.fullmatch(r"白日\w{3}，\w{5}。\w{5}，\w{5}。", poem), poem
    assert " " not in poem


@pytest.fixture(scope="module")
def gpt2_seed_runs(seed_hub, tmp_path_factory):
    """The three recipes that start from `gpt2`, trained a few steps each (one process, the real CLI entry)."""
    if ("model", "gpt2") not in seed_hub.repos or ("dataset", "HuggingFaceH4/ultrachat_200k") not in seed_hub.repos:
        pytest.skip("the gpt2 repo needs ../shared's GPT-2 tokenizer files (and the chat dataset pyarrow)")
    tmp = tmp_path_factory.mktemp("gpt2_seeds")
    (tmp / "sms.tsv").write_text("\n".join(SMS) + "\n", encoding="utf-8")
    (tmp / "book.txt").write_text("\n".join(EN_TEXT) + "\n", encoding="utf-8")
    env = hub_env(seed_hub, tmp / "hf")
    recipes = ROOT / "recipes"
    en, chat, sms = cli_batch(
        env,
        ["train", recipes / "english-gpt2.yaml", *FAST, "--set", f"data.source=text:{tmp / 'book.txt'}",
         "--set", "data.max_length=32", "--set", "train.grad_accum=1", "--set", f"output.dir={tmp / 'en'}"],
        ["train", recipes / "chat-ultrachat.yaml", *FAST, "--set", "data.max_length=64", "--set", "sample.prompts=[]",
         "--set", f"output.dir={tmp / 'chat'}"],
        ["train", recipes / "sms-spam-gpt2.yaml", *FAST, "--set", f"data.source=tsv:{tmp / 'sms.tsv'}",
         "--set", f"output.dir={tmp / 'sms'}"])
    return {"tmp": tmp, "en": en, "chat": chat, "sms": sms}


def test_seed_english_gpt2_on_a_text_file(gpt2_seed_runs):
    tmp = gpt2_seed_runs["tmp"]
    assert "model gpt2: downloaded model.safetensors" in gpt2_seed_runs["en"].stderr
    files = snapshot_files(tmp / "hf", "gpt2")
    assert "model.safetensors" in files and "pytorch_model.bin" not in files and "rust_model.ot" not in files
    assert json.loads((tmp / "en" / "samples.json").read_text(encoding="utf-8"))


def test_seed_chat_sft_on_ultrachat(gpt2_seed_runs):
    tmp = gpt2_seed_runs["tmp"]
    assert "model gpt2: model.safetensors from the Hugging Face cache" in gpt2_seed_runs["chat"].stderr
    stats = json.loads((tmp / "chat" / "data.json").read_text())
    assert stats["train_samples"] == 16 and stats["validation_samples"] == 4, stats
    assert "chat_template" in json.loads((tmp / "chat" / "model" / "tokenizer_config.json").read_text())


def test_seed_sms_spam_classifier_from_gpt2_last_block_and_norm(gpt2_seed_runs):
    tmp = gpt2_seed_runs["tmp"]
    # GPT-2 n_embd=32, 2 blocks: one block (12,704) + final norm (64) + a 2-class head (64) train
    n_embd = 32
    block = 2 * n_embd + (n_embd * 3 * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd) + 2 * n_embd \
        + (n_embd * 4 * n_embd + 4 * n_embd) + (4 * n_embd * n_embd + n_embd)
    assert f"{block + 2 * n_embd + 2 * n_embd:,} trainable" in gpt2_seed_runs["sms"].stderr
    assert json.loads((tmp / "sms" / "eval.json").read_text())
