"""gpt2tune vs plain Hugging Face, side by side in one process (`make bench`).

Every workload runs the HF baseline and gpt2tune's path on the same model weights and the same
batches, interleaved step by step (so background load hits both alike), and prints

    name | HF figure | gpt2tune figure | ratio

plus the machine's own ceilings (bf16 / fp32 matmul GFLOP/s, memory bandwidth) and the model FLOP
utilisation (MFU) of every training run against the matching matmul ceiling.

    .venv/bin/python bench/run.py                 # GPT-2 124M (GPT2Config()), 3 minutes idle, 5-15 under load
    .venv/bin/python bench/run.py --size mini     # a small model: a smoke test in about a minute
    .venv/bin/python bench/run.py --only decode --steps 5 --json out.json

Peak memory is measured apart: each side runs three full fine-tuning steps alone in a fresh
process, and the line gives its peak resident set (parameters, gradients and AdamW state are the
same for all sides; the rest is each side's own).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpt2tune.data.dataset import collate, epoch_batches  # noqa: E402
from gpt2tune.train.objective import make_fast_loss  # noqa: E402
from gpt2tune.train.objective import lm_loss  # noqa: E402
from gpt2tune.train.optim import clip_and_step  # noqa: E402

POEMS = ROOT.parent / "shared" / "data" / "chinese-poetry" / "全唐诗"
BERT_ZH = ROOT.parent / "shared" / "data" / "tokenizers" / "bert-base-chinese"
LINES: list[str] = []


def out(line: str) -> None:
    LINES.append(line)
    print(line, flush=True)


# --------------------------------------------------------------------------- machine ceilings


def matmul_gflops(dtype, n=2048, reps=6) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def bandwidth_gbs(mb=512, reps=5) -> float:
    src = torch.ones(mb * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9  # read + write


# --------------------------------------------------------------------------- the machine


class Machine:
    """What this CPU offers and the precision `precision: auto` trains in on it: every workload
    times gpt2tune at that precision against HF at the same precision (and HF fp32, its default)."""

    def __init__(self):
        from gpt2tune.model.cpu import BF16_ENV, cpu_flags, cpu_has_bf16
        from gpt2tune.train.device import auto_precision

        self.flags = cpu_flags()
        self.native_bf16 = cpu_has_bf16()   # the flags, or GPT2TUNE_CPU_BF16 where set
        self.forced = os.environ.get(BF16_ENV, "").strip() in ("0", "1")
        self.dtype = auto_precision("cpu", cpu_bf16=self.native_bf16)
        self.prec = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        try:
            self.model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        except (OSError, StopIteration):
            self.model = "unknown CPU"

    def describe(self) -> str:
        have = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                if f in self.flags]
        return (f"cpu: {self.model}; features: {' '.join(have) or 'none of avx2/avx512/amx'}; native bf16: "
                f"{'yes' if self.native_bf16 else 'no (bf16 is emulated: training and the bf16 rows run in fp32)'}; "
                f"precision auto = {self.prec}" + (" (native bf16 set by GPT2TUNE_CPU_BF16)" if self.forced else ""))


# --------------------------------------------------------------------------- memory sampler


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss()
        self.stop = False
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *a):
        self.stop = True
        self.th.join()
        self.peak = max(self.peak, rss())
        self.delta = self.peak - self.base


# --------------------------------------------------------------------------- models and steps


def gpt2(size: str, vocab: int = 50257, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if size == "small":
        cfg = GPT2Config(vocab_size=vocab)  # GPT-2 124M
    else:
        cfg = GPT2Config(vocab_size=vocab, n_layer=4, n_head=4, n_embd=256)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.1  # as GPT2Config(): dropout stays on while training
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


def flops_per_token(model, T: int, trainable_all: bool = True) -> float:
    """Matmul FLOPs per trained token: 6N (forward + backward) + attention 12*L*T*D (nanoGPT/PaLM
    estimate); N counts every matmul weight once (the tied head included, position table excluded).
    With frozen weights (LoRA) the weight-gradient third is skipped: 4N."""
    c = model.config
    n = sum(p.numel() for n_, p in model.named_parameters() if "wpe" not in n_ and "lora_" not in n_)
    n = n if hasattr(model, "lm_head") else n
    mult = 6 if trainable_all else 4
    return mult * n + 12 * c.n_layer * T * c.n_embd


class Side:
    """One training configuration: a loss function, an optimizer, a precision."""

    def __init__(self, name, model, loss_fn, dtype, fused: bool):
        from gpt2tune.train.optim import build_optimizer

        self.name, self.model, self.loss_fn, self.dtype = name, model, loss_fn, dtype
        self.opt = build_optimizer(model, 1e-5, 0.01, (0.9, 0.999), torch.device("cpu"), fused=fused)
        self.times, self.cpu, self.tokens, self.useful, self.mem = [], [], 0, 0, 0

    def step(self, batch: dict, timed: bool) -> None:
        ctx = torch.autocast("cpu", dtype=self.dtype) if self.dtype != torch.float32 else torch.autocast("cpu", enabled=False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        with PeakRSS() as mem:
            t, c = time.perf_counter(), time.process_time()
            with ctx:
                loss, n, _ = self.loss_fn(self.model, batch)
            loss.backward()
            clip_and_step(self.opt, params, 1.0)  # HF sides (not fused): clip_grad_norm_ then step
            self.opt.zero_grad(set_to_none=True)
            dt, dc = time.perf_counter() - t, time.process_time() - c
        if timed:
            self.times.append(dt)
            self.cpu.append(dc)
            self.tokens += batch["input_ids"].numel()
            self.useful += int(batch["attention_mask"].sum())
            self.mem = max(self.mem, mem.delta)

    @property
    def tps(self) -> float:
        return self.tokens / sum(self.times)

    @property
    def useful_tps(self) -> float:
        return self.useful / sum(self.times)

    @property
    def cpu_tps(self) -> float:
        """Tokens per CPU-second of this process (all threads): robust to other processes' load."""
        return self.tokens / sum(self.cpu)

    @property
    def useful_cpu_tps(self) -> float:
        return self.useful / sum(self.cpu)


