"""Corpus scale: peak memory and wall time to the first training step on a large text corpus.

    .venv/bin/python bench/data_scale.py --mb 10,100,400          # cold and warm cache, this checkout
    .venv/bin/python bench/data_scale.py --mb 100 --code DIR      # the same run with another checkout's code
    .venv/bin/python bench/data_scale.py --mb 10,100 --no-cache   # data.cache: false (tokenized in memory)
    .venv/bin/python bench/data_scale.py --mb 20 --throughput     # MB/s: `data prepare` on 1 and 2 processes,
                                                                  # and raw `tokenizers` on 1 and 2 threads
    .venv/bin/python bench/data_scale.py --task chat --mb 20      # chat rows (loss masks): in memory, cold, warm
    .venv/bin/python bench/data_scale.py --task chat --mb 20 --throughput

The corpus is made from the Tang poems in ../shared (one poem a line, lines shuffled and repeated
until the size is reached) in --work (default /tmp/gpt2tune-bench; never in the repository). Each
run trains a `nano` model with the Chinese BERT vocabulary (../shared/data/tokenizers/bert-base-chinese)
for --steps steps, batch 8, `data.batching: pack`, `train.eval_batches: 2`, in a fresh process.
Reported: the wall time until the first training step is done (metrics.jsonl gets its row; log_every 1),
the total wall time, the peak RSS of the training process (VmHWM, read by polling) and the peak of the
sum of the proportional set sizes (PSS) of it and its tokenizing workers (polled every 0.1 s; shared
pages counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
POEMS = SHARED / "data" / "chinese-poetry" / "全唐诗"
VOCAB = SHARED / "data" / "tokenizers" / "bert-base-chinese"

RECIPE = """task: causal-lm
model: {{init: scratch, size: nano, tokenizer: "{vocab}"}}
data: {{source: "text:{src}", text_mode: lines, val_fraction: 0.05, max_length: 128, batching: pack{cache}}}
train: {{precision: fp32, batch_size: 8, max_steps: {steps}, log_every: 1, eval_batches: 2, seed: 1}}
output: {{dir: "{out}"}}
"""


CHAT_RECIPE = """task: chat
model: {{init: scratch, size: nano, tokenizer: "{vocab}"}}
data: {{source: "jsonl:{src}", val_fraction: 0.05, max_length: 128{cache}}}
train: {{precision: fp32, batch_size: 8, max_steps: {steps}, log_every: 1, eval_batches: 2, seed: 1}}
output: {{dir: "{out}"}}
"""


def _poems() -> list[str]:
    lines = []
    for f in sorted(POEMS.glob("poet.tang.*.json")):
        for p in json.loads(f.read_text(encoding="utf-8")):
            text = "".join(p.get("paragraphs") or [])
            if text:
                lines.append(text)
    return lines


def _chat_line(poem: str) -> str:
    """A poem as a one-turn chat: its first line asked, the rest answered."""
    head, _, rest = poem.partition("。")
    return json.dumps({"messages": [{"role": "user", "content": f"請續寫：{head}。"},
                                    {"role": "assistant", "content": rest or head}]}, ensure_ascii=False)


def make_corpus(path: Path, mb: float, seed: int = 0, task: str = "causal-lm") -> Path:
    """One poem a line (task chat: one chat a JSON line), shuffled and repeated to `mb` MB."""
    if path.exists() and abs(path.stat().st_size - mb * 1e6) < 1e6:
        return path
    lines = _poems()
    if task == "chat":
        lines = [_chat_line(p) for p in lines]
    rng, size = random.Random(seed), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            rng.shuffle(lines)
            for line in lines:
                b = len(line.encode("utf-8")) + 1
                if size + b > mb * 1e6:
                    break
                f.write(line + "\n")
                size += b
            else:
                continue
            break
    return path


def tree_pss(proc: psutil.Process) -> int:
    """Proportional set size of the process and its workers: pages they share (the libraries forked
    workers inherit) counted once in all."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run(work: Path, src: Path, steps: int, cache: bool, code: Path, label: str, task: str = "causal-lm") -> dict:
    out = work / f"run-{label}"
    recipe = work / f"{label}.yaml"
    # (another checkout's code may not know data.cache: it gets no such fields)
    fields = f', cache: {str(cache).lower()}, cache_dir: "{work / "cache"}"' if code == ROOT else ""
    recipe.write_text((CHAT_RECIPE if task == "chat" else RECIPE).format(vocab=VOCAB, src=src, cache=fields, steps=steps, out=out), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)  # (an old metrics.jsonl would look like a first step)
    env = dict(os.environ, PYTHONPATH=str(code), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gpt2tune", "train", str(recipe), "--overwrite", "--no-progress"],
                            cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{label}.log", "w"))
    ps = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    first = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        try:
            peak_tree = max(peak_tree, tree_pss(ps))
            hwm = next(x for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
            peak_main = max(peak_main, int(hwm.split()[1]) * 1024)
        except (psutil.Error, OSError, StopIteration):
            pass
        if first is None and metrics.exists() and '"split": "train"' in metrics.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.1)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: training failed, see {work / f'{label}.log'}")
    return {"label": label, "first_step_s": round(first or total, 1), "total_s": round(total, 1),
            "peak_rss_mb": round(peak_main / 1e6), "peak_pss_with_workers_mb": round(peak_tree / 1e6)}


PREPARE = """
import sys, time
from gpt2tune.recipe import load_recipe
from gpt2tune.tasks.causal_lm import prepare_corpus
from gpt2tune.tasks.chat import prepare as prepare_chat
from gpt2tune.model.tokenizer import load_tokenizer
r = load_recipe(sys.argv[1])
r.data.num_proc = int(sys.argv[2])
load_tokenizer(r.model.tokenizer)  # (transformers' lazy imports: the raw side loads its tokenizer untimed too)
t0 = time.perf_counter()
(prepare_chat if r.task == "chat" else prepare_corpus)(r, progress=False)
print(time.perf_counter() - t0)
"""


def throughput(work: Path, src: Path, procs: int, task: str = "causal-lm") -> dict:
    """What `gpt2tune data prepare` does (read, clean, tokenize, split, write, hash) into an empty cache
    with data.num_proc procs, in a fresh process, timed after the imports; the Rust tokenizer's own
    threads limited to as many (workers never use them)."""
    recipe = work / "prepare.yaml"
    fields = f', cache: true, cache_dir: "{work / "cache-prepare"}"'
    recipe.write_text((CHAT_RECIPE if task == "chat" else RECIPE).format(vocab=VOCAB, src=src, cache=fields, steps=1, out=work / "unused"), encoding="utf-8")
    shutil.rmtree(work / "cache-prepare", ignore_errors=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(procs))  # one process: one core (no Rust threads either)
    out = subprocess.run([sys.executable, "-c", PREPARE, str(recipe), str(procs)], cwd=ROOT, check=True, env=env,
                         capture_output=True, text=True).stdout
    dt = float(out.strip().splitlines()[-1])
    return {"label": f"prepare-{procs}proc", "seconds": round(dt, 1), "MB_per_s": round(src.stat().st_size / 1e6 / dt, 2)}


RAW = """
import os, sys, time
from gpt2tune.model.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    lines = [l for l in f.read().split("\\n") if l.strip()]
t0 = time.perf_counter()
for i in range(0, len(lines), 8192):
    tok.backend_tokenizer.encode_batch_fast(lines[i : i + 8192], add_special_tokens=False)
print(time.perf_counter() - t0)
"""


def raw_tokenizers(src: Path, threads: int) -> dict:
    """The reference: the same text's lines through the raw `tokenizers` batch encoder (Rust, rayon on
    `threads` threads; no cleaning, framing or writing), in a fresh process, file read before timing."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", RAW, str(VOCAB), str(src)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    dt = float(out.strip().splitlines()[-1])
    return {"label": f"raw-tokenizers-{threads}thread", "seconds": round(dt, 1),
            "MB_per_s": round(src.stat().st_size / 1e6 / dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="100", help="corpus sizes in MB, comma-separated (e.g. 10,100,400)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpt2tune-bench"))
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose gpt2tune runs (default: this one)")
    ap.add_argument("--no-cache", action="store_true", help="only a data.cache: false run")
    ap.add_argument("--label", default=None)
    ap.add_argument("--throughput", action="store_true",
                    help="only tokenization speed: `data prepare` on 1 and 2 processes, raw tokenizers on 1 and 2 threads")
    ap.add_argument("--repeat", type=int, default=3, help="--throughput: each side's best of this many runs")
    ap.add_argument("--task", choices=["causal-lm", "chat"], default="causal-lm",
                    help="chat: the poems as one-turn chats (JSONL), rows with loss masks; cold and warm cache "
                         "against data.cache: false, or --throughput of `data prepare` on 1 and 2 processes")
    a = ap.parse_args()
    if not POEMS.is_dir() or not VOCAB.is_dir():
        raise SystemExit(f"needs {POEMS} and {VOCAB} (../shared)")
    cpu = Path("/proc/cpuinfo").read_text()
    kind = "AMX/AVX512-BF16" if ("amx_bf16" in cpu or "avx512_bf16" in cpu) else "AVX2-only (no AMX/AVX512-BF16)"
    print(f"CPU: {kind}, {os.cpu_count()} cores", flush=True)
    for mb in (float(x) for x in a.mb.split(",")):
        chat = a.task == "chat"
        src = make_corpus(a.work / f"{'chat' if chat else 'corpus'}-{mb:g}mb.{'jsonl' if chat else 'txt'}", mb,
                          task=a.task)
        print(f"corpus {src}: {src.stat().st_size / 1e6:.1f} MB, "
              f"{sum(1 for _ in open(src, encoding='utf-8')):,} lines", flush=True)
        tag = a.label or ("code" if a.code != ROOT else "")
        if a.throughput and chat:
            best = lambda runs: min(runs, key=lambda r: r["seconds"])  # noqa: E731
            rows = [best([throughput(a.work, src, p, "chat") for _ in range(a.repeat)]) for p in (1, 2)]
            rows.append({"label": "ratios", "prepare_2proc_over_1proc": round(rows[1]["MB_per_s"] / rows[0]["MB_per_s"], 2)})
        elif chat:
            shutil.rmtree(a.work / "cache", ignore_errors=True)
            rows = [run(a.work, src, a.steps, False, a.code, f"chat-nocache-{mb:g}mb", "chat"),
                    run(a.work, src, a.steps, True, a.code, f"chat-cold-{mb:g}mb", "chat"),
                    run(a.work, src, a.steps, True, a.code, f"chat-warm-{mb:g}mb", "chat")]
        elif a.throughput:
            best = lambda runs: min(runs, key=lambda r: r["seconds"])  # noqa: E731  (best of --repeat: noise only slows)
            rows = [best([side(*args) for _ in range(a.repeat)])
                    for side, args in ((throughput, (a.work, src, 1)), (throughput, (a.work, src, 2)),
                                       (raw_tokenizers, (src, 1)), (raw_tokenizers, (src, 2)))]
            rows.append({"label": "ratios", "prepare_2proc_over_1proc": round(rows[1]["MB_per_s"] / rows[0]["MB_per_s"], 2),
                         "raw_2thread_over_prepare_2proc": round(rows[3]["MB_per_s"] / rows[1]["MB_per_s"], 2)})
        elif a.no_cache or a.code != ROOT:
            rows = [run(a.work, src, a.steps, False, a.code, f"{tag or 'nocache'}-{mb:g}mb")]
        else:
            shutil.rmtree(a.work / "cache", ignore_errors=True)
            rows = [run(a.work, src, a.steps, True, a.code, f"cold-{mb:g}mb"),
                    run(a.work, src, a.steps, True, a.code, f"warm-{mb:g}mb")]
        for r in rows:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