def run_sides(sides, batches_of, steps: int, warmup: int) -> None:
    """Interleave the sides step by step; `batches_of(side)` gives the batch list of a side."""
    for i in range(warmup + steps):
        for s in sides:
            bl = batches_of(s)
            s.step(bl[i % len(bl)], timed=i >= warmup)


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x"


def row(name: str, hf: str, ours: str, r: str, note: str = "", base: str = "HF") -> None:
    """One result line: the baseline's figure (HF, or CT2 for CTranslate2), ours, ours / baseline."""
    out(f"{name:<48} | {base} {hf:>11} | gpt2tune {ours:>8} | {r:>6}" + (f"  ({note})" if note else ""))


# --------------------------------------------------------------------------- workloads


def bench_full(args, ceil) -> dict:
    m = gpt2(args.size)
    m.train()
    g = torch.Generator().manual_seed(0)
    V = m.config.vocab_size
    batches = []
    for _ in range(4):
        ids = torch.randint(0, V, (4, 128), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    fast = make_fast_loss(m, tune_malloc=False)
    def cached() -> int:  # what the fast path keeps between steps: bf16 weight copies (bf16 only), gradient and head buffers
        f = fast.fast
        kept = [t for _, t in f.cast.cache.values()] + list(f.grads.bufs.values()) + list(f.scratch.flat.values())
        return sum(t.numel() * t.element_size() for t in kept)

    mc = args.machine
    # HF fp32 (its default) always; HF bf16 autocast only where bf16 is native (elsewhere it is emulated,
    # many times slower than fp32: no user would pick it). Ours at what precision auto picks here.
    hf = {"fp32": Side("HF fp32", m, lm_loss, torch.float32, fused=False)}
    if mc.native_bf16:
        hf["bf16"] = Side("HF bf16 autocast", m, lm_loss, torch.bfloat16, fused=False)
    ours = Side(f"gpt2tune fast {mc.prec}", m, fast, mc.dtype, fused=True)
    sides = [*hf.values(), ours]
    if args.all and mc.prec != "fp32":
        sides.append(Side("gpt2tune fast fp32", m, fast, torch.float32, fused=True))
    run_sides(sides, lambda s: batches, args.steps, args.warmup)
    peaks = peak_memories(args.size, ["hf32", *(["hfbf"] if mc.native_bf16 else []), "ours"], mc.prec)
    fpt = flops_per_token(m, 128)
    mfu = lambda s, prec: s.tps * fpt / (ceil[prec] * 1e9)  # noqa: E731
    for prec, side in hf.items():
        label = "HF fp32" if prec == "fp32" else "HF bf16 autocast"
        note = f"ours: train.fast + precision {mc.prec}" + (" (same precision)" if prec == mc.prec else "")
        row(f"full fine-tuning vs {label} (tok/s)", f"{side.tps:.1f}", f"{ours.tps:.1f}", ratio(side.tps, ours.tps), note)
    for prec, side in hf.items():
        label = "HF fp32" if prec == "fp32" else "HF bf16 autocast"
        row(f"full fine-tuning vs {label} (tok/CPU-s)", f"{side.cpu_tps:.1f}", f"{ours.cpu_tps:.1f}",
            ratio(side.cpu_tps, ours.cpu_tps), "per CPU-second: robust to load")
    if len(sides) > len(hf) + 1:
        f32 = sides[-1]
        row("full fine-tuning fp32 vs HF fp32 (tok/s)", f"{hf['fp32'].tps:.1f}", f"{f32.tps:.1f}",
            ratio(hf["fp32"].tps, f32.tps), "same precision")
    ref = "hfbf" if "hfbf" in peaks else "hf32"
    row("full fine-tuning peak memory (MiB)", " / ".join(f"{peaks[k] / 2**20:.0f}" for k in peaks if k != "ours"),
        f"{peaks['ours'] / 2**20:.0f}", ratio(peaks["ours"], peaks[ref]),
        f"peak RSS of each side alone in a fresh process, 3 steps; HF {' / '.join(hf)}; ratio HF {hf_name(ref)} / ours, "
        ">1 = ours smaller")
    kept = "bf16 weight copies, gradient and head buffers" if mc.prec == "bf16" else "gradient and head buffers"
    out(f"  kept between steps by the fast path: {cached() / 2**20:.0f} MiB ({kept}); peak RSS growth within a step, shared process: "
        + ", ".join(f"{s.name} {s.mem / 2**20:.0f}" for s in sides) + " MiB")
    out("  MFU (of the matmul ceiling at each side's precision): "
        + ", ".join(f"HF {p} {100 * mfu(s, p):.1f}%" for p, s in hf.items())
        + f", gpt2tune {mc.prec} {100 * mfu(ours, mc.prec):.1f}% ({fpt / 1e6:.0f} MFLOP/token)")
    return {"precision": mc.prec, **{f"hf_{p}": s.tps for p, s in hf.items()}, f"ours_{mc.prec}": ours.tps, "ours": ours.tps,
            "cpu": {**{f"hf_{p}": s.cpu_tps for p, s in hf.items()}, "ours": ours.cpu_tps},
            "peak_rss_mib": {k: v / 2**20 for k, v in peaks.items()}, "kept_mib": cached() / 2**20}


def hf_name(key: str) -> str:
    return {"hf32": "fp32", "hfbf": "bf16"}[key]


def bench_compile(args, ceil) -> dict:
    """HF under `torch.compile` (inductor, bf16 autocast) vs the fast path (eager): compile time and
    steady-state tokens/s. Not in the default set (the compile alone takes about a minute)."""
    m = gpt2(args.size)
    m.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (4, 128), generator=g)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    cm = torch.compile(m)
    mc = args.machine
    hf = Side(f"HF compiled {mc.prec}", cm, lm_loss, mc.dtype, fused=True)
    ours = Side(f"gpt2tune fast {mc.prec}", m, make_fast_loss(m, tune_malloc=False), mc.dtype, fused=True)
    t = time.perf_counter()
    hf.step(batches[0], timed=False)
    compile_s = time.perf_counter() - t
    run_sides([hf, ours], lambda s: batches, args.steps, args.warmup)
    row(f"full fine-tuning vs torch.compile(HF) {mc.prec} (tok/s)", f"{hf.tps:.1f}", f"{ours.tps:.1f}",
        ratio(hf.tps, ours.tps), f"HF's first step, compiling: {compile_s:.0f} s; ours: eager, no compile")
    return {"hf_compiled": hf.tps, "ours": ours.tps, "compile_s": compile_s, "precision": mc.prec}


def memory_probe(side: str, size: str, prec: str, steps: int = 3) -> None:
    """Child process of `peak_memories`: a few full fine-tuning steps of one side; prints its peak RSS."""
    m = gpt2(size)
    m.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (4, 128), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if side == "ours":  # exactly what train.fast sets up in a real run (allocator tuning included)
        s = Side(side, m, make_fast_loss(m), torch.bfloat16 if prec == "bf16" else torch.float32, fused=True)
    else:
        s = Side(side, m, lm_loss, torch.float32 if side == "hf32" else torch.bfloat16, fused=False)
    for _ in range(steps):
        s.step(batch, timed=False)
    # VmHWM: the high-water mark of this process's own memory (ru_maxrss would include the parent's after fork)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak": int(hwm.split()[1]) * 1024}))


def peak_memories(size: str, sides: list, prec: str) -> dict:
    """Peak resident memory of full fine-tuning, each side alone in a fresh process (same model,
    batch, AdamW): what a user's machine must hold. In one shared process the sides' allocations
    would overlap and RSS deltas would hide memory kept from step to step."""
    import subprocess

    res = {}
    for side in sides:
        r = subprocess.run([sys.executable, __file__, "--memory-probe", side, "--size", size, "--probe-precision", prec],
                           capture_output=True,
                           text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
        res[side] = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    return res


def bench_lora(args, ceil) -> dict:
    import peft

    res = {}
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 50257, (4, 128), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    cfg = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn"],
               fan_in_fan_out=True, bias="none")
    pm = peft.get_peft_model(gpt2(args.size), peft.LoraConfig(**cfg))
    pm.train()
    mc = args.machine
    # as for full fine-tuning: HF+peft fp32 always, bf16 autocast only where bf16 is native
    hf = {"fp32": Side("HF+peft fp32", pm, lm_loss, torch.float32, fused=False)}
    if mc.native_bf16:
        hf["bf16"] = Side("HF+peft bf16 autocast", pm, lm_loss, torch.bfloat16, fused=False)
    ours = Side(f"gpt2tune fast {mc.prec}", pm, make_fast_loss(pm, tune_malloc=False), mc.dtype, fused=True)
    run_sides([*hf.values(), ours], lambda s: batches, args.steps, args.warmup)
    fpt = flops_per_token(pm.get_base_model(), 128, trainable_all=False)
    for prec, side in hf.items():
        note = f"ours: train.fast + precision {mc.prec}" + (" (same precision)" if prec == mc.prec else "")
        row(f"LoRA r=8 c_attn vs {side.name} (tok/s)", f"{side.tps:.1f}", f"{ours.tps:.1f}", ratio(side.tps, ours.tps), note)
    for side in hf.values():
        row(f"LoRA r=8 c_attn vs {side.name} (tok/CPU-s)", f"{side.cpu_tps:.1f}", f"{ours.cpu_tps:.1f}",
            ratio(side.cpu_tps, ours.cpu_tps), "per CPU-second")
    out("  MFU: " + ", ".join(f"{s.name} {100 * s.tps * fpt / (ceil[p] * 1e9):.1f}% of {p} ceiling" for p, s in hf.items())
        + f", gpt2tune {100 * ours.tps * fpt / (ceil[mc.prec] * 1e9):.1f}% of {mc.prec} ceiling")
    h = hf["fp32"]
    res.update(hf=h.tps, ours=ours.tps, hf_cpu=h.cpu_tps, ours_cpu=ours.cpu_tps)
    if "bf16" in hf:
        res.update(hf_bf16=hf["bf16"].tps, hf_bf16_cpu=hf["bf16"].cpu_tps)
    return res


def tang_texts(limit: int) -> list[str]:
    from gpt2tune.data.sources import SourceOptions, load_source

    recs = load_source(f"chinese-poetry:{POEMS}", SourceOptions()).records
    random.Random(0).shuffle(recs)
    return [r["text"] for r in recs[:limit]]


def bench_tang(args, ceil) -> dict:
    from gpt2tune.data.dataset import tokenize_texts
    from gpt2tune.model.tokenizer import framing_of, load_tokenizer

    if not POEMS.exists() or not BERT_ZH.exists():
        out("tang poems: ../shared data absent, skipped")
        return {}
    tok = load_tokenizer(BERT_ZH)
    fr = framing_of(tok)
    texts = tang_texts(4000)
    seqs, _ = tokenize_texts(tok, texts, fr.bos, fr.eos, 256, split_long=True)
    lens = sorted(len(s) for s in seqs)
    m = gpt2(args.size, vocab=len(tok))
    m.train()
    bs = 8
    seed_b = [collate(r, fr.pad) for r in epoch_batches(seqs, bs, "pad", 0, 0, 256)]
    group_b = [collate(r, fr.pad) for r in epoch_batches(seqs, bs, "group", 0, 0, 256)]
    pack_b = [collate(r, fr.pad) for r in epoch_batches(seqs, bs, "pack", 0, 0, 128)]
    fill = lambda bl: sum(int(b["attention_mask"].sum()) for b in bl) / sum(b["input_ids"].numel() for b in bl)  # noqa
    out(f"  tang poems: {len(seqs)} samples, tokens per sample median {lens[len(lens) // 2]}, "
        f"p10 {lens[len(lens) // 10]}, p90 {lens[9 * len(lens) // 10]}, max {lens[-1]}; "
        f"non-pad share: pad {100 * fill(seed_b):.0f}%, group {100 * fill(group_b):.0f}%, pack {100 * fill(pack_b):.0f}%")
    fast = make_fast_loss(m, tune_malloc=False)
    seed = Side("seed loop (pad, HF fp32)", m, lm_loss, torch.float32, fused=False)
    hfgroup = Side("HF fp32 + group", m, lm_loss, torch.float32, fused=False)
    mc = args.machine
    ours_p = Side(f"gpt2tune pack + fast {mc.prec}", m, fast, mc.dtype, fused=True)
    ours_g = Side(f"gpt2tune group + fast {mc.prec}", m, fast, mc.dtype, fused=True)
    sides = [seed, hfgroup, ours_p, ours_g]
    bmap = {id(seed): seed_b, id(hfgroup): group_b, id(ours_p): pack_b, id(ours_g): group_b}
    # the same number of samples' worth of batches for everyone: step i takes batch i of its own list
    run_sides(sides, lambda s: bmap[id(s)], args.steps + 1, args.warmup)
    row("tang poems useful tok/s: pack+fast vs seed pad", f"{seed.useful_tps:.1f}", f"{ours_p.useful_tps:.1f}",
        ratio(seed.useful_tps, ours_p.useful_tps), "non-pad tokens only")
    row("tang poems useful tok/CPU-s: pack+fast vs seed pad", f"{seed.useful_cpu_tps:.1f}",
        f"{ours_p.useful_cpu_tps:.1f}", ratio(seed.useful_cpu_tps, ours_p.useful_cpu_tps), "per CPU-second")
    row("tang poems useful tok/s: group+fast vs seed pad", f"{seed.useful_tps:.1f}", f"{ours_g.useful_tps:.1f}",
        ratio(seed.useful_tps, ours_g.useful_tps))
    row("tang poems useful tok/s: HF fp32 group vs pad", f"{seed.useful_tps:.1f}", f"{hfgroup.useful_tps:.1f}",
        ratio(seed.useful_tps, hfgroup.useful_tps), "batching alone")
    return {"seed": seed.useful_tps, "hf_group": hfgroup.useful_tps, "pack_fast": ours_p.useful_tps,
            "group_fast": ours_g.useful_tps, "cpu": {"seed": seed.useful_cpu_tps, "pack_fast": ours_p.useful_cpu_tps}}


class CT2:
    """CTranslate2, the established CPU inference engine, decoding the same GPT-2 weights (optional:
    `pip install ctranslate2`, the `bench` extra). The model is converted once per compute type
    through CTranslate2's own Transformers converter and decoded in a worker process of this run
    (`bench/ct2_worker.py`: one OpenMP runtime per process); token strings come from a stand-in
    vocabulary (ids are what is compared)."""

    def __init__(self, model, compute_type: str, threads: int, workdir: Path):
        from ctranslate2.converters import TransformersConverter

        src, dst = workdir / "hf", workdir / f"ct2-{compute_type}"
        if not src.exists():
            model.save_pretrained(src)
            V = model.config.vocab_size
            (src / "vocab.json").write_text(json.dumps({f"<{i}>": i for i in range(V)}))
            (src / "merges.txt").write_text("#version: 0.2\n")
            eos = f"<{V - 1}>"
            (src / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos}))
        if not dst.exists():
            TransformersConverter(str(src), low_cpu_mem_usage=True).convert(str(dst), quantization=compute_type)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "ct2_worker.py"), str(dst), compute_type,
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self._read()["version"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CTranslate2 worker ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def generate(self, prompt: list, new: int, bs: int, sample: bool):
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new": new, "bs": bs, "sample": sample}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        return r["ids"], (r["tps"], r["cpu_tps"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ct2_sides(m, threads: int, workdir: Path) -> dict:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        out("  CTranslate2 not installed (pip install -e '.[bench]'): its rows are skipped")
        return {}
    return {"model": CT2(m, "float32", threads, workdir), "int8": CT2(m, "int8", threads, workdir)}


def step_breakdown(m, prompt: list[int], tokens: int) -> dict:
    """Where a greedy fp32 one-row step of `FastRunner` spends its time: the whole step (argmax
    included, the head read for its argmax only, as greedy decoding does), and its projections
    alone, run as the step runs them (one thread, lent to the big products when the step found that
    faster), each reading its weights once as in a real step."""
    from gpt2tune.generate.fast import FastRunner
    from gpt2tune.generate.threads import one_thread

    r = FastRunner(m)
    tok = r.prefill(torch.tensor([prompt])).argmax(-1)
    for _ in range(8):  # warm: the head's one-row copy or int8 copy, the lending choice
        tok = r.step(tok, top1_only=True).argmax(-1)
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = r.step(tok, top1_only=True).argmax(-1)
    step = (time.perf_counter() - t0) / tokens
    lending, D = r.w.lending_for(1), m.config.n_embd
    lent, solo = lending.seconds[True], lending.seconds[False]
    x, h = torch.randn(1, D), torch.randn(1, m.config.n_inner or 4 * D)
    with torch.inference_mode(), one_thread() as n:
        k = n if lent is not None and (solo is None or lent <= solo) else 1

        def products():
            for _, attn, proj, _, fc, mproj in r.w.blocks:
                attn(x, k), proj(x, k), fc(x, k), mproj(h, k)
            r.w.head.top1(x, k)

        products()
        t0 = time.perf_counter()
        for _ in range(tokens):
            products()
        prod = (time.perf_counter() - t0) / tokens
    nbytes = sum(p.numel() for n_, p in m.named_parameters() if n_.startswith("transformer.h.") and p.dim() == 2) * 4
    top1 = r.w.head.top1_rows  # the head's int8 copy where greedy steps read it, else the head itself
    nbytes += m.lm_head.weight.numel() * (1 if top1 is not None else 4)
    return {"step_ms": step * 1e3, "products_ms": prod * 1e3, "products_gbs": nbytes / prod / 1e9, "lent": k > 1,
            "kernel": "compiled" if r.w.native_blocks is not None else "torch",
            "head": "from its int8 copy" if top1 is not None else "from all fp32 products"}


def bench_decode(args, ceil) -> dict:
    from gpt2tune.generate.decode import generate_ids
    from gpt2tune.generate.sampling import Sampling

    m = gpt2(args.size).eval()
    new = args.new_tokens
    prompt = [50256, 464, 3290, 318]
    res = {}

    def hf_gen(bs, sample):
        torch.manual_seed(0)
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            o = m.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                           top_k=50 if sample else None, num_return_sequences=bs, eos_token_id=None, pad_token_id=0)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        return o[:, len(prompt):].tolist(), (bs * new / dt, bs * new / dc)

    def ours(bs, sample, weights="model"):
        s = Sampling(max_new_tokens=new, greedy=not sample, top_k=50 if sample else 0, num_return_sequences=bs, seed=0,
                     weights=weights)
        t, c = time.perf_counter(), time.process_time()
        ids = generate_ids(m, prompt, None, s)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        n = sum(map(len, ids))
        return ids, (n / dt, n / dc)

    kinds = ("model", "bf16", "int8")
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="gpt2tune-bench-")
    ct2 = ct2_sides(m, torch.get_num_threads(), Path(tmp.name))
    # warm-up (and the greedy equality check; converted weights are cached after their first use)
    hf_gen(1, False)
    for w in kinds:
        ours(1, False, w)
    for c in ct2.values():
        c.generate(prompt, new, 1, False)
    c1 = {w: [] for w in ct2}
    c8 = {w: [] for w in ct2}
    ct2_same = {}
    reps = max(1, args.decode_reps)
    hf1, hf8 = [], []
    o1 = {w: [] for w in kinds}
    o8 = {w: [] for w in kinds}
    agree = {}
    same = True
    for _ in range(reps):
        a, x = hf_gen(1, False)
        hf1.append(x)
        for w in kinds:
            b, y = ours(1, False, w)
            o1[w].append(y)
            if w == "model":
                same &= a[0] == b[0]
            else:  # how many leading greedy tokens equal HF fp32's
                agree[w] = next((i for i, (u, v) in enumerate(zip(a[0], b[0])) if u != v), len(a[0]))
        for w, c in ct2.items():
            b, y = c.generate(prompt, new, 1, False)
            c1[w].append(y)
            ct2_same[w] = b[0] == a[0]
        hf8.append(hf_gen(8, True)[1])
        for w in kinds:
            o8[w].append(ours(8, True, w)[1])
        for w, c in ct2.items():
            c8[w].append(c.generate(prompt, new, 8, True)[1])
    med = lambda v: sorted(x[0] for x in v)[len(v) // 2]  # noqa: E731
    cmed = lambda v: sorted(x[1] for x in v)[len(v) // 2]  # noqa: E731
    label = {"model": "", "bf16": " bf16 weights", "int8": " int8 weights"}
    for w in kinds:
        note = f"fp32, same tokens as HF: {same}" if w == "model" else \
            f"vs HF fp32; option --weights {w}; first {agree[w]} of {new} tokens equal HF's"
        row(f"greedy decode bs1{label[w]} (tok/s)" if w != "model" else f"greedy decode bs1 {new} tokens (tok/s)",
            f"{med(hf1):.1f}", f"{med(o1[w]):.1f}", ratio(med(hf1), med(o1[w])), note)
    for w in kinds:
        row(f"sampling bs8{label[w]} (tok/s)" if w != "model" else f"sampling bs8 top-k 50 {new} tokens (tok/s)",
            f"{med(hf8):.1f}", f"{med(o8[w]):.1f}", ratio(med(hf8), med(o8[w])),
            "fp32" if w == "model" else f"vs HF fp32; option --weights {w}")
    for w in kinds:
        row(f"greedy decode bs1{label[w]} (tok/CPU-s)", f"{cmed(hf1):.1f}", f"{cmed(o1[w]):.1f}",
            ratio(cmed(hf1), cmed(o1[w])), "per CPU-second")
    ct_name = {"model": "float32", "int8": "int8"}
    for w in ct2:
        row(f"greedy decode bs1{label[w] or ' fp32'} vs CTranslate2 {ct_name[w]} (tok/s)", f"{med(c1[w]):.1f}",
            f"{med(o1[w]):.1f}", ratio(med(c1[w]), med(o1[w])),
            f"CTranslate2 {ct2[w].version}; its tokens equal HF's: {ct2_same[w]}", base="CT2")
    for w in ct2:
        row(f"sampling bs8{label[w] or ' fp32'} vs CTranslate2 {ct_name[w]} (tok/s)", f"{med(c8[w]):.1f}",
            f"{med(o8[w]):.1f}", ratio(med(c8[w]), med(o8[w])), "top-k 50", base="CT2")
    split = step_breakdown(m, prompt, max(16, min(new, 64)))
    ct_ms = f"; CTranslate2 float32 {1e3 / med(c1['model']):.1f} ms per token" if "model" in ct2 else ""
    out(f"  greedy fp32 step ({split['kernel']} one-row kernel, generate.gemv): {split['step_ms']:.1f} ms per token = "
        f"products {split['products_ms']:.1f} ms "
        f"({split['products_gbs']:.0f} GB/s of weights, the head's argmax {split['head']}, "
        f"threads {'lent' if split['lent'] else 'not lent'}; timed one call each) + the rest "
        f"{max(0.0, split['step_ms'] - split['products_ms']):.1f} ms (norms, attention, residuals, argmax){ct_ms}")
    for c in ct2.values():
        c.close()
    tmp.cleanup()
    weights = sum(p.numel() for n, p in m.named_parameters() if "wpe" not in n) * 4
    out(f"  decode at the copy bandwidth: fp32 weights {weights / 1e6:.0f} MB per token -> "
        f"{ceil['bw'] * 1e9 / weights:.0f} tok/s at bs1 (bf16: {2 * ceil['bw'] * 1e9 / weights:.0f}, "
        f"int8: {4 * ceil['bw'] * 1e9 / weights:.0f}; streams that only read can beat the copy)")
    res.update({f"greedy_ct2_{w}": med(c1[w]) for w in ct2}, **{f"sample_ct2_{w}": med(c8[w]) for w in ct2})
    res.update(step_breakdown=split)
    res.update(greedy_hf=med(hf1), greedy_same=same, sample_hf=med(hf8), greedy_agree=agree,
               **{f"greedy_ours_{w}": med(o1[w]) for w in kinds}, **{f"sample_ours_{w}": med(o8[w]) for w in kinds})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["small", "mini"], default="small", help="small: GPT-2 124M")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per side")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-reps", type=int, default=1)
    ap.add_argument("--only", default="full,lora,decode,tang",
                    help="comma-separated workloads: full, lora, decode, tang, compile (torch.compile of the HF "
                         "model, about a minute of compiling; not in the default set)")
    ap.add_argument("--all", action="store_true", help="also time the fast path in fp32")
    ap.add_argument("--threads", default="auto",
                    help="torch threads; auto: torch's default, but 1 when the load average exceeds the cores "
                         "(OpenMP barriers then wait for descheduled threads and both sides measure the scheduler)")
    ap.add_argument("--malloc", choices=["plain", "tuned"], default="plain",
                    help="tuned: glibc keeps big buffers (what train.fast does in a real run); process-wide, so "
                         "the HF baseline gets it too. plain (default): neither side")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-probe", choices=["hf32", "hfbf", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--probe-precision", choices=["fp32", "bf16"], default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.size, args.probe_precision)
        return
    if args.threads == "auto":
        if os.getloadavg()[0] > (os.cpu_count() or 1):
            torch.set_num_threads(1)
    else:
        torch.set_num_threads(int(args.threads))
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.malloc == "tuned":
        from gpt2tune.model.fast_gpt2 import tune_allocator

        tune_allocator()
    t0 = time.perf_counter()
    out(f"gpt2tune bench: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, model {'GPT-2 124M' if args.size == 'small' else 'mini'}, "
        f"malloc {args.malloc}, load average {os.getloadavg()[0]:.1f}")
    args.machine = mc = Machine()
    out(mc.describe())
    ceil = {"fp32": matmul_gflops(torch.float32), "bw": bandwidth_gbs()}
    if mc.native_bf16:
        ceil["bf16"] = matmul_gflops(torch.bfloat16)
    out("ceilings: " + (f"bf16 matmul {ceil['bf16']:.0f} GFLOP/s, " if "bf16" in ceil else "")
        + f"fp32 matmul {ceil['fp32']:.0f} GFLOP/s, memory bandwidth {ceil['bw']:.1f} GB/s")
    res = {"ceilings": ceil}
    for name in args.only.split(","):
        t = time.perf_counter()
        res[name] = {"full": bench_full, "lora": bench_lora, "decode": bench_decode, "tang": bench_tang,
                     "compile": bench_compile}[name](args, ceil)
        out(f"  ({name}: {time.perf_counter() - t:.0f} s)")
    out(f"total {time.perf_counter() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"lines": LINES, "results": res}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
